import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.chdir(ROOT)
# `fab` and `inv` in the tests' subprocesses are those of the Python that runs the tests: the same installation,
# and no version-manager shim in between (pyenv's runs about 20 processes per call, thousands of calls a run).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
# ... and they import this checkout's code, whichever checkout `pip install -e` pointed at last (a CI clone's,
# once: a bench then ran the clone's old code).
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


# The longest modules first (minutes of one worker each in a full run), so no worker starts one of them last
# and runs alone at the end. `inv test` passes --no-loadscope-reorder: xdist would otherwise order modules by
# their number of tests. The Swarm module comes fourth: it then starts once the heaviest minutes are over (every
# worker's first deploys), where its first deploy's migration once failed to reach the database in time.
LONGEST_FIRST = ("test_zero_downtime", "test_restore_faults", "test_faults", "test_swarm", "test_faults_drop",
                 "test_topology", "test_multihost", "test_secrets_sweep", "test_payload_filter", "test_backup",
                 "test_plan_changes", "test_git_source")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(Path(str(item.fspath)).stem, len(rank)),
                                 "tests/integration" not in str(item.fspath)))


# HEALTHDEPLOY_TEST_TIMELINE=FILE: one JSON line per test (worker, test id, start, end; fixtures included), so a
# run can be read module by module per worker (`.ci/timeline.py FILE`; .ci/run prints it). The suite is CPU-bound
# and whole runs vary by about 12 % here, so a change's gain is read from its own modules, not from the total.
_TIMELINE = os.environ.get("HEALTHDEPLOY_TEST_TIMELINE")
if _TIMELINE:
    import json
    import time

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        started = time.time()
        yield
        line = json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "-"), "id": item.nodeid,
                           "start": started, "end": time.time()})
        with open(_TIMELINE, "a") as out:  # one short append per test: the workers' lines do not interleave
            out.write(line + "\n")
