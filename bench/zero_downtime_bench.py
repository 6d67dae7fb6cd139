"""Zero-downtime benchmark: failed requests and p99 while a changed backend goes live, each method beside
its control run (the same load, duration and machine load, no deploy), in one run.

Scenarios: quiet vs contended (a CPU hog keeps the load average above twice the cores), polite vs rude
backend (rude: exits at once on SIGTERM). Methods, all on the same sandbox stack:
- healthdeploy: `fab deploy` (new containers beside the old, explicit upstream switch with the old as backup,
  drain, stop);
- naive: `docker compose up -d --build --no-deps backend` of the same change (recreate in place);
- docker-rollout style: scale to 2, wait until healthy, 3 s, stop and remove the old container, with a
  gateway that re-resolves Docker DNS (`resolver 127.0.0.11 valid=1s`, `proxy_next_upstream`, a 1 s connect
  timeout: config B+ of ../shared/measurements/zero-downtime.md, the best found for it).
Load: 100 req/s, GET /api/build + POST /api/echo alternating (both touch PostgreSQL), a new connection per
request. `python3 bench/zero_downtime_bench.py`; results in bench/results/zero-downtime-*.md.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import shutil
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

from deploy.sandbox import hosts as sandbox  # noqa: E402
from deploy.sandbox import images, setup  # noqa: E402
from load import Load  # noqa: E402

HOST = "sandbox3"
ADDRESS = sandbox.host_for(HOST).address
ENV = "zdb"
PROJECT = f"hd-b{ENV}-{HOST}"
ROLLOUT_PORT = 15000
SECONDS = 12


def _spin() -> None:
    while True:
        pass


class Hog:
    def __init__(self, on: bool):
        self.on, self.children = on, []

    def __enter__(self):
        if self.on:
            ctx = multiprocessing.get_context("fork")
            self.children = [ctx.Process(target=_spin, daemon=True) for _ in range(3 * (os.cpu_count() or 2))]
            for child in self.children:
                child.start()
            time.sleep(5)
        return self

    def __exit__(self, *exc):
        for child in self.children:
            child.kill()
            child.join()


class Stack:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hd-zdb-"))
        self.app = self.dir / "app"
        shutil.copytree(ROOT / "deploy" / "sandbox" / "app", self.app, ignore=shutil.ignore_patterns("__pycache__"))
        base = (ROOT / "env" / "sandbox.env").read_text().splitlines()
        values = {"HOSTS": HOST, "DEPLOY_PATH": "/var/lib/healthdeploy-bench/{host}/{env}", "COMPOSE_PROJECT": "hd-b{env}-{host}",
                  "APP_SOURCE": str(self.app), "SSH_CONFIG": str(ROOT / ".sandbox/ssh_config"),
                  "SSH_KNOWN_HOSTS": str(ROOT / ".sandbox/known_hosts")}
        lines = [line for line in base if line.split("=", 1)[0] not in values]
        (self.dir / f"{ENV}.env").write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")
        self.n = 0

    def fab(self, *args: str) -> None:
        proc = subprocess.run(["fab", args[0], "--env", ENV, *args[1:]], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.dir)})
        if proc.returncode != 0:
            raise SystemExit(f"bench: fab {' '.join(args)} failed:\n{proc.stderr[-3000:]}")

    def change(self, behaviour: str) -> None:
        self.n += 1
        (self.app / "backend" / "build_id").write_text(f"backend-zdb-{self.n}\n")
        (self.app / "backend" / "behaviour").write_text(behaviour + "\n")

    @property
    def release(self) -> Path:
        return Path(f"/var/lib/healthdeploy-bench/{HOST}/{ENV}/current").resolve()

    def compose(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "compose", "--project-name", PROJECT, "--file", str(self.release / "compose.yaml"),
                               "--env-file", str(self.release / "release.env"), *args], capture_output=True, text=True)

    def sync_source(self) -> None:
        """The naive and rollout methods edit the live release's source in place, as a hand-written deploy does."""
        for name in ("build_id", "behaviour"):
            shutil.copy(self.app / "backend" / name, self.release / "src" / "backend" / name)

    def cleanup(self) -> None:
        subprocess.run(["docker", "rm", "-f", f"{PROJECT}-rollout-gw"], capture_output=True)
        sandbox.remove_project(PROJECT)
        shutil.rmtree("/var/lib/healthdeploy-bench", ignore_errors=True)


