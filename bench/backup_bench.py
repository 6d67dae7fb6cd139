"""Backup and restore throughput, side by side with the raw OpenSSH pipe, at two database sizes.

healthdeploy: `inv backup --services postgres` (a separate process: its peak RSS is measured) and the
library's checksummed `stream_from_file` into `pg_restore --clean --if-exists`.
Baseline: `ssh host "docker exec PG pg_dump -Fc ..." > file` and `ssh host "docker exec -i PG pg_restore ..." < file`.
Sizes: about 100 MB and 1 GB of table data (pg_total_relation_size). Uses sandbox host sandbox2.
"""

from __future__ import annotations

import datetime as dt
import json
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

from deploy.sandbox import images

from deploy.sandbox import hosts as sandbox  # noqa: E402
from deploy.sandbox import setup  # noqa: E402
from deploy.commands import backup as bk  # noqa: E402
from deploy.execute.ssh import RemoteHost  # noqa: E402

HOST, ENV_NAME = "sandbox2", "bkbench"
SIZES = tuple(int(x) for x in os.environ.get("BENCH_SIZES_MB", "100,1000").split(","))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
PROJECT = f"hd-b{ENV_NAME}-{HOST}"
PG = f"{PROJECT}-postgres-1"
SSH = ["ssh", "-F", str(ROOT / ".sandbox/ssh_config"), HOST]


