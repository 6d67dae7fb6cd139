"""`fab health` and `inv checklist` against a deployed sandbox stack: each failure with its reason,
the exit code and the JSON checked."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import xml.etree.ElementTree as ET

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.sandbox.hosts import host_for
from sandbox_env import TEST_HOSTS, _cleanup, new_env

HOST = TEST_HOSTS[1]
PROJECT = f"hd-thl-{HOST}"
OTHER = TEST_HOSTS[2]


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "hl")
    env.write(hosts=HOST)
    _cleanup(env)
    proc = env.fab("deploy", hosts=HOST)
    assert proc.returncode == 0, proc.stderr
    yield env
    _cleanup(env)


def health(env, **kw):
    proc = env.fab("health", "--json", hosts=HOST, **kw)
    return proc, json.loads(proc.stdout)


def checks_of(data, status=None):
    return {c["name"]: c for c in data["hosts"][0]["checks"] if status is None or c["status"] == status}


def container(service):
    return f"{PROJECT}-{service}-1"


def test_a_fully_healthy_stack_is_healthy(env):
    proc, data = health(env)
    assert proc.returncode == 0, proc.stderr
    assert data["schema"] == 1 and data["healthy"] is True and data["env"] == "hl"
    names = checks_of(data)
    for expected in ("backend.container", "backend.http.direct", "backend.http.gateway", "postgres.tcp",
                     "redis.tcp", "port.5000", "port.5432", "gateway.container"):
        assert names[expected]["status"] == "pass", names[expected]
    assert data["hosts"][0]["release"]


def test_a_stopped_service_fails(env):
    subprocess.run(["docker", "stop", container("redis")], check=True, capture_output=True)
    try:
        proc, data = health(env)
        assert proc.returncode == 7
        failed = checks_of(data, "fail")
        assert failed["redis.container"]["detail"] == f"{container('redis')} is exited"
        assert failed["redis.tcp"]["detail"] == "redis:6379 port not reachable"
        assert data["healthy"] is False
    finally:
        subprocess.run(["docker", "start", container("redis")], check=True, capture_output=True)


def test_an_unhealthy_service_fails(env):
    name = container("backend")
    cid = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--filter", "label=com.docker.compose.service=backend"], capture_output=True, text=True).stdout.split()[0]
    subprocess.run(["docker", "exec", cid, "sh", "-c", "echo fail > /app/service/health_mode"], check=True)
    try:
        for _ in range(120):  # three failed probes at the sandbox's 3 s, under a loaded run's delays
            state = subprocess.run(["docker", "inspect", "--format", "{{.State.Health.Status}}", cid],
                                   capture_output=True, text=True).stdout.strip()
            if state == "unhealthy":
                break
            __import__("time").sleep(0.5)
        proc, data = health(env)
        assert proc.returncode == 7
        failed = checks_of(data, "fail")
        assert "is unhealthy" in failed["backend.container"]["detail"]
        assert failed["backend.http.direct"]["detail"].endswith("/health does not answer /health")
    finally:
        subprocess.run(["docker", "exec", cid, "rm", "-f", "/app/service/health_mode"], capture_output=True)
    del name


def test_a_port_not_listening_fails(env):
    gateway = container("gateway")
    conf = f"/var/lib/healthdeploy-test/{HOST}/hl/shared/gateway/nginx.conf"
    original = open(conf).read()
    try:
        with open(conf, "w") as f:  # the gateway stops listening on 8001 after a reload
            f.write(original.replace("listen 8001;", "listen 127.0.0.1:18001;"))
        subprocess.run(["docker", "exec", gateway, "nginx", "-s", "reload", "-c", "/etc/healthdeploy-gateway/nginx.conf"],
                       check=True)
        __import__("time").sleep(1)
        proc, data = health(env)
        assert proc.returncode == 7
        failed = checks_of(data, "fail")
        assert failed["port.8001"]["detail"] == (f"gateway port 8001 is published on {host_for(HOST).address} but nothing answers "
                                                  "/health behind it")
        assert failed["ai-service.http.gateway"]["status"] == "fail"
    finally:
        with open(conf, "w") as f:
            f.write(original)
        subprocess.run(["docker", "exec", gateway, "nginx", "-s", "reload", "-c", "/etc/healthdeploy-gateway/nginx.conf"])
        __import__("time").sleep(1)


def test_an_infrastructure_port_on_all_interfaces_fails(env):
    # Something outside healthdeploy publishes Redis on every interface of the host.
    rogue = subprocess.run(["docker", "run", "-d", "--rm", "--name", "hd-thl-rogue", "-p", "0.0.0.0:6379:6379",
                            "healthdeploy/redis:7"], capture_output=True, text=True)
    assert rogue.returncode == 0, rogue.stderr
    try:
        proc, data = health(env)
        assert proc.returncode == 7
        failed = checks_of(data, "fail")
        assert failed["port.6379"]["detail"].startswith("redis port 6379 listens on a public interface (0.0.0.0")
    finally:
        subprocess.run(["docker", "rm", "-f", "hd-thl-rogue"], capture_output=True)


def test_table_output_and_a_hung_host_cannot_hang(env, tmp_path):
    proc = env.fab("health", hosts=HOST)
    assert proc.returncode == 0 and "hl: healthy" in proc.stdout and "backend.http.gateway" in proc.stdout
    # The other host's sshd answers TCP but is stopped (SIGSTOP): the probe must give up, not hang.
    pid = int(open(f".sandbox/hosts/{OTHER}/sshd.pid").read())
    env.write(hosts=f"{HOST},{OTHER}", SSH_CONNECT_TIMEOUT="3", TOPOLOGY="cells")
    import os
    import signal
    import time
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        proc = env.run("fab", "-H", f"{HOST},{OTHER}", "health", "--json", "--timeout", "8")
        assert time.monotonic() - started < 40
    finally:
        os.kill(pid, signal.SIGCONT)
        env.write(hosts=HOST)
    data = json.loads(proc.stdout)
    assert proc.returncode == 7
    assert data["hosts"][1]["host"] == OTHER and data["hosts"][1]["error"]
    assert data["hosts"][0]["healthy"] is True


# -- checklist -----------------------------------------------------------------------------------
def make_cert(path, days_valid: float, names=("health.example.com",)):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now + dt.timedelta(days=days_valid))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return str(path / "cert.pem"), str(path / "key.pem")


def write_backup(root, env_name, hours_ago: float, verified=True):
    finished = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)
    d = root / "backups" / env_name / finished.strftime("%Y%m%dT%H%M%SZ")
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"finished": finished.isoformat()}))
    if verified:
        (d / "verify.json").write_text(json.dumps({"result": "ok"}))


@pytest.fixture
def checklist_env(env, tmp_path, monkeypatch):
    """The deployed env plus a valid certificate and a fresh verified backup: passes everything."""
    from deploy.backup import sealing, signing

    cert, key = make_cert(tmp_path, 200)
    # Backups encrypted at rest and signed (the backup_protection item).
    identity, recipient = sealing.generate_identity()
    (tmp_path / "age.key").write_text(identity + "\n")
    signing.write_keypair(str(tmp_path / "signing_key"), str(tmp_path / "allowed_signers"))
    # (DB_PASSWORD stays the one PostgreSQL was initialised with: the release test deploys and migrates.)
    env.write(hosts=HOST, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, SERVER_NAMES="health.example.com",
              DEEPSEEK_API_KEY="sk-live-7c1e9a3b5d2f4e6a", BACKUP_AGE_RECIPIENTS=recipient,
              BACKUP_AGE_IDENTITY_FILE=str(tmp_path / "age.key"), BACKUP_SIGNING_KEY=str(tmp_path / "signing_key"),
              BACKUP_ALLOWED_SIGNERS=str(tmp_path / "allowed_signers"))
    home = tmp_path / "home"
    write_backup(home, "hl", hours_ago=2)
    yield env, home, tmp_path
    env.write(hosts=HOST)


def run_checklist(env, home, *args):
    proc = env.run("inv", "checklist", "--env", "hl", "--json", *args, extra_env={"HEALTHDEPLOY_HOME": str(home)})
    return proc, json.loads(proc.stdout)


def by_name(data):
    return {c["name"]: c for c in data["checks"]}


def test_checklist_passes_on_a_correct_environment(checklist_env):
    env, home, tmp = checklist_env
    (env.directory / "checklist.toml").write_text(open("env/checklist.toml").read())
    proc, data = run_checklist(env, home, "--junit", str(tmp / "junit.xml"))
    assert proc.returncode == 0, (proc.stderr, data)
    assert data["passed"] is True and data["counts"] == {"pass": 11, "warn": 0, "fail": 0}, data
    suite = ET.parse(tmp / "junit.xml").getroot()
    assert suite.get("tests") == "11" and suite.get("failures") == "0"


def test_checklist_fails_on_default_password_missing_secret_bad_cert_and_old_backup(checklist_env):
    env, home, tmp = checklist_env
    (env.directory / "checklist.toml").write_text(open("env/checklist.toml").read())
    cert, key = make_cert(tmp, 5)  # expires within 21 days
    env.write(hosts=HOST, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, SERVER_NAMES="health.example.com",
              REDIS_PASSWORD="redis123", DEEPSEEK_API_KEY="", DB_PASSWORD="Db-pass-4f9a2c7e81b3")
    for old in (home / "backups" / "hl").iterdir():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    write_backup(home, "hl", hours_ago=50)
    proc, data = run_checklist(env, home, "--junit", str(tmp / "junit.xml"))
    assert proc.returncode == 7
    checks = by_name(data)
    assert checks["secrets-not-default"]["status"] == "fail"
    assert "REDIS_PASSWORD is an example value from the deployment report" in checks["secrets-not-default"]["reason"]
    assert checks["required-secrets"]["reason"] == "not set: DEEPSEEK_API_KEY"
    assert checks["tls-certificate"]["reason"].startswith("certificate expires in 4 day(s)") or \
        checks["tls-certificate"]["reason"].startswith("certificate expires in 5 day(s)")
    assert "is 50 h old (limit 26 h)" in checks["recent-verified-backup"]["reason"]
    assert checks["all-services-healthy"]["status"] == "pass"
    suite = ET.parse(tmp / "junit.xml").getroot()
    assert suite.get("failures") == "4"
    assert "redis123" not in proc.stdout + proc.stderr


def test_checklist_fails_on_an_expired_certificate_for_the_wrong_name(checklist_env):
    env, home, tmp = checklist_env
    (env.directory / "checklist.toml").write_text(open("env/checklist.toml").read())
    cert, key = make_cert(tmp, -1)
    env.write(hosts=HOST, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, SERVER_NAMES="health.example.com",
              DB_PASSWORD="Db-pass-4f9a2c7e81b3", DEEPSEEK_API_KEY="sk-live-7c1e9a3b5d2f4e6a")
    proc, data = run_checklist(env, home)
    assert proc.returncode == 7 and by_name(data)["tls-certificate"]["reason"].startswith("certificate expired on")
    cert, key = make_cert(tmp, 200, names=("other.example.org",))
    env.write(hosts=HOST, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, SERVER_NAMES="health.example.com",
              DB_PASSWORD="Db-pass-4f9a2c7e81b3", DEEPSEEK_API_KEY="sk-live-7c1e9a3b5d2f4e6a")
    proc, data = run_checklist(env, home)
    assert by_name(data)["tls-certificate"]["reason"] == ("certificate does not cover health.example.com "
                                                         "(it covers other.example.org)")


def test_release_stops_at_the_first_failed_step_with_an_audit_entry(env, tmp_path):
    (env.directory / "checklist.toml").write_text(open("env/checklist.toml").read())
    home = tmp_path / "home"
    live = (env.deploy_root(HOST) / "current").resolve().name
    env.set_build("backend", "backend-release-blocked")
    try:
        proc = env.run("inv", "release", "--env", "hl", extra_env={"HEALTHDEPLOY_HOME": str(home)})
    finally:
        env.set_build("backend", "backend-v1")
    assert proc.returncode == 7, proc.stderr  # no TLS certificate, no verified backup: the checklist fails
    assert "checklist        failed" in proc.stdout and "deploy           skipped" in proc.stdout
    assert (env.deploy_root(HOST) / "current").resolve().name == live  # nothing was deployed
    audit = [json.loads(line) for line in (env.deploy_root(HOST) / "shared/audit.log").read_text().splitlines()]
    assert audit[-1]["event"] == "release" and audit[-1]["result"] == "failed"
    assert audit[-1]["failed_step"] == "checklist"


def test_release_runs_every_step_when_all_is_well(checklist_env):
    env, home, tmp = checklist_env
    (env.directory / "checklist.toml").write_text(
        open("env/checklist.toml").read().replace('kind = "backup_age"', 'kind = "backup_age"\nseverity = "warn"'))
    proc = env.run("inv", "release", "--env", "hl", extra_env={"HEALTHDEPLOY_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for step in ("checklist", "backup", "deploy", "health", "checklist-after"):
        assert any(line.startswith(step + " ") and " ok " in line for line in proc.stdout.splitlines()), step
    sets = [p for p in (home / "backups" / "hl").iterdir() if (p / "verify.json").exists()]
    assert any(json.loads((p / "verify.json").read_text())["result"] == "ok" for p in sets)
    audit = [json.loads(line) for line in (env.deploy_root(HOST) / "shared/audit.log").read_text().splitlines()]
    assert audit[-1]["event"] == "release" and audit[-1]["result"] == "ok"


def test_day_two_tasks_status_logs_exec(env):
    proc = env.fab("status", "--json", hosts=HOST)
    assert proc.returncode == 0, proc.stderr
    services = {s["service"]: s for s in json.loads(proc.stdout)["services"]}
    assert services["backend"]["state"] == "running" and services["backend"]["release"]
    assert set(services) >= {"gateway", "backend", "ai-service", "frontend-web", "frontend-patient", "postgres"}

    # The words after -- reach the container as they were typed (no second shell on the host), and the remote
    # status 3 comes back as 103: it can never be mistaken for healthdeploy's own codes (5 = rolled back).
    proc = env.fab("exec", "backend", "--", "sh", "-c", "echo from-$SERVICE 'two  spaces'; exit 3", hosts=HOST)
    assert proc.returncode == 103 and f"[{HOST}] from-backend two  spaces" in proc.stdout
    assert "the command exited with status 3" in proc.stderr
    # Output is redacted: the database password inside DATABASE_URL never reaches the operator.
    proc = env.fab("exec", "backend", "--", "env", hosts=HOST)
    assert proc.returncode == 0 and "DATABASE_URL=" in proc.stdout and "sandbox-db-7f3a9c" not in proc.stdout

    proc = env.fab("logs", "backend", "--tail", "5", hosts=HOST)
    assert proc.returncode == 0 and f"[{HOST} {PROJECT}-backend-" in proc.stdout
    proc = env.fab("logs", "nosuch", hosts=HOST)
    assert proc.returncode == 2 and "unknown service 'nosuch'" in proc.stderr
