"""The bad-input catalogue, the cases that reach a host (the fast half is tests/unit/test_bad_input_offline.py).

One deployed sandbox env (module scope) serves every case. Each case: the documented exit code
(docs/exit-codes.md), exactly one `error: <what> (<how>)` line, no traceback, and the host exactly as it was:
the deploy tree (every path with the SHA-256 of each file) and `docker ps -a` of the project compared before
and after. The env file is changed for a case and put back afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deploy.core.console import Console
from deploy.core.settings import PROJECT_ROOT, load_settings
from deploy.execute.session import Session
from deploy.execute.ssh import RemoteHost
from deploy.sandbox import hosts as sandbox
from deploy.stack.render import Target
from sandbox_env import MAIN, MAIN_ADDRESS, TEST_HOSTS, _cleanup, get_json, new_env

SSH_DIR = PROJECT_ROOT / ".sandbox"
# A host of our own for "Docker/Compose missing": an sshd on the address of our third sandbox host, on another
# port, whose sessions run with a PATH that lacks docker (or with a docker that has no compose plugin).
BARE = (sandbox.host_for(TEST_HOSTS[2]).address, 2299)


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "badin")
    _cleanup(env)
    proc = env.fab("deploy")
    assert proc.returncode == 0, proc.stderr
    yield env
    _cleanup(env)


@pytest.fixture
def case(env):
    """The env as deployed; its env file and the backend's build id put back after the case."""
    build_id = (env.app / "backend" / "build_id").read_text()
    yield env
    env.write()
    (env.app / "backend" / "build_id").write_text(build_id)


def snapshot(env, host: str = MAIN) -> tuple[dict, str]:
    """(deploy tree: path -> sha256 / link target / dir, `docker ps -a` of the project)."""
    root, tree = env.deploy_root(host), {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            tree[rel] = "dir"
        else:
            tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    ps = subprocess.run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={env.project_prefix}-{host}",
                         "--format", "{{.ID}} {{.Names}} {{.Image}} {{.State}} {{.CreatedAt}}"],
                        capture_output=True, text=True, check=True).stdout
    return tree, "\n".join(sorted(ps.splitlines()))


def refused(proc, code: int, *fragments: str) -> str:
    where = f"\nexit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == code, where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    print(f"exit {proc.returncode}: " + " | ".join(errors))  # the catalogue line (pytest -s shows it)
    assert len(errors) == 1, where
    assert re.fullmatch(r"error: \S.* \(\S.*\)", errors[0]), f"no '(how to fix)' in {errors[0]!r}"
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def unchanged(env, before, host: str = MAIN) -> None:
    after = snapshot(env, host)
    assert after[1] == before[1], "containers changed"
    changed = {k for k in before[0].keys() | after[0].keys() if before[0].get(k) != after[0].get(k)}
    assert not changed, f"deploy tree changed: {sorted(changed)}"


def gateway_serves() -> dict:
    return get_json(f"http://{MAIN_ADDRESS}:5000/health")


# -- hosts ------------------------------------------------------------------------------------------------
def test_unresolvable_host_among_several_leaves_the_others_untouched(case):
    case.write(hosts=f"{MAIN},nosuch.invalid", ROLES=f"{MAIN}=both,nosuch.invalid=app")
    before = snapshot(case)
    proc = case.run("fab", "deploy", "--env", case.name, "--json")
    refused(proc, 2, "cannot reach nosuch.invalid: nosuch.invalid is neither a Host in", "fix HOSTS")
    hosts = {h["host"]: h["result"] for h in json.loads(proc.stdout)["hosts"]}
    assert hosts == {MAIN: "skipped", "nosuch.invalid": "failed"}
    assert json.loads(proc.stdout)["error"]["exit_code"] == 2
    unchanged(case, before)


