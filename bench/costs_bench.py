"""Where a changed-backend deploy's time and the machine's CPU go, per remote command, on one testbed node.

Each remote command of `fab deploy` is timed (wall) and charged the machine's busy CPU time while it ran
(``/proc/stat``: user+nice+system+irq+softirq, all cores). One host deploys, so its commands run one at a time
and the CPU charged to a command is what it made the host's sshd, shell, docker CLI, engine and containers do
(plus the operator's own share and background noise: run it on an idle machine). Several hosts on this
machine share its 2 cores, so CPU per deploy is what limits a multi-host deploy here.

`inv bench --which costs` or `python3 bench/costs_bench.py [--runs N]`: prints a table per command kind (count,
wall s, CPU s, summed over the deploy, median of N deploys) and writes it to bench/results/costs-*.md. Its
baseline is the whole deploy: the first row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import deploy_bench as db  # noqa: E402

# Imported by the fab process before anything else (PYTHONPATH): wraps the SSH executor's run.
SITECUSTOMIZE = r'''
import json, os, time
from deploy.execute import ssh

_LOG = os.environ["HEALTHDEPLOY_COMMAND_COSTS"]


def _busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


_run = ssh.RemoteHost._run


def _timed(self, command, *args, **kwargs):
    wall, cpu = time.monotonic(), _busy()
    try:
        return _run(self, command, *args, **kwargs)
    finally:
        kind = (command.intent or (command.description or "?",))[0]
        with open(_LOG, "a") as f:
            f.write(json.dumps({"kind": kind, "wall": time.monotonic() - wall, "cpu": _busy() - cpu}) + "\n")


ssh.RemoteHost._run = _timed
'''


def _busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    db.setup.ensure_machine()
    db.images.build_all()
    db.netns.up([db.ONE_NODE])
    bench = db.Bench()
    bench.cleanup()
    hook = Path(tempfile.mkdtemp(prefix="hd-costs-"))
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    runs: list[dict[str, list[float]]] = []
    try:
        bench.write_env(hosts=db.ONE_NODE)
        bench.set_build("backend-costs-warm")
        bench.fab("deploy")
        for run in range(options.runs):
            log = hook / f"run{run}.jsonl"
            os.environ["HEALTHDEPLOY_COMMAND_COSTS"] = str(log)
            os.environ["PYTHONPATH"] = f"{hook}{os.pathsep}{os.environ['PYTHONPATH']}"
            bench.set_build(f"backend-costs-{run}")
            busy = _busy()
            _, elapsed = bench.fab("deploy")
            busy = _busy() - busy
            os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
            per: dict[str, list[float]] = {"(the whole fab deploy)": [1, elapsed, busy], "(in remote commands)": [0, 0.0, 0.0]}
            for line in log.read_text().splitlines():
                r = json.loads(line)
                row = per.setdefault(r["kind"], [0, 0.0, 0.0])
                row[0] += 1
                row[1] += r["wall"]
                row[2] += r["cpu"]
                inside = per["(in remote commands)"]
                inside[0], inside[1], inside[2] = inside[0] + 1, inside[1] + r["wall"], inside[2] + r["cpu"]
            runs.append(per)
    finally:
        bench.cleanup()
    kinds = sorted({k for r in runs for k in r}, key=lambda k: -statistics.median(r.get(k, [0, 0, 0])[2] for r in runs))
    lines = ["# Where a changed-backend deploy's CPU goes, per remote command", "",
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; testbed node {db.ONE_NODE}; "
             f"median of {options.runs} deploys. CPU: the whole machine's busy time while the command ran.", "",
             "| command | count | wall s | CPU s |", "|---|---|---|---|"]
    for k in kinds:
        rows = [r.get(k, [0, 0.0, 0.0]) for r in runs]
        lines.append(f"| {k} | {statistics.median(x[0] for x in rows):.0f} | {statistics.median(x[1] for x in rows):.2f} | "
                     f"{statistics.median(x[2] for x in rows):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / f"costs-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
