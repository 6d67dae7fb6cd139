"""Deploy benchmarks, each side by side with its baseline in the same run (issue: deploy).

1. Failed requests and p99 at 100 req/s (GET+POST) while a changed backend goes live:
   `fab deploy` vs a naive `docker compose up -d --build backend` of the same change.
2. A no-change deploy: time and bytes vs `rsync` of the same payload over ssh.
3. `fab rollback`: time (no rebuild).
4. A deploy to three sandbox hosts vs one (BATCH_SIZE=1 and BATCH_SIZE=3).

Uses sandbox hosts sandbox2..sandbox4 (127.0.0.3-5) so the demo (sandbox) and the tests
(sandbox5-7) are not disturbed. Prints a Markdown report and writes it to bench/results/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from deploy.sandbox import images

from deploy.sandbox import hosts as sandbox  # noqa: E402
from deploy.sandbox import setup  # noqa: E402
from deploy.stack import payload as pl  # noqa: E402
from deploy.core.settings import load_settings  # noqa: E402
from deploy.stack.render import Target  # noqa: E402
from load import Load  # noqa: E402

HOSTS = ("sandbox2", "sandbox3", "sandbox4")
ADDRESS = {"sandbox2": "127.0.0.3", "sandbox3": "127.0.0.4", "sandbox4": "127.0.0.5"}
ENV_NAME = "bench"


class Bench:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hd-bench-"))
        self.app = self.dir / "app"
        shutil.copytree(ROOT / "deploy" / "sandbox" / "app", self.app, ignore=shutil.ignore_patterns("__pycache__"))
        self.write_env(hosts="sandbox2")

    def write_env(self, hosts: str, **extra: str) -> None:
        base = (ROOT / "env" / "sandbox.env").read_text().splitlines()
        values = {"HOSTS": hosts, "DEPLOY_PATH": "/var/lib/healthdeploy-bench/{host}/{env}",
                  "COMPOSE_PROJECT": "hd-b{env}-{host}", "APP_SOURCE": str(self.app),
                  "SSH_CONFIG": str(ROOT / ".sandbox/ssh_config"), "SSH_KNOWN_HOSTS": str(ROOT / ".sandbox/known_hosts"),
                  **extra}
        lines = [line for line in base if line.split("=", 1)[0] not in values]
        (self.dir / f"{ENV_NAME}.env").write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")

    def fab(self, *args: str, hosts: str = "sandbox2") -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        proc = subprocess.run(["fab", "-H", hosts, *args], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.dir)})
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"bench: fab {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return proc, elapsed

    def set_build(self, build: str) -> None:
        (self.app / "backend" / "build_id").write_text(build + "\n")

    def cleanup(self) -> None:
        for host in HOSTS:
            sandbox.remove_project(f"hd-b{ENV_NAME}-{host}")
        shutil.rmtree("/var/lib/healthdeploy-bench", ignore_errors=True)


def under_load(address: str, action) -> tuple[object, float]:
    with Load(address, 5000, rate=100) as load:
        time.sleep(4)  # steady state first
        started = time.monotonic()
        action()
        elapsed = time.monotonic() - started
        time.sleep(5)
    return load.result, elapsed


def naive_rebuild(bench: Bench) -> None:
    """What an operator without healthdeploy does: edit the source in place, `up -d --build` the service."""
    root = Path(f"/var/lib/healthdeploy-bench/sandbox2/{ENV_NAME}/current")
    (root / "src" / "backend" / "build_id").write_text((bench.app / "backend" / "build_id").read_text())
    release = root.resolve()
    subprocess.run(["docker", "compose", "--project-name", f"hd-b{ENV_NAME}-sandbox2", "--file", str(release / "compose.yaml"),
                    "--env-file", str(release / "release.env"), "up", "-d", "--build", "--no-deps", "backend"],
                   check=True, capture_output=True)


def rsync_same_payload(bench: Bench) -> tuple[float, int]:
    """rsync of the same payload (rendered files + source) to an up-to-date copy on the host."""
    settings = load_settings(ENV_NAME, directory=bench.dir)
    files = pl.build_payload(settings, Target.of(settings, "sandbox2", ADDRESS["sandbox2"]), pl.collect_source(str(bench.app)))
    local = bench.dir / "payload"
    for path, data in files.items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(data)
    ssh = f"ssh -F {ROOT / '.sandbox/ssh_config'}"
    dest = "sandbox2:/var/lib/healthdeploy-bench/rsync-copy/"
    subprocess.run(["rsync", "-a", "--delete", "-e", ssh, f"{local}/", dest], check=True, capture_output=True)
    started = time.monotonic()
    proc = subprocess.run(["rsync", "-a", "--delete", "--stats", "-e", ssh, f"{local}/", dest],
                          check=True, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    return elapsed, sent


def main() -> int:
    setup.ensure_machine()
    images.build_all()
    setup.ensure_tools([setup.Tool("rsync", "rsync", "the benchmark's baseline")])
    sandbox.up(list(HOSTS), install=False)
    bench = Bench()
    bench.cleanup()
    rows = []
    try:
        bench.fab("deploy")  # first deploy: infrastructure and v1 of every service
        # 1. rolling a changed backend under load: healthdeploy vs naive compose
        bench.set_build("backend-hd")
        ours, ours_s = under_load(ADDRESS["sandbox2"], lambda: bench.fab("deploy"))
        bench.set_build("backend-naive")
        naive, naive_s = under_load(ADDRESS["sandbox2"], lambda: naive_rebuild(bench))
        rows.append(("changed backend at 100 req/s: failed requests", f"{ours.failed}/{ours.total}",
                     f"{naive.failed}/{naive.total}", "-"))
        rows.append(("  p99 latency during the run (ms)", f"{ours.p99_ms():.0f}", f"{naive.p99_ms():.0f}",
                     f"{ours.p99_ms() / max(naive.p99_ms(), 1):.2f}"))
        rows.append(("  duration of the deploy command (s)", f"{ours_s:.1f}", f"{naive_s:.1f}", f"{ours_s / naive_s:.2f}"))
        bench.set_build("backend-hd")
        # The naive edit is drift on the host: this deploy sees it, rolls the backend and repairs the gateway.
        bench.fab("deploy", "--break-lock")
        # 2. no-change deploy vs rsync of the same payload
        proc, nochange_s = bench.fab("deploy", "--json")
        sent = json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"][0]["uploaded_bytes"]
        rsync_s, rsync_bytes = rsync_same_payload(bench)
        rows.append(("no-change deploy: seconds (whole command vs rsync alone)", f"{nochange_s:.2f}", f"{rsync_s:.2f}",
                     f"{nochange_s / rsync_s:.2f}"))
        rows.append(("  bytes of file content sent", f"{sent}", f"{rsync_bytes} (rsync protocol)", "-"))
        # 3. rollback
        rollback, rollback_s = under_load(ADDRESS["sandbox2"], lambda: bench.fab("rollback"))
        rows.append(("fab rollback (no rebuild): seconds / failed requests", f"{rollback_s:.1f} / {rollback.failed}",
                     "-", "-"))
        # 4. three hosts vs one, every host warm (infrastructure up, a release live)
        bench.write_env(hosts="sandbox2,sandbox3,sandbox4", BATCH_SIZE="3")
        bench.set_build("backend-warm")
        bench.fab("deploy", hosts="sandbox2,sandbox3,sandbox4")
        bench.write_env(hosts="sandbox2,sandbox3,sandbox4")
        bench.set_build("backend-3h")
        _, one_s = bench.fab("deploy", hosts="sandbox2")
        bench.set_build("backend-3h-b")
        _, three_seq = bench.fab("deploy", hosts="sandbox2,sandbox3,sandbox4")
        bench.set_build("backend-3h-c")
        bench.write_env(hosts="sandbox2,sandbox3,sandbox4", BATCH_SIZE="3")
        _, three_par = bench.fab("deploy", hosts="sandbox2,sandbox3,sandbox4")
        rows.append(("deploy to 3 hosts vs 1 (BATCH_SIZE=1), seconds", f"{three_seq:.1f}", f"{one_s:.1f}",
                     f"{three_seq / one_s:.2f}"))
        rows.append(("deploy to 3 hosts vs 1 (BATCH_SIZE=3), seconds", f"{three_par:.1f}", f"{one_s:.1f}",
                     f"{three_par / one_s:.2f}"))
        rows.append(("  (a changed backend on warm hosts: build, migrate on the primary, one roll per host)", "", "", ""))
    finally:
        bench.cleanup()
    report = ["# Deploy benchmark", "", f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{os.cpu_count()} cores, sandbox hosts on loopback, one shared Docker engine.", "",
              "| measure | healthdeploy | baseline | ratio |", "|---|---|---|---|"]
    report += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(report) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / f"deploy-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
