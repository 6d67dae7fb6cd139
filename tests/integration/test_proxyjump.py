"""Strict host keys on every hop, against real sshd: two jump hosts and a target of our own (sshd on
127.0.0.241/.243/.242 port 2222, state in a temporary directory, stopped at the end by pid). The target is
reached through ProxyJump (one and two hops, OpenSSH's order) and through a ProxyCommand (`ssh -W`)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from deploy.core.settings import PROJECT_ROOT
from deploy.sandbox.hosts import _listening, sshd_config_text

KEY = PROJECT_ROOT / ".sandbox" / "id_ed25519"
HOSTS = {"hd-jump1": "127.0.0.241", "hd-target": "127.0.0.242", "hd-jump2": "127.0.0.243"}
PORT = 2222


def fp(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


class Sshd:
    def __init__(self, state: Path, name: str, address: str):
        self.name, self.address, self.dir = name, address, state / name
        self.dir.mkdir(parents=True)
        self.key = self.dir / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.log = self.dir / "sshd.log"
        self.config = self.dir / "sshd_config"
        self.config.write_text(sshd_config_text(f"{address}:{PORT}", self.key, self.dir / "sshd.pid",
                                                PROJECT_ROOT / ".sandbox" / "authorized_keys", ["LogLevel DEBUG1"]))
        self.pid = None

    @property
    def fingerprint(self) -> str:
        return fp(self.key.with_suffix(".pub"))

    def start(self):
        subprocess.run(["/usr/sbin/sshd", "-f", str(self.config), "-E", str(self.log)], check=True)
        deadline = time.monotonic() + 10
        pid_file = self.dir / "sshd.pid"
        # sshd listens before it writes its pid file (a loaded machine read it empty once)
        while not (_listening(self.address, PORT) and pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, f"sshd {self.name} did not start"
            time.sleep(0.05)
        self.pid = int(pid_file.read_text())

    def stop(self):
        if self.pid:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _listening(self.address, PORT) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pid = None


@pytest.fixture(scope="module")
def hops(sandbox_hosts, tmp_path_factory):
    state = tmp_path_factory.mktemp("hops")
    # Our own leftovers first, by name: sshd of an earlier run that stopped before recording their pids.
    subprocess.run(["pkill", "-f", r"^sshd: /usr/sbin/sshd -f /tmp/.*/hops[0-9]*/hd-(jump1|jump2|target)/sshd_config"])
    deadline = time.monotonic() + 5
    while any(_listening(a, PORT) for a in HOSTS.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for address in HOSTS.values():
        assert not _listening(address, PORT), f"{address}:{PORT} is taken"
    servers = {name: Sshd(state, name, address) for name, address in HOSTS.items()}
    try:
        for server in servers.values():
            server.start()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    known = state / "known_hosts"
    block = (f"  Port {PORT}\n  User root\n  IdentityFile {KEY}\n  IdentitiesOnly yes\n"
             f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n")
    config = state / "ssh_config"
    config.write_text(
        f"Host hd-target\n  HostName {HOSTS['hd-target']}\n  ProxyJump hd-jump1\n{block}"
        f"Host hd-target2\n  HostName {HOSTS['hd-target']}\n  ProxyJump hd-jump1,hd-jump2\n{block}"
        f"Host hd-viacmd\n  HostName {HOSTS['hd-target']}\n  ProxyCommand ssh -F {config} -W %h:%p hd-jump1\n{block}"
        f"Host hd-jump1\n  HostName {HOSTS['hd-jump1']}\n{block}"
        f"Host hd-jump2\n  HostName {HOSTS['hd-jump2']}\n{block}")
    yield servers, config, known
    for server in servers.values():
        server.stop()


def use(env, host, config, known):
    env.write(hosts=host, SSH_CONFIG=str(config), SSH_KNOWN_HOSTS=str(known))


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_jump_host_keys_are_strict_and_trusted_hop_by_hop(make_env, hops):
    servers, config, known = hops
    jump, target = servers["hd-jump1"], servers["hd-target"]
    env = make_env("pj")
    use(env, "hd-target", config, known)

    # An unknown jump host is refused like an unknown final host: exit 6, its fingerprint, the trust hint.
    proc = env.fab("releases", hosts="hd-target")
    assert proc.returncode == 6, proc.stderr
    (line,) = errors(proc)
    assert f"host key of hd-jump1 (jump host 1 of 1 to hd-target) ([{jump.address}]:{PORT}) is not in {known}" in line
    assert jump.fingerprint in line and "fab -H hd-target hosts.trust" in line

    # Trust shows every hop; without the jump host's own fingerprint nothing is guessed.
    proc = env.fab("hosts.trust", "--fingerprint", target.fingerprint, hosts="hd-target")
    assert proc.returncode == 2, proc.stderr
    assert f"hd-jump1 (jump host 1 of 1 to hd-target) ([{jump.address}]:{PORT}) presents ssh-ed25519 {jump.fingerprint}" in proc.stdout
    assert "--hop hd-jump1=SHA256:" in errors(proc)[0] and not known.exists()
    # A wrong hop fingerprint is refused.
    proc = env.fab("hosts.trust", "--fingerprint", target.fingerprint, "--hop", "hd-jump1=SHA256:wrongwrong", hosts="hd-target")
    assert proc.returncode == 1 and "not SHA256:wrongwrong" in proc.stderr and not known.exists()

    before = jump.log.read_text().count("server_request_direct_tcpip")
    proc = env.fab("hosts.trust", "--fingerprint", target.fingerprint, "--hop", f"hd-jump1={jump.fingerprint}",
                   hosts="hd-target")
    assert proc.returncode == 0, proc.stderr
    text = known.read_text()
    assert f"[{jump.address}]:{PORT} ssh-ed25519" in text and f"[{target.address}]:{PORT} ssh-ed25519" in text
    # The target's key was fetched THROUGH the (verified) jump host, not by connecting to it directly.
    log = jump.log.read_text()
    assert log.count("server_request_direct_tcpip") > before and f"to {target.address} port {PORT}" in log
    assert env.fab("releases", hosts="hd-target").returncode == 0

    # Trusting again changes nothing and says so.
    again = env.fab("hosts.trust", hosts="hd-target")
    assert again.returncode == 0 and again.stdout.count("already trusted") == 2

    # The jump host's key changes: refused when used as a hop (exit 6, CHANGED), for commands and for trust --yes.
    other = paramiko.Ed25519Key.from_private_key_file(str(KEY))
    known.write_text("".join(line if not line.startswith(f"[{jump.address}]") else
                             f"[{jump.address}]:{PORT} ssh-ed25519 {other.get_base64()}\n"
                             for line in text.splitlines(keepends=True)))
    proc = env.fab("releases", hosts="hd-target")
    assert proc.returncode == 6, proc.stderr
    (line,) = errors(proc)
    assert f"host key of hd-jump1 (jump host 1 of 1 to hd-target) ({jump.address}) CHANGED" in line
    assert "refusing to connect" in line and "Traceback" not in proc.stderr
    proc = env.fab("hosts.trust", "--yes", hosts="hd-target")
    assert proc.returncode == 2 and "changed host key of hd-jump1" in proc.stderr
    proc = env.fab("hosts.trust", "--hop", f"hd-jump1={jump.fingerprint}", hosts="hd-target")
    assert proc.returncode == 0, proc.stderr
    assert env.fab("releases", hosts="hd-target").returncode == 0

    # Without the jump host the target cannot be reached or trusted, though its own sshd runs: no direct path.
    jump.stop()
    try:
        proc = env.fab("hosts.trust", hosts="hd-target")
        assert proc.returncode == 1 and "cannot reach hd-jump1" in proc.stderr, proc.stderr
        proc = env.fab("releases", hosts="hd-target")
        assert proc.returncode == 1 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        jump.start()


def test_two_jump_hosts_in_openssh_order_and_a_proxycommand(make_env, hops):
    servers, config, known = hops
    jump1, jump2, target = servers["hd-jump1"], servers["hd-jump2"], servers["hd-target"]
    env = make_env("pj2")
    known.write_text("")
    use(env, "hd-target2", config, known)
    proc = env.fab("hosts.trust", "--fingerprint", target.fingerprint,
                   "--hop", f"hd-jump1={jump1.fingerprint},hd-jump2={jump2.fingerprint}", hosts="hd-target2")
    assert proc.returncode == 0, proc.stderr
    order = [line.split(" ")[0] for line in proc.stdout.splitlines() if " presents " in line]
    assert order == ["hd-jump1", "hd-jump2", "hd-target2"]
    # ProxyJump hd-jump1,hd-jump2: jump1 forwards to jump2, jump2 forwards to the target.
    assert f"to {jump2.address} port {PORT}" in jump1.log.read_text()
    assert f"to {target.address} port {PORT}" in jump2.log.read_text()
    assert env.fab("releases", hosts="hd-target2").returncode == 0
    # jump2's key changes: exit 6 naming the second hop.
    lines = [line for line in known.read_text().splitlines() if not line.startswith(f"[{jump2.address}]")]
    known.write_text("\n".join(lines) + "\n")
    proc = env.fab("releases", hosts="hd-target2")
    assert proc.returncode == 6 and "hd-jump2 (jump host 2 of 2 to hd-target2)" in proc.stderr, proc.stderr

    # ProxyCommand: the program is OpenSSH (`ssh -W`, checking hd-jump1 against the same known_hosts); the host
    # reached through it is checked by healthdeploy.
    env3 = make_env("pj3")
    use(env3, "hd-viacmd", config, known)
    assert env3.fab("releases", hosts="hd-viacmd").returncode == 0
    other = paramiko.Ed25519Key.from_private_key_file(str(KEY))
    lines = [line for line in known.read_text().splitlines() if not line.startswith(f"[{target.address}]")]
    known.write_text("\n".join(lines + [f"[{target.address}]:{PORT} ssh-ed25519 {other.get_base64()}"]) + "\n")
    proc = env3.fab("releases", hosts="hd-viacmd")
    assert proc.returncode == 6 and f"host key of hd-viacmd ({target.address}) CHANGED" in proc.stderr, proc.stderr
    proc = env3.fab("hosts.trust", "--fingerprint", target.fingerprint, hosts="hd-viacmd")
    assert proc.returncode == 0, proc.stderr
    assert env3.fab("releases", hosts="hd-viacmd").returncode == 0