def test_unreachable_host_among_several_leaves_the_others_untouched(case, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text((SSH_DIR / "ssh_config").read_text() + f"\nHost down\n  HostName {BARE[0]}\n  Port 2298\n")
    case.write(hosts=f"{MAIN},down", ROLES=f"{MAIN}=both,down=app", SSH_CONFIG=str(config))
    before = snapshot(case)
    refused(case.run("fab", "deploy", "--env", case.name), 1, f"cannot reach down ({BARE[0]}:2298)",
            "check HostName/Port")
    unchanged(case, before)


def test_changed_host_key(case, tmp_path):
    known = tmp_path / "known_hosts"
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    known.write_text(f"[{MAIN_ADDRESS}]:2222 {kind} {key}\n")
    case.write(SSH_KNOWN_HOSTS=str(known))
    before = snapshot(case)
    refused(case.fab("deploy"), 6, f"host key of {MAIN} ({MAIN_ADDRESS}) CHANGED", "verify the new key out of band",
            "hosts.trust")
    unchanged(case, before)


def test_wrong_user(case, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text((SSH_DIR / "ssh_config").read_text().replace("User root", "User nobody"))
    case.write(SSH_CONFIG=str(config))
    before = snapshot(case)
    refused(case.fab("deploy"), 1, f"authentication to {MAIN} (nobody@{MAIN_ADDRESS}:2222) failed",
            "check User/IdentityFile")
    unchanged(case, before)


def test_wrong_key(case, tmp_path):
    key = tmp_path / "id_other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "ssh_config"
    config.write_text((SSH_DIR / "ssh_config").read_text().replace(str(SSH_DIR / "id_ed25519"), str(key)))
    case.write(SSH_CONFIG=str(config))
    before = snapshot(case)
    refused(case.fab("deploy"), 1, f"authentication to {MAIN} (root@{MAIN_ADDRESS}:2222) failed",
            "check User/IdentityFile")
    unchanged(case, before)


# -- a host without Docker or Compose --------------------------------------------------------------------
SESSION = """#!/bin/sh
case "$(cat {mode})" in
  nodocker) PATH={nodocker} ;;
  nocompose) PATH={nocompose}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ;;
esac
export PATH
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""
NO_COMPOSE = """#!/bin/sh
[ "$1" = compose ] && { echo "docker: 'compose' is not a docker command." >&2; exit 1; }
exec /usr/local/bin/docker "$@"
"""


@pytest.fixture(scope="module")
def bare_host(sandbox_hosts, tmp_path_factory):
    """alias `bare`: an sshd of ours whose sessions find no docker (mode nodocker) or no compose (nocompose)."""
    d = tmp_path_factory.mktemp("bare")
    nodocker, nocompose = d / "nodocker-bin", d / "nocompose-bin"
    nodocker.mkdir()
    nocompose.mkdir()
    for directory in ("/usr/bin", "/usr/sbin"):
        for tool in Path(directory).iterdir():
            if not tool.name.startswith("docker") and not (nodocker / tool.name).exists():
                (nodocker / tool.name).symlink_to(tool)
    (nocompose / "docker").write_text(NO_COMPOSE)
    (nocompose / "docker").chmod(0o755)
    (d / "mode").write_text("nodocker")
    (d / "session").write_text(SESSION.format(mode=d / "mode", nodocker=nodocker, nocompose=nocompose))
    (d / "session").chmod(0o755)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    (d / "sshd_config").write_text(sandbox.sshd_config_text(
        f"{BARE[0]}:{BARE[1]}", d / "host_key", d / "sshd.pid", SSH_DIR / "authorized_keys",
        extra=[f"ForceCommand {d / 'session'}"]))
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config")], check=True)
    deadline = time.monotonic() + 10
    while not (d / "sshd.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    (d / "ssh_config").write_text((SSH_DIR / "ssh_config").read_text() + "\n".join([
        "", "Host bare", f"  HostName {BARE[0]}", f"  Port {BARE[1]}", "  User root",
        f"  IdentityFile {SSH_DIR / 'id_ed25519'}", "  IdentitiesOnly yes", ""]))
    kind, key = (d / "host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[{BARE[0]}]:{BARE[1]} {kind} {key}\n")
    yield d
    os.kill(int((d / "sshd.pid").read_text()), signal.SIGTERM)


@pytest.mark.parametrize("mode, problem", [
    ("nodocker", "Docker is not installed or not running (docker version failed)"),
    ("nocompose", "Docker Compose v2 is missing (docker compose version failed)"),
])
def test_host_without_docker_or_compose_is_refused_by_preflight(case, bare_host, mode, problem):
    (bare_host / "mode").write_text(mode)
    case.write(hosts="bare", SSH_CONFIG=str(bare_host / "ssh_config"), SSH_KNOWN_HOSTS=str(bare_host / "known_hosts"))
    before = snapshot(case, "bare")
    proc = case.run("fab", "deploy", "--env", case.name, "--json")
    refused(proc, 3, f"bare: {problem}", "fix the host, nothing was changed")
    assert json.loads(proc.stdout)["hosts"][0]["result"] == "refused"
    unchanged(case, before, "bare")
    assert not case.deploy_root("bare").exists()


# -- preflight and what settings validation refuses before connecting ------------------------------------
def test_low_disk_is_refused_by_preflight(case):
    case.write(MIN_FREE_DISK_MB="999999999")
    before = snapshot(case)
    proc = case.fab("deploy", "--json")
    refused(proc, 3, "MIN_FREE_DISK_MB is 999999999", "fix the host, nothing was changed")
    document = json.loads(proc.stdout)
    assert document["hosts"][0]["result"] == "refused" and document["error"]["exit_code"] == 3
    unchanged(case, before)


@pytest.mark.parametrize("overrides, fragment", [
    ({"BACKEND_MEMORY": "lots"}, "BACKEND_MEMORY: 'lots' is not a memory size"),
    ({"SERVER_NAMES": "a.test; include /etc/passwd"}, "SERVER_NAMES: 'a.test; include /etc/passwd' is not a host name"),
], ids=["compose-limit", "nginx-server-name"])
def test_what_the_host_would_refuse_is_refused_before_connecting(case, overrides, fragment):
    """Compose (`docker compose config`) and nginx (`nginx -t`) would refuse these on the host, after the upload
    and ~20 s of work; settings validation refuses them before any connection, and the gateway keeps serving."""
    case.write(**overrides)
    before = snapshot(case)
    serving = gateway_serves()
    proc = case.fab("deploy")
    refused(proc, 2, fragment)
    assert proc.stderr.count("\n") == 1  # the error line only: nothing connected, nothing planned
    unchanged(case, before)
    assert gateway_serves()["build"] == serving["build"]


# -- day two -------------------------------------------------------------------------------------------
def test_rollback_to_an_unknown_release(case):
    before = snapshot(case)
    refused(case.fab("rollback", "--to", "20990101T000000Z-nosuch"), 2, f"{MAIN}: no release 20990101T000000Z-nosuch",
            "pick one of: 20")
    unchanged(case, before)  # refused before the lock: not even an audit entry


def test_exec_reports_the_remote_status_as_100_plus_n(case):
    before = snapshot(case)
    proc = case.fab("exec", "backend", "--", "sh", "-c", "exit 3")
    refused(proc, 103, f"{MAIN}: the command exited with status 3", "100+N: 103")
    unchanged(case, before)


# -- the host lock -----------------------------------------------------------------------------------------
@pytest.fixture
def session(case):
    s = load_settings(case.name, directory=case.directory)
    host = RemoteHost.connect(MAIN, s.ssh_config, s.ssh_known_hosts)
    yield Session(host, s, Target.of(s, MAIN, host.address), Console(quiet=True))
    host.close()


def test_lock_held_by_another_deploy(case, session):
    case.set_build("backend", "backend-held")  # a change: a deploy with nothing to do takes no lock
    held = session.acquire("deploy", "someone-elses-release")
    try:
        before = snapshot(case)
        for args in ((), ("--break-lock",)):  # a live holder is never broken
            refused(case.fab("deploy", *args), 4, f"{MAIN}: another deploy holds the lock (held: ",
                    "someone-elses-release", "wait for it to finish")
            unchanged(case, before)
    finally:
        session.release(held, "deploy", "someone-elses-release", audit=False)


def test_stale_lock_without_break_lock(case):
    case.set_build("backend", "backend-stale")
    lock = case.deploy_root() / ".lock"
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    lock.mkdir()
    (lock / "holder.pid").write_text(f"999999999 {boot} 1\n")  # no such process: provably gone
    (lock / "info.json").write_text(json.dumps({"operation": "deploy", "who": "gone@elsewhere", "release": "r0",
                                                "since": "2026-01-01T00:00:00Z", "pid": 1, "machine": "elsewhere"}))
    try:
        before = snapshot(case)
        refused(case.fab("deploy"), 4, f"{MAIN}: the host lock is stale", "gone@elsewhere",
                "rerun with --break-lock to remove it")
        unchanged(case, before)
    finally:
        for f in lock.iterdir():
            f.unlink()
        lock.rmdir()
