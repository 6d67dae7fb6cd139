"""Foundation over real SSH: strict host keys, ~/.ssh/config aliases, verified binary streaming."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import threading
import time

import paramiko
import pytest

from sandbox_env import MAIN, MAIN_ADDRESS
from deploy.commands import cmd
from deploy.commands import lock as lk
from deploy.execute.executor import ConnectionLost
from deploy.facts.lock import lock_status, parse_lock
from deploy.core.errors import HealthdeployError, IntegrityError, RemoteCommandError
from deploy.core.settings import PROJECT_ROOT
from deploy.execute.ssh import RemoteHost

SSH_CONFIG = str(PROJECT_ROOT / ".sandbox/ssh_config")
KNOWN_HOSTS = str(PROJECT_ROOT / ".sandbox/known_hosts")


def test_a_real_fab_task_runs_over_ssh_and_starts_a_container(make_env):
    """`fab -H sandbox5 deploy` reaches sshd, runs Docker there and starts containers (the gateway among them)."""
    env = make_env("ssh")
    proc = env.fab("deploy")
    assert proc.returncode == 0, proc.stderr
    names = subprocess.run(["docker", "ps", "--filter", "label=com.docker.compose.project=hd-tssh-" + MAIN,
                            "--format", "{{.Names}}"], capture_output=True, text=True).stdout.split()
    assert f"hd-tssh-{MAIN}-gateway-1" in names and f"hd-tssh-{MAIN}-backend-1" in names


def test_unknown_host_key_is_refused_then_trusted_by_fingerprint(make_env, tmp_path):
    env = make_env("hk")
    known = tmp_path / "known_hosts"
    env.write(SSH_KNOWN_HOSTS=str(known))
    proc = env.fab("releases")
    assert proc.returncode == 6, proc.stderr
    assert f"error: host key of {MAIN} ([{MAIN_ADDRESS}]:2222) is not in {known}" in proc.stderr
    fingerprint = proc.stderr.split("SHA256:")[1].split()[0]
    wrong = env.fab("hosts.trust", "--fingerprint", "SHA256:AAAAwrongwrongwrong")
    assert wrong.returncode == 1 and "not SHA256:AAAAwrongwrongwrong" in wrong.stderr
    assert not known.exists()
    trusted = env.fab("hosts.trust", "--fingerprint", f"SHA256:{fingerprint}")
    assert trusted.returncode == 0, trusted.stderr
    assert f"[{MAIN_ADDRESS}]:2222 ssh-ed25519" in known.read_text()
    assert env.fab("releases").returncode == 0


def test_changed_host_key_is_refused(make_env, tmp_path):
    env = make_env("hkc")
    other = paramiko.Ed25519Key.from_private_key_file(str(PROJECT_ROOT / ".sandbox/id_ed25519"))  # any other key
    known = tmp_path / "known_hosts"
    known.write_text(f"[{MAIN_ADDRESS}]:2222 ssh-ed25519 {other.get_base64()}\n")
    env.write(SSH_KNOWN_HOSTS=str(known))
    proc = env.fab("releases")
    assert proc.returncode == 6, proc.stderr
    assert f"host key of {MAIN} ({MAIN_ADDRESS}) CHANGED" in proc.stderr and "refusing to connect" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fab_honours_an_alias_in_home_ssh_config(make_env, tmp_path):
    """`fab -H prodlike ...` with HostName/Port/User/IdentityFile only in ~/.ssh/config; env found from the host."""
    env = make_env("alias")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host prodlike\n  HostName {MAIN_ADDRESS}\n  Port 2222\n  User root\n"
        f"  IdentityFile {PROJECT_ROOT / '.sandbox/id_ed25519'}\n  IdentitiesOnly yes\n")
    (home / ".ssh" / "known_hosts").write_text(
        next(line for line in open(KNOWN_HOSTS) if line.startswith(f"[{MAIN_ADDRESS}]")))
    env.write(hosts="prodlike", SSH_CONFIG="~/.ssh/config", SSH_KNOWN_HOSTS="~/.ssh/known_hosts")
    proc = env.run("fab", "-H", "prodlike", "lock.status", "--json", extra_env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert '"host": "prodlike"' in proc.stdout and '"state": "free"' in proc.stdout


def test_unreachable_host_is_one_clear_line(make_env):
    env = make_env("down")
    env.write(hosts="nohost-hd")  # not a Host in ssh_config, and not a name DNS knows: a bad setting (exit 2)
    proc = env.fab("releases", hosts="nohost-hd")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot reach nohost-hd: nohost-hd is neither a Host in")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def remote(sandbox_hosts):
    host = RemoteHost.connect(MAIN, SSH_CONFIG, KNOWN_HOSTS)
    yield host
    host.close()


def test_streaming_is_binary_safe_and_checksummed(remote, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(24 << 20) + bytes(range(256)) * 1000)
    target = tmp_path / "copy.bin"
    with open(target, "wb") as out:
        result = remote.stream_to_file(cmd("cat", str(blob)), out)
    assert target.read_bytes() == blob.read_bytes()
    assert result.sha256 == result.remote_sha256 == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert result.bytes == blob.stat().st_size
    assert remote.cipher.startswith("aes128-gcm")
    back = tmp_path / "back.bin"
    with open(blob, "rb") as source:
        up = remote.stream_from_file(cmd("sh", "-c", 'cat > "$0"', str(back)), source)
    assert up.sha256 == up.remote_sha256 and back.read_bytes() == blob.read_bytes()


def test_a_stream_that_fails_halfway_is_an_error(remote, tmp_path):
    with pytest.raises(RemoteCommandError, match="exit status 3"):
        remote.stream_to_file(cmd("sh", "-c", "head -c 100000 /dev/urandom; echo boom >&2; exit 3"), io.BytesIO())


def test_a_missing_or_wrong_remote_checksum_is_an_integrity_error(remote):
    from deploy.execute.ssh import StreamResult

    command = cmd("pg_dump", "db")
    with pytest.raises(IntegrityError, match="the remote checksum never arrived after 10 bytes"):
        remote._check_stream(command, StreamResult(10, "a" * 64, None, 0, 0.1, ""))
    with pytest.raises(IntegrityError, match="checksum mismatch after 10 bytes"):
        remote._check_stream(command, StreamResult(10, "a" * 64, "b" * 64, 0, 0.1, ""))


def test_a_remote_reader_that_dies_early_is_one_clear_error(remote, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    with open(big, "rb") as source, pytest.raises(RemoteCommandError, match="exit status 7"):
        remote.stream_from_file(cmd("sh", "-c", "head -c 1000 >/dev/null; echo disk full >&2; exit 7"), source)


def _processes(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_a_command_at_its_deadline_is_killed_on_the_host(remote):
    """Not only our channel: the command's whole process group on the host (a timed-out migration must not
    overlap the next attempt)."""
    first, second = 3000 + os.getpid() % 997, 4000 + os.getpid() % 997  # unlike any other sleep on the machine
    command = cmd("sh", "-c", f"sleep {first} & sleep {second}", description="a hung command")
    with pytest.raises(HealthdeployError, match=r"a hung command on .* timed out after 2s and was killed on the host"):
        remote.run(command, timeout=2)
    time.sleep(3)
    assert not _processes(f"sleep {first}") and not _processes(f"sleep {second}")


def test_a_command_whose_connection_drops_is_killed_on_the_host(sandbox_hosts):
    """Our process gone (the connection closes): the host's watchdog ends the command's process group."""
    host = RemoteHost.connect(MAIN, SSH_CONFIG, KNOWN_HOSTS)
    def run():
        with pytest.raises(HealthdeployError):
            host.run(cmd("sleep", "317", description="a long command"), check=False)

    started = threading.Thread(target=run, daemon=True)
    started.start()
    deadline = time.monotonic() + 10
    while not _processes("sleep 317") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes("sleep 317")
    host.connection.transport.sock.close()  # as if we were killed
    deadline = time.monotonic() + 10
    while _processes("sleep 317") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes("sleep 317")


def test_a_held_lock_lives_on_its_heartbeat_and_a_silent_one_ends_its_connection(sandbox_hosts, tmp_path):
    """Over real sshd (Debian's defaults, no ClientAliveInterval): the heartbeat renews the lease for as long as
    we hold the lock; a holder that hears nothing for its lease frees the lock and ends our connection, so our
    next command fails as a lost connection instead of running without the lock."""
    lock_dir = str(tmp_path / ".lock")  # the sandbox host shares this machine's file system
    host = RemoteHost.connect(MAIN, SSH_CONFIG, KNOWN_HOSTS)
    try:
        held = host.hold(lk.lock_hold(lock_dir, lease_s=4))
        assert held.first_line == "acquired"
        time.sleep(9)  # two leases and more: only the heartbeat (every 3 s) keeps it
        assert parse_lock(host.run(lock_status(lock_dir)).text).state == "held"
        host.run(lk.lock_release(lock_dir))
        held.close()
        silent = dataclasses.replace(lk.lock_hold(lock_dir, lease_s=2), heartbeat_s=None)  # a frozen operator
        assert host.hold(silent).first_line == "acquired"
        deadline = time.monotonic() + 15
        while os.path.exists(lock_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not os.path.exists(lock_dir)
        with pytest.raises(ConnectionLost):
            for _ in range(20):  # the fence may take a moment to close the transport
                host.run(cmd("true", description="a command after the lease"))
                time.sleep(0.25)
    finally:
        host.close()
