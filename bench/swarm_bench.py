"""Swarm benchmark (TARGET=swarm), each measure beside its baseline in the same run:

1. A changed-backend deploy under 100 req/s (GET+POST through the gateway): wall time and failed requests,
   `fab deploy` to the Swarm stack vs `fab deploy` of the Compose target (the same sandbox stack on one node).
2. Failed requests of the same change applied by hand: `docker stack deploy` of the very stack file healthdeploy
   rendered (its backend image swapped for an already built one), waited for until Swarm reports the update
   completed; and, to show what the file itself contributes, the same by hand with the stop delay removed and
   with Swarm's default stop-first order.

Runs on test-bed nodes of its own (HEALTHDEPLOY_BENCH_SWARM_NODES, default node16-18: manager+data, app+edge, app+edge),
its own stack (hdbsw) and env; the Compose target runs on the data node (no gateway port of the stack there).
Other stacks (the swarm tests on node4-6) may run meanwhile: these nodes have addresses of their own.
Writes bench/results/swarm-<UTC time>.md.
"""

from __future__ import annotations

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
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from deploy.sandbox import images, netns  # noqa: E402
from load import Load  # noqa: E402
from swarm_env import form_swarm, remove_leftovers  # noqa: E402
from testbed_env import docker  # noqa: E402

ENV_NAME = "bsw"
STACK = "hdbsw"
COMPOSE_PROJECT = "hd-bsw-compose"
DEPLOY_ROOT = Path("/var/lib/healthdeploy-bench-swarm")
RUNS = int(os.environ.get("HEALTHDEPLOY_BENCH_RUNS", "3"))


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


class SwarmBench:
    def __init__(self, nodes: list[netns.Node]):
        self.nodes = nodes
        self.manager, self.edge = nodes[0], nodes[1]
        self.dir = Path(tempfile.mkdtemp(prefix="hd-swarm-bench-"))
        self.compose_dir = self.dir / "compose"
        self.compose_dir.mkdir()
        self.app = self.dir / "app"
        shutil.copytree(ROOT / "deploy" / "sandbox" / "app", self.app, ignore=shutil.ignore_patterns("__pycache__"))
        base = {"HOSTS": self.manager.name, "DEPLOY_PATH": str(DEPLOY_ROOT) + "/{host}/{env}",
                "APP_SOURCE": str(self.app), "HEALTH_TIMEOUT": "60", "KEEP_RELEASES": "6",
                "SSH_CONFIG": str(ROOT / ".sandbox/ssh_config"), "SSH_KNOWN_HOSTS": str(ROOT / ".sandbox/known_hosts")}
        n = nodes
        self.write(self.dir, {**base, "TARGET": "swarm", "SWARM_STACK": STACK, "SWARM_SUBNET": "10.249.0.0/24",
                              "SWARM_NODES": f"{n[0].name}=data,{n[1].name}=app+edge,{n[2].name}=app+edge",
                              "SWARM_REPLICAS": "2", "SWARM_MONITOR": "2", "REGISTRY": f"{netns.REGISTRY}/healthdeploy-bench"})
        # Its own deploy directory: with the Swarm target's, its first deploy took the stack's release for its own.
        self.write(self.compose_dir, {**base, "DEPLOY_PATH": str(DEPLOY_ROOT) + "/{host}/{env}-compose",
                                      "COMPOSE_PROJECT": COMPOSE_PROJECT, "GATEWAY_BIND": "{address}",
                                      "PUBLISH_INFRA": "none"})

    @staticmethod
    def write(directory: Path, values: dict[str, str]) -> None:
        lines = [line for line in (ROOT / "env" / "sandbox.env").read_text().splitlines()
                 if line.split("=", 1)[0] not in values]
        (directory / f"{ENV_NAME}.env").write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")

    def fab(self, *args: str, compose: bool = False) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        words = ["fab", "-H", self.manager.name, args[0], *args[1:]] if compose else \
            ["fab", args[0], "--env", ENV_NAME, *args[1:]]
        proc = subprocess.run(words, capture_output=True, text=True, cwd=ROOT, env={
            **os.environ, "PYTHONPATH": str(ROOT), "HEALTHDEPLOY_ENV_DIR": str(self.compose_dir if compose else self.dir)})
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(words)} failed:\n{proc.stderr[-3000:]}")
        return proc, elapsed

    def set_build(self, build: str) -> None:
        (self.app / "backend" / "build_id").write_text(build + "\n")

    def ssh(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(ROOT / ".sandbox/ssh_config"), self.manager.name, command],
                              capture_output=True, text=True, timeout=600)

    def cleanup(self) -> None:
        remove_leftovers(self.nodes, STACK, ENV_NAME, COMPOSE_PROJECT, DEPLOY_ROOT)


