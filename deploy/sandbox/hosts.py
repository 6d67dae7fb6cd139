"""The local sandbox: throwaway SSH "hosts" on loopback addresses that use this machine's Docker engine.

Each sandbox host is an OpenSSH ``sshd`` listening on 127.0.0.N:2222 with its own generated host key;
one generated client key logs in as root (the sandbox stands in for a server where the deploy user
may run Docker). State lives in ``.sandbox/`` of the project (git-ignored):

    .sandbox/id_ed25519{,.pub}    client key          .sandbox/ssh_config   Host blocks per sandbox host
    .sandbox/known_hosts          their host keys     .sandbox/hosts/<name>/{sshd_config,host key,sshd.pid}

ssh_config and known_hosts also list the running testbed nodes (deploy/sandbox/netns.py). Machine
set-up (tools, Compose, dockerd) is deploy/sandbox/setup.py.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from deploy.core.errors import HealthdeployError
from deploy.execute.local import run_local
from deploy.core.settings import PROJECT_ROOT
from deploy.sandbox import setup

SANDBOX_PORT = 2222
STATE_DIR = PROJECT_ROOT / ".sandbox"


@dataclass(frozen=True)
class SandboxHost:
    name: str
    address: str
    port: int = SANDBOX_PORT

    @property
    def dir(self) -> Path:
        return STATE_DIR / "hosts" / self.name

    def host_key_pub(self, state_dir: Path = STATE_DIR) -> Path:
        return state_dir / "hosts" / self.name / "ssh_host_ed25519_key.pub"


class SshTarget(Protocol):
    """What ssh_config and known_hosts need of a host: loopback sandbox hosts and testbed nodes."""

    name: str
    address: str
    port: int

    def host_key_pub(self, state_dir: Path = STATE_DIR) -> Path: ...


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
    return sshd_config_text(f"{host.address}:{host.port}", d / "ssh_host_ed25519_key", d / "sshd.pid",
                            state_dir / "authorized_keys")


# bash, started by sshd for every command, sources ~/.bashrc when SHLVL is unset (Debian builds it with
# SSH_SOURCE_BASHRC). The sandbox hosts log in as this machine's root, whose ~/.bashrc may run an operator's
# shell set-up: here `pyenv init`, about 100 processes and 0.1-0.7 s per command, most of a test run's forks.
# SHLVL=1 makes that bash a nested shell, which skips it; the hosts then see sshd's plain PATH, as a server does.
SESSION_ENV = {"SHLVL": "1"}


def sshd_config_text(listen: str, host_key: Path, pid_file: Path, authorized_keys: Path,
                     extra: Iterable[str] = (), env: dict[str, str] | None = None) -> str:
    # sshd reads only the first SetEnv line: every variable goes on one.
    variables = {**SESSION_ENV, **(env or {})}
    return "\n".join([
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
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
        # No ClientAliveInterval: Debian's default, so the tests see what a default server does with a client
        # that vanished without closing its connection (cut off, frozen). The lock's lease frees such a lock
        # (commands.presence), not the server.
        "Subsystem sftp internal-sftp",
        "SetEnv " + " ".join(f"{k}={v}" for k, v in variables.items()),
        *extra,
        "",
    ])


def ssh_config(hosts: Iterable[SshTarget], state_dir: Path = STATE_DIR) -> str:
    blocks = ["# Written by `inv sandbox.up` and `inv testbed.up`. Include it from ~/.ssh/config to use plain "
              "`ssh sandbox` / `ssh node1`.\n"]
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


# -- machine set-up (one routine: deploy/sandbox/setup.py) -----------------------------------------
def _say(message: str) -> None:
    print(f"sandbox: {message}", file=sys.stderr, flush=True)


def install_tools() -> None:
    """On a fresh Debian machine as root: install what is missing (kept for callers; see setup.py)."""
    setup.ensure_tools()
    setup.ensure_compose()
    Path("/run/sshd").mkdir(exist_ok=True)


def ensure_dockerd(timeout: float = 60) -> None:
    """Start dockerd unless an engine answers (kept for callers; see setup.py)."""
    setup.ensure_dockerd(timeout)


def _pid_alive(pidfile: Path) -> int | None:
    return setup.live_pid(pidfile, "sshd")


# -- sandbox hosts ---------------------------------------------------------------------------------
def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ensure_client_key(state_dir: Path) -> None:
    key = state_dir / "id_ed25519"
    # Under a lock: on a fresh clone the test workers all start at once, and two that both saw no key made two,
    # the second overwriting the key the first had just authorised on its testbed nodes.
    with open(state_dir / ".client-key.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not key.exists():
            run_local(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "healthdeploy-sandbox", "-f", str(key)])
        public = (state_dir / "id_ed25519.pub").read_text()
        if not (state_dir / "authorized_keys").exists() or (state_dir / "authorized_keys").read_text() != public:
            (state_dir / "authorized_keys").write_text(public)


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
    config = d / "sshd_config"
    text = sshd_config(host, state_dir)
    changed = not config.exists() or config.read_text() != text
    config.write_text(text)
    pid = _pid_alive(d / "sshd.pid")
    if pid and _listening(host.address, host.port):
        if changed:  # a config of an older checkout: sshd re-executes itself with the new one
            run_local([setup.require("sshd"), "-t", "-f", str(config)])
            os.kill(pid, signal.SIGHUP)
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
    sshd = setup.require("sshd")
    run_local([sshd, "-t", "-f", str(d / "sshd_config")])
    run_local([sshd, "-f", str(d / "sshd_config")])
    deadline = time.monotonic() + 10
    while not _listening(host.address, host.port):
        if time.monotonic() > deadline:
            raise HealthdeployError(f"sshd for {host.name} did not listen on {host.address}:{host.port}")
        time.sleep(0.05)


def known_hosts_line(host: SshTarget, pub_key_text: str) -> str:
    kind, key = pub_key_text.split()[:2]
    name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    return f"{name} {kind} {key}"


def known_hosts_lines(hosts: Iterable[SshTarget], state_dir: Path = STATE_DIR) -> list[str]:
    return [known_hosts_line(host, host.host_key_pub(state_dir).read_text()) for host in hosts]


def write_client_files(state_dir: Path = STATE_DIR, extra: Iterable[SshTarget] = ()) -> list[SshTarget]:
    """ssh_config + known_hosts for every running sandbox host and testbed node (and ``extra``)."""
    from deploy.sandbox import netns  # netns uses this module for the client key

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One writer at a time, each listing what runs once it holds the lock: without it, a worker that listed
    # the sandbox hosts before another worker's testbed nodes were up could write last and drop their entries
    # (every Swarm test then failed at once when that module started first).
    with open(state_dir / ".client-files.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        targets: dict[str, SshTarget] = {}
        for host in [*running_hosts(state_dir), *netns.running_nodes(), *extra]:
            targets[host.name] = host
        ordered = sorted(targets.values(), key=lambda h: tuple(int(x) for x in h.address.split(".")))
        for name, text in (("ssh_config", ssh_config(ordered, state_dir)),
                           ("known_hosts", "".join(line + "\n" for line in known_hosts_lines(ordered, state_dir)))):
            path = state_dir / name
            if not path.exists() or path.read_text() != text:
                # Atomic: a fab reading it while another worker brings hosts up sees the old file or the new one.
                tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
    return ordered


def running_hosts(state_dir: Path = STATE_DIR) -> list[SandboxHost]:
    hosts_dir = state_dir / "hosts"
    names = sorted(p.name for p in hosts_dir.iterdir()) if hosts_dir.is_dir() else []
    return [host_for(n) for n in names if _pid_alive(hosts_dir / n / "sshd.pid")]


def ensure_client_key(state_dir: Path = STATE_DIR) -> Path:
    """The sandbox client key (one per checkout); returns its public key file."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _ensure_client_key(state_dir)
    return state_dir / "id_ed25519.pub"


def up(names: list[str], state_dir: Path = STATE_DIR, install: bool = True) -> list[SandboxHost]:
    """Bring up the named sandbox hosts (idempotent) and write ssh_config + known_hosts for all running ones."""
    if install:
        setup.ensure_machine()
    import fcntl

    ensure_client_key(state_dir)
    wanted = [host_for(n) for n in names]
    with open(state_dir / ".up.lock", "w") as lock:  # parallel test workers bring up their hosts one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        for host in wanted:
            start_host(host, state_dir)
        write_client_files(state_dir, extra=wanted)
    return sorted({*running_hosts(state_dir), *wanted}, key=lambda h: h.address)


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