ROLLOUT_GATEWAY = """events {}
http {
  access_log off;
  resolver 127.0.0.11 valid=1s ipv6=off;
  server {
    listen 15000;
    location / {
      set $up http://backend:5000;
      proxy_pass $up;
      proxy_connect_timeout 1s;
      proxy_next_upstream error timeout http_502 http_503;
    }
  }
}
"""


def start_rollout_gateway(stack: Stack) -> None:
    conf = stack.dir / "rollout-gw.conf"
    conf.write_text(ROLLOUT_GATEWAY)
    subprocess.run(["docker", "rm", "-f", f"{PROJECT}-rollout-gw"], capture_output=True)
    subprocess.run(["docker", "run", "-d", "--name", f"{PROJECT}-rollout-gw", "--network", f"{PROJECT}_default",
                    "-p", f"{ADDRESS}:{ROLLOUT_PORT}:{ROLLOUT_PORT}", "-v", f"{conf}:/etc/nginx/rollout.conf:ro",
                    "healthdeploy/nginx:1.22", "nginx", "-c", "/etc/nginx/rollout.conf", "-g", "daemon off;"],
                   check=True, capture_output=True)
    time.sleep(1)


def backend_ids(stack: Stack) -> list[str]:
    return stack.compose("ps", "-q", "backend").stdout.split()


def rollout(stack: Stack) -> None:
    """docker-rollout's method: scale up, wait healthy, wait 3 s more, remove the old container."""
    stack.sync_source()
    old = backend_ids(stack)
    assert stack.compose("build", "backend").returncode == 0
    stack.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", f"backend={2 * len(old)}", "backend")
    new = [i for i in backend_ids(stack) if i not in old]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", *new], capture_output=True,
                                text=True).stdout.split()
        if states and all(s == "healthy" for s in states):
            break
        time.sleep(0.5)
    time.sleep(3)
    subprocess.run(["docker", "stop", *old], capture_output=True)
    subprocess.run(["docker", "rm", *old], capture_output=True)


def naive(stack: Stack) -> None:
    stack.sync_source()
    stack.compose("up", "-d", "--build", "--no-deps", "backend")


def measure(port: int, action) -> tuple:
    with Load(ADDRESS, port, rate=100) as load:
        time.sleep(3)
        started = time.monotonic()
        action()
        elapsed = time.monotonic() - started
        time.sleep(max(3, SECONDS - elapsed))
    return load.result, elapsed


def cell(result) -> str:
    return f"{result.failed}/{result.total}, p99 {result.p99_ms():.0f} ms"


def main() -> int:
    setup.ensure_machine()
    images.build_all()
    sandbox.up([HOST], install=False)
    stack = Stack()
    stack.cleanup()
    rows = []
    try:
        stack.change("polite")
        stack.fab("deploy")
        for contended in (False, True):
            for behaviour in ("polite", "rude"):
                stack.change(behaviour)
                stack.fab("deploy")  # the behaviour is in place before the measured rolls
                with Hog(contended):
                    control, _ = measure(5000, lambda: time.sleep(SECONDS - 6))
                    stack.change(behaviour)
                    ours, ours_s = measure(5000, lambda: stack.fab("deploy"))
                    stack.change(behaviour)
                    theirs, _ = measure(5000, lambda: naive(stack))
                    stack.fab("deploy")  # back under healthdeploy's gateway (the naive edit is drift it repairs)
                    start_rollout_gateway(stack)
                    rollout_control, _ = measure(ROLLOUT_PORT, lambda: time.sleep(SECONDS - 6))
                    stack.change(behaviour)
                    rolled, _ = measure(ROLLOUT_PORT, lambda: rollout(stack))
                    stack.fab("deploy")
                load = os.getloadavg()[0]
                rows.append((f"{'contended' if contended else 'quiet'} (load {load:.1f}), {behaviour}", cell(control),
                             cell(ours), cell(theirs), f"{cell(rolled)} (its control {cell(rollout_control)})"))
    finally:
        stack.cleanup()
    report = ["# Zero-downtime benchmark", "",
              f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, sandbox host {HOST} (loopback, "
              "the machine's engine). 100 req/s GET /api/build + POST /api/echo, a new connection per request; each cell "
              "is failed/total and p99 over the same window length.", "",
              "| scenario | control (no deploy) | healthdeploy `fab deploy` | naive `compose up -d --build` | docker-rollout style |",
              "|---|---|---|---|---|"]
    report += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(report) + "\n"
    print(text)
    (ROOT / "bench" / "results" / f"zero-downtime-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