def under_load(address: str, action, settle: float = 3) -> tuple[object, float, object]:
    with Load(address, 5000, rate=100, limit_s=3600) as load:
        time.sleep(settle)
        started = time.monotonic()
        value = action()
        elapsed = time.monotonic() - started
        time.sleep(2)
    return load.result, elapsed, value


def by_hand(bench: SwarmBench, variant: str, image: str, n: int) -> tuple[object, float]:
    """The live stack file, its backend image swapped, deployed with plain `docker stack deploy`, then waited for
    (`docker service inspect` until its update completed), as an operator would by hand."""
    current = (DEPLOY_ROOT / bench.manager.name / ENV_NAME / "current").resolve()
    text = (current / "stack.yaml").read_text()
    text = re.sub(r"(\n  backend:\n    image: )\S+", rf"\g<1>{image}", text)
    text = text.replace('RELEASE_ID: "', f'RELEASE_ID: "by-hand-{n}-', 1)
    if variant == "no stop delay":
        text = text.replace('HEALTHDEPLOY_STOP_DELAY: "', 'HEALTHDEPLOY_STOP_DELAY: "0" #', 1)
    if variant == "stop-first":
        text = re.sub(r"(\n  backend:.*?order: )start-first", r"\1stop-first", text, count=1, flags=re.S)
    path = current / f"stack.by-hand-{n}.yaml"
    path.write_text(text)

    def deploy():
        proc = bench.ssh(f"cd {current} && docker stack deploy --detach=true --resolve-image never -c {path.name} {STACK} "
                         f"&& while :; do s=$(docker service inspect -f '{{{{.UpdateStatus.State}}}}' {STACK}_backend); "
                         f"case \"$s\" in completed|rollback_completed|paused) echo $s; break;; esac; sleep 0.5; done")
        if proc.returncode != 0:
            raise SystemExit(f"bench: by-hand deploy failed: {proc.stderr[-2000:]}")
        return proc.stdout.strip().splitlines()[-1]  # the state the loop ended on (before it: stack deploy's lines)
    result, elapsed, state = under_load(bench.edge.address, deploy)
    path.unlink()
    return result, elapsed, state


