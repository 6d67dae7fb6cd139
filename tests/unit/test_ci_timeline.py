""".ci/timeline.py: a run's per-test lines in, one row per worker and module out."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("ci_timeline", ROOT / ".ci" / "timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def line(worker, test_id, start, end):
    return json.dumps({"worker": worker, "id": test_id, "start": start, "end": end})


def test_rows_group_a_workers_tests_by_module_from_the_first_start():
    lines = [line("gw1", "tests/integration/test_swarm.py::test_b", 1600.0, 1700.4),
             line("gw0", "tests/integration/test_faults.py::test_a[x]", 1000.0, 1050.0),
             line("gw0", "tests/integration/test_faults.py::test_a[y]", 1050.0, 1100.2),
             line("gw1", "tests/integration/test_swarm.py::test_a", 1550.0, 1600.0),
             ""]
    assert load().rows(lines) == [("gw0", "tests/integration/test_faults.py", 0, 100, 2),
                                  ("gw1", "tests/integration/test_swarm.py", 550, 150, 2)]


def test_no_lines_no_rows():
    assert load().rows([]) == []
