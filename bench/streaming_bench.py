"""Streaming a remote command's stdout to a local file: healthdeploy's verified channel vs OpenSSH.

healthdeploy: `RemoteHost.stream_to_file` (tuned paramiko channel, client rekey off, SHA-256 on both
ends) run in its own process so its peak RSS is measured. Baselines: `ssh host cat FILE > out` with the
default cipher and with aes128-gcm. 256 MiB and 1 GiB of random bytes on the sandbox host `sandbox`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.sandbox import hosts as sandbox  # noqa: E402

CFG = str(ROOT / ".sandbox/ssh_config")
KNOWN = str(ROOT / ".sandbox/known_hosts")
OURS = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from deploy.commands import cmd
from deploy.execute.ssh import RemoteHost
host = RemoteHost.connect("sandbox", {CFG!r}, {KNOWN!r})
with open(sys.argv[2], "wb") as out:
    result = host.stream_to_file(cmd("cat", sys.argv[1]), out)
assert result.sha256 == result.remote_sha256
"""


def measured(argv, stdout=None) -> tuple[float, float]:
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"bench: {argv[:3]} failed: {proc.stderr.read().decode()[-500:]}")
    return time.monotonic() - started, usage.ru_maxrss / 1024


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    sandbox.up(["sandbox"], install=False)
    work = Path("/var/tmp/hd-stream-bench")
    work.mkdir(exist_ok=True)
    rows = []
    try:
        for size_mib in (256, 1024):
            blob = work / f"blob-{size_mib}"
            if not blob.exists() or blob.stat().st_size != size_mib << 20:
                subprocess.run(["head", "-c", str(size_mib << 20), "/dev/urandom"], stdout=open(blob, "wb"), check=True)
            expected = sha(blob)
            out = work / "out"
            results = {}
            for name, argv, to_stdout in (
                ("healthdeploy", [sys.executable, "-c", OURS, str(blob), str(out)], False),
                ("ssh default", ["ssh", "-F", CFG, "sandbox", "cat", str(blob)], True),
                ("ssh aes128-gcm", ["ssh", "-F", CFG, "-c", "aes128-gcm@openssh.com", "sandbox", "cat", str(blob)], True),
            ):
                best = None
                for _ in range(3):  # best of three: the host is shared
                    with open(out, "wb") as f:
                        seconds, rss = measured(argv, stdout=f if to_stdout else None)
                    assert sha(out) == expected, f"{name}: output differs"
                    if best is None or seconds < best[0]:
                        best = (seconds, rss)
                results[name] = best
            ours = (size_mib * 1.048576) / results["healthdeploy"][0]
            for name in ("ssh default", "ssh aes128-gcm"):
                theirs = (size_mib * 1.048576) / results[name][0]
                rows.append((f"{size_mib} MiB vs {name}: MB/s", f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}"))
            rows.append((f"{size_mib} MiB: peak RSS MB (whole process)", f"{results['healthdeploy'][1]:,.0f}",
                         f"{results['ssh default'][1]:,.0f} (ssh)", "-"))
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    text = "\n".join(["# Streaming benchmark", "",
                      f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, loopback sshd; "
                      "MB/s = 10^6 B / (process start -> exit), Python start-up and handshake included; best of 3; "
                      "every output checked by SHA-256.", "",
                      "| measure | healthdeploy | OpenSSH | ratio |", "|---|---|---|---|"]
                     + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]) + "\n"
    print(text)
    (ROOT / "bench" / "results" / f"streaming-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
