"""Deploy benchmarks, each side by side with its baseline in the same run.

1. A changed backend going live at 100 req/s (GET+POST): failed requests and p99 of `fab deploy` vs a naive
   `docker compose up -d --build backend` of the same change, and a control run with no deploy.
2. A no-change deploy: `fab deploy` (the whole command) vs `rsync -rc` of the same payload over ssh plus
   `docker compose up -d` on the host (the hand-written fabfile's no-op). Best of N, alternating.
3. `fab rollback`: time and failed requests (no rebuild).
4. Several hosts (on the namespaced test bed: each node its own engine): a changed-backend deploy to
   1 data + 3 app hosts with BATCH_SIZE=1 and BATCH_SIZE=3 vs the same deploy to 1 host.

`python3 bench/deploy_bench.py [--only nochange,multihost,...]`. Loopback sandbox hosts sandbox2-4 and
testbed nodes node7-node10 and node15, so the demo, the tests and other work are not disturbed. Prints a Markdown
report and writes it to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# fab and inv of this Python, no version-manager shim in between, importing this checkout (as the tests do).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
sys.path.insert(0, str(ROOT / "tests"))

from deploy.core.settings import load_settings  # noqa: E402
from deploy.sandbox import hosts as sandbox  # noqa: E402
from deploy.sandbox import images, netns, setup  # noqa: E402
from deploy.stack import payload as pl  # noqa: E402
from deploy.stack.render import Target  # noqa: E402
from load import Load  # noqa: E402

HOST = "sandbox2"
ADDRESS = sandbox.host_for(HOST).address
NODES = ("node7", "node8", "node9", "node10")
ONE_NODE = "node15"  # the one-host baseline
ENV_NAME = "bench"
SSH = ["ssh", "-F", str(ROOT / ".sandbox/ssh_config"), "-o", "BatchMode=yes"]


class Bench:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hd-bench-"))
        self.app = self.dir / "app"
        shutil.copytree(ROOT / "deploy" / "sandbox" / "app", self.app, ignore=shutil.ignore_patterns("__pycache__"))
        self.write_env(hosts=HOST)

    def write_env(self, hosts: str, **extra: str) -> None:
        base = (ROOT / "env" / "sandbox.env").read_text().splitlines()
        values = {"HOSTS": hosts, "DEPLOY_PATH": "/var/lib/healthdeploy-bench/{host}/{env}",
                  "COMPOSE_PROJECT": "hd-b{env}-{host}", "APP_SOURCE": str(self.app),
                  "SSH_CONFIG": str(ROOT / ".sandbox/ssh_config"), "SSH_KNOWN_HOSTS": str(ROOT / ".sandbox/known_hosts"),
                  **extra}
        lines = [line for line in base if line.split("=", 1)[0] not in values]
        (self.dir / f"{ENV_NAME}.env").write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")

    def fab(self, *args: str) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        proc = subprocess.run(["fab", args[0], "--env", ENV_NAME, *args[1:]], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.dir)})
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"bench: fab {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return proc, elapsed

    def set_build(self, build: str) -> None:
        (self.app / "backend" / "build_id").write_text(build + "\n")

    def cleanup(self) -> None:
        sandbox.remove_project(f"hd-b{ENV_NAME}-{HOST}")
        for node in (*NODES, ONE_NODE):
            n = netns.node_for(node)
            if n in netns.running_nodes():
                ids = _docker(n, "ps", "-aq", "--filter", f"label=com.docker.compose.project=hd-b{ENV_NAME}-{node}").split()
                if ids:
                    _docker(n, "rm", "-f", "-v", *ids)
                volumes = _docker(n, "volume", "ls", "-q", "--filter", f"name=hd-b{ENV_NAME}-{node}_").split()
                if volumes:
                    _docker(n, "volume", "rm", *volumes)
        shutil.rmtree("/var/lib/healthdeploy-bench", ignore_errors=True)


def _docker(node, *args: str) -> str:
    return subprocess.run(["docker", "-H", node.docker_host, *args], capture_output=True, text=True).stdout


def under_load(address: str, action, post_path: str | None = "/api/echo") -> tuple[object, float]:
    with Load(address, 5000, rate=100, post_path=post_path) as load:
        time.sleep(4)  # steady state first
        started = time.monotonic()
        action()
        elapsed = time.monotonic() - started
        time.sleep(5)
    return load.result, elapsed


def naive_rebuild(bench: Bench) -> None:
    """What an operator without healthdeploy does: edit the source in place, `up -d --build` the service."""
    root = Path(f"/var/lib/healthdeploy-bench/{HOST}/{ENV_NAME}/current")
    (root / "src" / "backend" / "build_id").write_text((bench.app / "backend" / "build_id").read_text())
    release = root.resolve()
    subprocess.run(["docker", "compose", "--project-name", f"hd-b{ENV_NAME}-{HOST}", "--file", str(release / "compose.yaml"),
                    "--env-file", str(release / "release.env"), "up", "-d", "--build", "--no-deps", "backend"],
                   check=True, capture_output=True)


def handwritten_noop(bench: Bench, local: Path) -> float:
    """The hand-written fabfile's deploy when nothing changed: `rsync -rc` of the same payload to the live release
    on the host, then `docker compose up -d` there (ssh for both)."""
    release = Path(f"/var/lib/healthdeploy-bench/{HOST}/{ENV_NAME}/current").resolve()
    ssh = " ".join(SSH)
    started = time.monotonic()
    subprocess.run(["rsync", "-rc", "-e", ssh, f"{local}/", f"{HOST}:{release}/"], check=True, capture_output=True)
    subprocess.run([*SSH, HOST, f"docker compose --project-name hd-b{ENV_NAME}-{HOST} --file {release}/compose.yaml "
                    f"--env-file {release}/release.env up -d"], check=True, capture_output=True)
    return time.monotonic() - started


def payload_dir(bench: Bench) -> Path:
    settings = load_settings(ENV_NAME, directory=bench.dir)
    files = pl.build_payload(settings, Target.of(settings, HOST, ADDRESS), pl.collect_source(str(bench.app)))
    local = bench.dir / "payload"
    for path, data in files.items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(data)
    return local


def section_rolls(bench: Bench, rows: list) -> None:
    control, _ = under_load(ADDRESS, lambda: time.sleep(8))
    bench.set_build("backend-hd")
    ours, ours_s = under_load(ADDRESS, lambda: bench.fab("deploy"))
    bench.set_build("backend-naive")
    naive, naive_s = under_load(ADDRESS, lambda: naive_rebuild(bench))
    rows.append(("changed backend at 100 req/s: failed requests (control run, no deploy: "
                 f"{control.failed}/{control.total})", f"{ours.failed}/{ours.total}", f"{naive.failed}/{naive.total}", "-"))
    rows.append(("  p99 latency during the run (ms) (control: " f"{control.p99_ms():.0f})", f"{ours.p99_ms():.0f}",
                 f"{naive.p99_ms():.0f}", f"{ours.p99_ms() / max(naive.p99_ms(), 1):.2f}"))
    rows.append(("  duration of the deploy command (s)", f"{ours_s:.1f}", f"{naive_s:.1f}", f"{ours_s / naive_s:.2f}"))
    bench.set_build("backend-hd")
    bench.fab("deploy", "--break-lock")  # the naive edit is drift: this deploy rolls it back and repairs the gateway


def section_nochange(bench: Bench, rows: list, runs: int = 7) -> None:
    local = payload_dir(bench)
    handwritten_noop(bench, local)  # warm both paths once
    bench.fab("deploy")
    ours, theirs = [], []
    for _ in range(runs):  # alternating, so machine noise hits both alike
        proc, seconds = bench.fab("deploy", "--json")
        out = json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"][0]
        assert out["result"] == "unchanged" and out["uploaded_bytes"] == 0, out
        ours.append(seconds)
        theirs.append(handwritten_noop(bench, local))
    rows.append((f"no-change deploy, seconds (best of {runs}; median {statistics.median(ours):.2f} vs "
                 f"{statistics.median(theirs):.2f})", f"{min(ours):.2f}", f"{min(theirs):.2f} (rsync -rc + compose up -d)",
                 f"{min(ours) / min(theirs):.2f}"))


def section_rollback(bench: Bench, rows: list) -> None:
    rollback, rollback_s = under_load(ADDRESS, lambda: bench.fab("rollback"))
    rows.append(("fab rollback (no rebuild): seconds / failed requests", f"{rollback_s:.1f} / {rollback.failed}/"
                 f"{rollback.total}", "-", "-"))


def section_multihost(bench: Bench, rows: list, runs: int = 3) -> None:
    """1 data + 3 app nodes vs 1 node (a fifth node: it shares no Compose project with the four), a changed
    backend on warm hosts (infrastructure up, a release live); the three measures alternate, medians of ``runs``."""
    netns.up(list(NODES) + [ONE_NODE])
    data, apps = NODES[0], NODES[1:]
    hosts = ",".join(NODES)
    roles = ",".join([f"{data}=data"] + [f"{a}=app" for a in apps])
    # BUILD_ON=host is the sandbox's default (each app host builds its own image); BUILD_ON=operator is production's
    # (built once here, only the changed layers shipped to each host): both, each against a one-host baseline alike.
    configs = {"one": dict(hosts=ONE_NODE), "1": dict(hosts=hosts, ROLES=roles, BATCH_SIZE="1"),
               "3": dict(hosts=hosts, ROLES=roles, BATCH_SIZE="3"),
               "one-operator": dict(hosts=ONE_NODE, BUILD_ON="operator", BUILD_CACHE=str(bench.dir / "build-cache")),
               "3-operator": dict(hosts=hosts, ROLES=roles, BATCH_SIZE="3", BUILD_ON="operator",
                                  BUILD_CACHE=str(bench.dir / "build-cache"))}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for name in ("one", "3", "one-operator", "3-operator"):  # warm: first deploys, not measured
        bench.write_env(**configs[name])
        bench.set_build(f"backend-warm-{name}")
        bench.fab("deploy")
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in configs}  # per deploy: step -> slowest host's
    for run in range(runs):
        for name, config in configs.items():
            bench.write_env(**config)
            bench.set_build(f"backend-{name}-{run}")
            proc, elapsed = bench.fab("deploy", "--json")
            seconds[name].append(elapsed)
            steps[name].append(step_seconds(proc.stdout))
            steps[name][-1]["(outside the steps: connect, facts, plan, lock, waits)"] = round(
                elapsed - sum(steps[name][-1].values()), 2)
    for many_name, one_name, label in (("1", "one", "BATCH_SIZE=1, BUILD_ON=host"), ("3", "one", "BATCH_SIZE=3, BUILD_ON=host"),
                                       ("3-operator", "one-operator", "BATCH_SIZE=3, BUILD_ON=operator")):
        many, one = statistics.median(seconds[many_name]), statistics.median(seconds[one_name])
        rows.append((f"changed backend, 1 data + 3 app hosts vs 1 host ({label}), seconds, median of {runs} "
                     f"({', '.join(f'{x:.1f}' for x in seconds[many_name])} vs "
                     f"{', '.join(f'{x:.1f}' for x in seconds[one_name])})", f"{many:.1f}", f"{one:.1f}", f"{many / one:.2f}"))
        # Where the time goes: each step's median wall time (the slowest host's), here and on the one host.
        for key in sorted({k for d in steps[many_name] + steps[one_name] for k in d}, key=_step_order):
            a = [d[key] for d in steps[many_name] if key in d]
            b = [d[key] for d in steps[one_name] if key in d]
            rows.append((f"  step {key} ({label}), seconds, median, slowest host", f"{statistics.median(a):.2f}" if a else "-",
                         f"{statistics.median(b):.2f}" if b else "-",
                         f"{statistics.median(a) / statistics.median(b):.2f}" if a and b and statistics.median(b) else "-"))


def step_seconds(stdout: str) -> dict[str, float]:
    """step key -> the slowest host's wall time, from `fab deploy --json` (each step that ran has `seconds`)."""
    out: dict[str, float] = {}
    for host in json.loads(stdout[stdout.index("{"):])["hosts"]:
        for st in host.get("steps", []):
            if "seconds" in st:
                key = re.sub(r":\d{8}T\d{6}Z-[0-9a-f]+$", "", st["step"])  # one row per kind, not per release id
                out[key] = max(out.get(key, 0.0), st["seconds"])
    return out