def main() -> int:
    # Nodes of its own (HEALTHDEPLOY_BENCH_SWARM_NODES), so the tests' swarm (node4-6) can run meanwhile.
    names = [n.strip() for n in os.environ.get("HEALTHDEPLOY_BENCH_SWARM_NODES", "node16,node17,node18").split(",") if n.strip()]
    nodes = [netns.node_for(n) for n in names][:3]
    if any(images.image_label(tag) is None for tag in images.all_tags()):
        images.build_all()
    netns.up([n.name for n in nodes])
    netns.ensure_registry()
    form_swarm(nodes)
    bench = SwarmBench(nodes)
    bench.cleanup()
    started_load = loadavg()
    rows: list[list[str]] = []
    try:
        bench.set_build("bench-0")
        bench.fab("deploy")  # first deploy of the Swarm stack (not measured)
        swarm_runs = []
        for i in range(1, RUNS + 1):
            bench.set_build(f"bench-swarm-{i}")
            result, elapsed, _ = under_load(bench.edge.address, lambda: bench.fab("deploy"))
            swarm_runs.append((elapsed, result.failed, result.total, result.p99_ms()))
        digests = re.findall(r"image: (\S+/backend@sha256:[0-9a-f]{64})",
                             "".join((p / "stack.yaml").read_text() for p in sorted(
                                 (DEPLOY_ROOT / bench.manager.name / ENV_NAME / "releases").iterdir())
                                 if (p / "stack.yaml").exists()))
        hand = []
        for n, variant in enumerate(("the rendered file", "no stop delay", "stop-first")):
            image = digests[-2 - (n % 2)]  # an image built before: the change is only the image
            result, elapsed, state = by_hand(bench, variant, image, n)
            hand.append((variant, elapsed, result.failed, result.total, result.p99_ms(), state))
        # back to the file healthdeploy rendered, then the Compose target of the same stack on the data node
        bench.set_build("bench-swarm-last")
        bench.fab("deploy")
        bench.set_build("bench-0")
        bench.fab("deploy", compose=True)
        compose_runs = []
        for i in range(1, RUNS + 1):
            bench.set_build(f"bench-compose-{i}")
            result, elapsed, _ = under_load(bench.manager.address, lambda: bench.fab("deploy", compose=True))
            compose_runs.append((elapsed, result.failed, result.total, result.p99_ms()))
    finally:
        bench.cleanup()
    ended_load = loadavg()

    def med(runs, i):
        return statistics.median(r[i] for r in runs)

    def failed(runs):
        return f"{sum(r[1] for r in runs)}/{sum(r[2] for r in runs)}"

    rows.append(["changed backend at 100 req/s: deploy wall time (s), median of "
                 f"{RUNS}", f"{med(swarm_runs, 0):.1f}", f"{med(compose_runs, 0):.1f}",
                 f"{med(swarm_runs, 0) / med(compose_runs, 0):.2f}"])
    rows.append(["  failed requests (all runs)", failed(swarm_runs), failed(compose_runs), "-"])
    rows.append(["  p99 latency during the runs (ms), median", f"{med(swarm_runs, 3):.0f}", f"{med(compose_runs, 3):.0f}",
                 "-"])
    rows.append(["  each run (s)", ", ".join(f"{r[0]:.1f}" for r in swarm_runs),
                 ", ".join(f"{r[0]:.1f}" for r in compose_runs), "-"])
    now = dt.datetime.now(dt.timezone.utc)
    lines = [
        "# Swarm benchmark", "",
        f"{now:%Y-%m-%d %H:%M} UTC, 2 cores shared with other work (load average {started_load} at the start, "
        f"{ended_load} at the end), testbed nodes {', '.join(n.name for n in nodes)} (own dockerd each), "
        "registry on the bridge.", "",
        "| measure | TARGET=swarm (`fab deploy`) | TARGET=compose (`fab deploy`, one node) | ratio |",
        "|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows], "",
        "The same change applied by hand to the Swarm stack: `docker stack deploy` of healthdeploy's rendered "
        "stack file with the backend image swapped for one built before, waited for until Swarm reported the "
        "update done (no build, no migration, no verification):", "",
        "| by hand | failed/total | p99 (ms) | seconds until Swarm reported it done | Swarm's verdict |",
        "|---|---|---|---|---|",
        *[f"| {v} | {f}/{t} | {p:.0f} | {e:.1f} | {s} |" for v, e, f, t, p, s in hand], "",
        "Swarm: 2 tasks per stateless service on two app+edge nodes, SWARM_MONITOR=2, the gateway of the first edge "
        "node under load. A `fab deploy` includes the build and push, the migration as a one-off task, the wait for "
        "convergence, spreading the tasks over both app nodes when the update crowded them on one, and the "
        "check through both gateways.", "",
    ]
    report = "\n".join(lines)
    out = ROOT / "bench" / "results" / f"swarm-{now:%Y%m%dT%H%M}.md"
    out.write_text(report)
    print(report)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
