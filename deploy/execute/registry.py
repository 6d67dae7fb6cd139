"""healthdeploy's shipping registry: Debian's ``docker-registry`` (distribution 2.8) on this machine's loopback,
started for one deploy and stopped after it, storage kept under BUILD_CACHE between deploys (docs/build.md).

Two instances over the same storage, never at the same time: a writable one while the build side pushes, then a
read-only one while the hosts pull (a host's local user who reaches the tunnel can read images, which hold no
secret, but never write into the registry). Images are addressed by digest, so a blob is stored and sent once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deploy.core.errors import HealthdeployError
from deploy.execute.local import spawn_local

BINARY = "docker-registry"
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def config_text(storage: Path, port: int, readonly: bool) -> str:
    """The registry's config (pure): loopback only, no access log, deletes off, read-only when asked."""
    lines = [
        "# Written by healthdeploy for one deploy (deploy/execute/registry.py).",
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: false",
    ]
    if readonly:
        lines += ["  maintenance:", "    readonly:", "      enabled: true"]
    lines += ["http:", f"  addr: 127.0.0.1:{port}", f"  secret: {secrets.token_hex(16)}", ""]
    return "\n".join(lines)


def locate() -> str | None:
    return shutil.which(BINARY, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop(pid: int, timeout: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class ShipRegistry:
    """One running instance; ``address`` is what a dockerd on this machine (or at the end of a reverse tunnel)
    pushes to or pulls from: 127.0.0.1:<port>, which dockerd accepts over plain HTTP."""

    root: Path  # BUILD_CACHE/registry/<env>: storage/, the config, the log, the pid file
    readonly: bool
    port: int = 0
    pid: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def config(self) -> Path:
        return self.root / ("registry-ro.yml" if self.readonly else "registry-rw.yml")

    @property
    def pid_file(self) -> Path:
        return self.root / ("registry-ro.pid" if self.readonly else "registry-rw.pid")

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def answers(self, timeout: float = 2) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=timeout) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _stop_leftover(self) -> None:
        """A registry left by a deploy that was killed (the host locks keep two deploys of one environment apart,
        so one that runs on our config is a leftover)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _alive(pid) and str(self.config) in _cmdline(pid):
            _stop(pid)
        self.pid_file.unlink(missing_ok=True)

    def start(self, timeout: float = 30) -> "ShipRegistry":
        binary = locate()
        if binary is None:
            raise HealthdeployError("docker-registry is not installed on this machine (healthdeploy ships images "
                                    "built off the host through it)",
                                    "apt-get install docker-registry, or set BUILD_ON=host")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        last = ""
        for _ in range(3):  # the free port may be taken between the probe and the bind: try another
            self.port = free_port()
            self.config.write_text(config_text(self.storage, self.port, self.readonly))
            self.pid = spawn_local([binary, "serve", str(self.config)], str(self.log))
            self.pid_file.write_text(f"{self.pid}\n")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(self.pid):
                if self.answers(timeout=1):
                    return self
                time.sleep(0.05)
            last = (self.log.read_text(errors="replace").strip().splitlines() or [""])[-1][-300:]
            self.stop()
        raise HealthdeployError("the shipping registry did not start" + (f": {last}" if last else ""),
                                f"see {self.log}")

    def stop(self) -> None:
        if self.pid:
            _stop(self.pid)
            self.pid = 0
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> "ShipRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