def _step_order(key: str) -> tuple:
    kinds = ("upload", "build", "ship", "validate", "migrate", "roll", "switch", "verify")
    kind = key.split(":", 1)[0]
    return (next((i for i, k in enumerate(kinds) if kind.startswith(k)), len(kinds)), key)


SECTIONS = {"rolls": section_rolls, "nochange": section_nochange, "rollback": section_rollback,
            "multihost": section_multihost}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--runs", type=int, default=3, help="multihost: deploys of each measure (medians)")
    options = parser.parse_args()
    wanted = [s.strip() for s in options.only.split(",") if s.strip()]
    setup.ensure_machine()
    images.build_all()
    setup.ensure_tools([setup.Tool("rsync", "rsync", "the benchmark's baseline")])
    if "multihost" in wanted:
        setup.ensure_tools(setup.REGISTRY_TOOLS)  # BUILD_ON=operator ships through it
    sandbox.up([HOST], install=False)
    bench = Bench()
    bench.cleanup()
    rows: list = []
    try:
        if any(s in wanted for s in ("rolls", "nochange", "rollback")):
            bench.fab("deploy")  # first deploy: infrastructure and v1 of every service
        for name in wanted:
            if name == "multihost":
                section_multihost(bench, rows, runs=options.runs)
            else:
                SECTIONS[name](bench, rows)
    finally:
        bench.cleanup()
    report = ["# Deploy benchmark", "", f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; "
              f"loopback sandbox host {HOST} (the machine's engine) and testbed nodes {', '.join((*NODES, ONE_NODE))} (their own "
              "engines). Load average at the start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + ".", "",
              "| measure | healthdeploy | baseline | ratio |", "|---|---|---|---|"]
    report += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(report) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / f"deploy-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
