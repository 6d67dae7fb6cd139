"""Changes that are not source changes, end to end (real sshd, Docker, PostgreSQL, Redis, nginx): the plan sees
them, the dry run shows them, the deploy applies them, rollback treats settings and secrets right.

One environment for the module; the tests run in order, each from the state the previous one left.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from load import Load
from sandbox_env import MAIN, MAIN_ADDRESS, _cleanup, get_json, new_env

HOST = MAIN_ADDRESS
PROJECT = f"hd-tpc-{MAIN}"
OLD_DB, NEW_DB = "sandbox-db-7f3a9c", "sandbox-db-rotated-3c9e1f"
OLD_REDIS, NEW_REDIS = "sandbox-redis-51d2", "sandbox-redis-rotated-8d2a"


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "pc")
    env.settings = {}
    _cleanup(env)
    yield env
    _cleanup(env)


def write(env, **changes):
    env.settings.update(changes)
    env.write(**env.settings)


def fab(env, *args):
    return env.fab(*args)


def summary(proc) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"][0]


def container_env(service: str) -> dict[str, str]:
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--filter", f"label=com.docker.compose.service={service}"], capture_output=True, text=True)
    out = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Env}}", ids.stdout.split()[0]],
                         capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in json.loads(out))


def psql_with(password: str) -> subprocess.CompletedProcess:
    """A password login over TCP (the image trusts only its local socket)."""
    return subprocess.run(["docker", "exec", "-e", f"PGPASSWORD={password}", f"{PROJECT}-postgres-1", "psql", "-h",
                           "127.0.0.1", "-U", "admin", "-d", "health_mgmt", "-tAc", "select count(*) from requests"],
                          capture_output=True, text=True)


def redis_with(password: str) -> str:
    return subprocess.run(["docker", "exec", "-e", f"REDISCLI_AUTH={password}", f"{PROJECT}-redis-1", "redis-cli",
                           "-h", "127.0.0.1", "ping"], capture_output=True, text=True).stdout.strip()


def make_cert(path, serial: int):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "health.example.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("health.example.com")]), critical=False)
            .sign(key, hashes.SHA256()))
    (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return str(path / "cert.pem"), str(path / "key.pem")


def served_serial(port: int = 443) -> int | None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((HOST, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="health.example.com") as tls:
                return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
    except OSError:
        return None


def test_first_deploy_and_some_data(env):
    proc = fab(env, "deploy")
    assert proc.returncode == 0, proc.stderr
    with Load(HOST, 5000, rate=20) as load:  # rows written through the gateway by the application itself
        time.sleep(1.5)
    assert load.result.failed == 0, load.result.errors[:5]
    rows = psql_with(OLD_DB)
    assert rows.returncode == 0 and int(rows.stdout) > 0, rows.stderr
    env.rows = int(rows.stdout)


def test_an_env_only_change_is_shown_by_the_dry_run_then_rolled(env):
    write(env, JWT_EXPIRES_IN="1d")
    dry = fab(env, "deploy", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert "would send env/backend.env (changed)" in dry.stderr
    assert "would roll backend (env changed)" in dry.stderr
    assert summary(dry)["result"] == "planned" and summary(dry)["services"] == ["backend"]
    assert container_env("backend")["JWT_EXPIRES_IN"] == "7d"  # the dry run changed nothing
    proc = fab(env, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["services"] == ["backend"]  # what the dry run said, and nothing else
    assert container_env("backend")["JWT_EXPIRES_IN"] == "1d"


def test_a_settings_only_release_rolled_back_restores_the_old_env(env):
    proc = fab(env, "rollback", "--json")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["services"] == ["backend"]
    assert container_env("backend")["JWT_EXPIRES_IN"] == "7d"
    write(env, JWT_EXPIRES_IN="7d")  # the settings now match the live release again
    assert summary(fab(env, "deploy", "--json"))["result"] == "unchanged"


def test_db_password_rotation_on_a_live_stack_with_data(env):
    before = int(psql_with(OLD_DB).stdout)
    write(env, DB_PASSWORD=NEW_DB)
    with Load(HOST, 5000, rate=50) as load:
        time.sleep(1)
        proc = fab(env, "deploy", "--json")
        time.sleep(1)
    assert proc.returncode == 0, proc.stderr
    assert "would" not in proc.stderr and "password changed on the running server" in proc.stderr
    assert psql_with(OLD_DB).returncode != 0 and "password authentication failed" in psql_with(OLD_DB).stderr
    after = psql_with(NEW_DB)
    assert after.returncode == 0 and int(after.stdout) >= before  # data intact (and the app kept writing)
    assert get_json(f"http://{HOST}:5000/api/build")["service"] == "backend"  # the API reads the database again
    assert load.result.failed == 0, load.result.errors[:5]
    assert OLD_DB not in proc.stdout + proc.stderr and NEW_DB not in proc.stdout + proc.stderr


def test_redis_password_rotation_on_a_live_stack(env):
    write(env, REDIS_PASSWORD=NEW_REDIS)
    with Load(HOST, 5000, rate=50) as load:
        time.sleep(1)
        proc = fab(env, "deploy")
        time.sleep(1)
    assert proc.returncode == 0, proc.stderr
    assert "NOAUTH" in redis_with(OLD_REDIS) or "WRONGPASS" in redis_with(OLD_REDIS)
    assert redis_with(NEW_REDIS) == "PONG"
    assert load.result.failed == 0, load.result.errors[:5]
    # The rotated password survives a restart of Redis (it reads the mounted secret file at start).
    subprocess.run(["docker", "restart", f"{PROJECT}-redis-1"], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while redis_with(NEW_REDIS) != "PONG" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert redis_with(NEW_REDIS) == "PONG"


def test_a_rotated_secret_stays_rotated_after_rollback(env):
    write(env, JWT_SECRET="sandbox-jwt-rotated-after-a-leak-6f2d9e")
    assert fab(env, "deploy").returncode == 0
    assert container_env("backend")["JWT_SECRET"] == "sandbox-jwt-rotated-after-a-leak-6f2d9e"
    write(env, JWT_EXPIRES_IN="2d")  # a new release on top, then back
    assert fab(env, "deploy").returncode == 0
    proc = fab(env, "rollback")
    assert proc.returncode == 0, proc.stderr
    backend = container_env("backend")
    assert backend["JWT_EXPIRES_IN"] == "7d" and backend["JWT_SECRET"] == "sandbox-jwt-rotated-after-a-leak-6f2d9e"
    assert psql_with(NEW_DB).returncode == 0 and get_json(f"http://{HOST}:5000/api/build")["service"] == "backend"
    write(env, JWT_EXPIRES_IN="7d")


def test_enabling_tls_on_a_live_stack_publishes_443(env, tmp_path):
    assert served_serial() is None
    cert, key = make_cert(tmp_path, 1111)
    write(env, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, SERVER_NAMES="health.example.com")
    proc = fab(env, "deploy")
    assert proc.returncode == 0, proc.stderr
    assert "recreating gateway" in proc.stderr
    assert served_serial() == 1111
    env.cert_dir = tmp_path


def test_a_renewed_certificate_is_served_after_a_deploy(env):
    make_cert(env.cert_dir, 2222)  # renewed in place: same paths, new certificate
    dry = fab(env, "deploy", "--dry-run")
    assert "would reload gateway (certificate changed)" in dry.stderr
    proc = fab(env, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["result"] == "converged" and summary(proc)["services"] == []
    assert served_serial() == 2222