def run_measured(argv: list[str], env: dict | None = None, stdout=None, stdin=None) -> tuple[float, float, int]:
    """(seconds, peak RSS MB of that process, exit code)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=stdin,
                            cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench: {' '.join(argv[:6])} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, code


def psql(sql: str) -> str:
    return subprocess.run(["docker", "exec", PG, "psql", "-X", "-U", "admin", "-d", "health_mgmt", "-tAc", sql],
                          capture_output=True, text=True, check=True).stdout.strip()


def grow_to(megabytes: int) -> int:
    psql("CREATE TABLE IF NOT EXISTS bulk (id bigserial PRIMARY KEY, payload text NOT NULL)")
    while int(psql("SELECT pg_total_relation_size('bulk')")) < megabytes * 1_000_000:
        psql("INSERT INTO bulk(payload) SELECT md5(random()::text) || md5(random()::text) || md5(random()::text) "
             "|| md5(random()::text) FROM generate_series(1, 200000)")
    return int(psql("SELECT pg_total_relation_size('bulk')"))


def main() -> int:
    setup.ensure_machine()
    images.build_all()
    sandbox.up([HOST], install=False)
    work = Path(tempfile.mkdtemp(prefix="hd-bkbench-"))
    app = work / "app"
    shutil.copytree(ROOT / "deploy" / "sandbox" / "app", app)
    base = (ROOT / "env" / "sandbox.env").read_text().splitlines()
    values = {"HOSTS": HOST, "DEPLOY_PATH": "/var/lib/healthdeploy-bench/{host}/{env}", "COMPOSE_PROJECT": "hd-b{env}-{host}",
              "APP_SOURCE": str(app), "SSH_CONFIG": str(ROOT / ".sandbox/ssh_config"),
              "SSH_KNOWN_HOSTS": str(ROOT / ".sandbox/known_hosts")}
    lines = [line for line in base if line.split("=", 1)[0] not in values] + [f"{k}={v}" for k, v in values.items()]
    (work / f"{ENV_NAME}.env").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "HEALTHDEPLOY_ENV_DIR": str(work), "HEALTHDEPLOY_HOME": str(work)}
    subprocess.run(["fab", "-H", HOST, "deploy"], env=env, cwd=ROOT, check=True, capture_output=True)
    rows = []
    try:
        for target_mb in SIZES:
            size = grow_to(target_mb)
            repeat = REPEAT if target_mb < 500 else max(1, REPEAT - 1)
            ours, raw, raw_both = [], [], []
            raw_file = work / "raw.dump"
            for _ in range(repeat):  # alternate, so drift on the shared machine hits both alike
                # healthdeploy: the whole `inv backup` command, its own process
                seconds, rss, _ = run_measured(["inv", "backup", "--env", ENV_NAME, "--services", "postgres"], env=env)
                newest = sorted(p for p in (work / "backups" / ENV_NAME).iterdir() if not p.name.startswith("."))[-1]
                manifest = json.loads((newest / "manifest.json").read_text())
                dump = next(a for a in manifest["artifacts"] if a["file"] == "postgres.dump")
                ours.append((seconds, rss, dump, newest))
                # baseline: the raw OpenSSH pipe into a file
                with open(raw_file, "wb") as out:
                    raw_s, raw_rss, _ = run_measured(SSH + [f"docker exec {PG} pg_dump -Fc -U admin -d health_mgmt"],
                                                     stdout=out)
                raw.append((raw_s, raw_rss, raw_file.stat().st_size))
                # the same deliverable by hand: the dump and the roles, two raw pipes one after the other
                with open(work / "raw-globals.sql", "wb") as out:
                    globals_s, _, _ = run_measured(SSH + [f"docker exec {PG} pg_dumpall --globals-only -U admin"],
                                                   stdout=out)
                raw_both.append(raw_s + globals_s)
            ours_s, ours_rss, dump, newest = min(ours, key=lambda r: r[0])
            raw_s, raw_rss, raw_bytes = min(raw, key=lambda r: r[0])
            stream_s = min(r[2]["seconds"] for r in ours)
            mb, raw_mb = dump["bytes"] / 1e6, raw_bytes / 1e6
            best = f"best of {repeat}"
            rows.append((f"backup, {size / 1e6:,.0f} MB table data -> {mb:,.0f} MB dump: MB/s (whole command, {best})",
                         f"{mb / ours_s:,.1f}", f"{raw_mb / raw_s:,.1f}", f"{(mb / ours_s) / (raw_mb / raw_s):.2f}"))
            rows.append(("  whole command vs raw pipes for the same artifacts (pg_dump, then pg_dumpall --globals-only), s",
                         f"{ours_s:.2f}", f"{min(raw_both):.2f}", f"{min(raw_both) / ours_s:.2f}"))
            rows.append(("  the dump stream alone (from the manifest) vs the raw pipe, MB/s",
                         f"{mb / stream_s:,.1f}", f"{raw_mb / raw_s:,.1f}", f"{(mb / stream_s) / (raw_mb / raw_s):.2f}"))
            rows.append(("  seconds: whole command / raw pipe (pg_dump only)", f"{ours_s:.2f}", f"{raw_s:.2f}", "-"))
            rows.append(("  peak RSS of the local process, MB", f"{max(r[1] for r in ours):,.0f}",
                         f"{max(r[1] for r in raw):,.0f} (ssh)", "-"))
            # restore: library stream vs raw pipe, same dump file
            host = RemoteHost.connect(HOST, str(ROOT / ".sandbox/ssh_config"), str(ROOT / ".sandbox/known_hosts"))
            try:
                t0 = time.monotonic()
                with open(newest / "postgres.dump", "rb") as source:
                    host.stream_from_file(bk.postgres_restore(PG), source)
                ours_restore = time.monotonic() - t0
            finally:
                host.close()
            with open(raw_file, "rb") as source:
                raw_restore, _, _ = run_measured(SSH + [f"docker exec -i {PG} pg_restore --clean --if-exists "
                                                        "--single-transaction -U admin -d health_mgmt"], stdin=source)
            rows.append((f"restore of the {mb:,.0f} MB dump, seconds", f"{ours_restore:.1f}", f"{raw_restore:.1f}",
                         f"{raw_restore / ours_restore:.2f} (throughput ratio)"))
    finally:
        sandbox.remove_project(PROJECT)
        shutil.rmtree("/var/lib/healthdeploy-bench", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    report = ["# Backup benchmark", "", f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; "
              "sandbox host on loopback (sshd, pg_dump and the client share the cores).", "",
              "| measure | healthdeploy | raw ssh pipe | ratio |", "|---|---|---|---|"]
    report += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(report) + "\n"
    print(text)
    (ROOT / "bench" / "results" / f"backup-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
