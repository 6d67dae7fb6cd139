"""The bad-input catalogue, fast half (no sshd, no Docker): commands a person could type, each refused with
exactly one `error: <what> (<how to fix>)` line per problem, the documented exit code (docs/exit-codes.md)
and no traceback. The other half, the cases that reach a deployed host, is tests/integration/test_bad_input.py.

These cases must not reach any host: the only host, web1, points at 127.0.0.72:2299 where nothing listens,
so a case that connected anyway would fail with "cannot reach" (exit 1) instead of its own refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deploy.core.errors import ExitCode, SettingsError
from deploy.core.settings import PROJECT_ROOT, build_settings, load_settings

BACKUPS = PROJECT_ROOT / "backups"
NOWHERE = ("127.0.0.72", 2299)  # nothing listens here

GOOD_PROD = {
    "HOSTS": "web1,web2", "ROLES": "web1=both,web2=app", "APP_SOURCE": "/src/app", "DB_PASSWORD": "Zq8vT3-long-db-pass",
    "REDIS_PASSWORD": "r3dis-0a9f8e7d", "INFLUX_PASSWORD": "infl-9d8c7b6a", "INFLUX_TOKEN": "tok-5e4d3c2b1a",
    "MONGO_PASSWORD": "mongo-1a2b3c4d", "MINIO_PASSWORD": "minio-9z8y7x6w", "EMQX_PASSWORD": "emqx-5v4u3t2s",
    "JWT_SECRET": "j-" + "0123456789abcdef" * 3, "DEEPSEEK_API_KEY": "sk-live-123456789",
    "QDRANT_API_KEY": "qdr-7h6g5f4e3d",
}


def _private_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    path.with_name(path.name + ".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


class Envs:
    """A temporary env dir (HEALTHDEPLOY_ENV_DIR) with an ssh config whose hosts lead nowhere."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.name = f"bi{os.getpid()}"  # also names backups/<env>/ (removed afterwards)
        self.key = tmp_path / "id_ed25519"
        _private_key(self.key)
        self.ssh_config = tmp_path / "ssh_config"
        self.ssh_hosts(identity=str(self.key))
        (tmp_path / "known_hosts").write_text("")
        (tmp_path / "home").mkdir()

    def ssh_hosts(self, identity: str) -> None:
        self.ssh_config.write_text("".join(
            f"Host {h}\n  HostName {NOWHERE[0]}\n  Port {NOWHERE[1]}\n  User root\n  IdentityFile {identity}\n"
            "  IdentitiesOnly yes\n" for h in ("web1", "web2")))

    def write(self, kind: str = "sandbox", name: str | None = None, **values: str) -> Path:
        base = dict(GOOD_PROD) if kind == "production" else {"HOSTS": "web1", "STACK_VARIANT": "sandbox"}
        base.update(ENV_KIND=kind, SSH_CONFIG=str(self.ssh_config), SSH_KNOWN_HOSTS=str(self.dir / "known_hosts"))
        base.update(values)
        path = self.dir / f"{name or self.name}.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in base.items() if v is not None))
        return path

    def run(self, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        environ = {**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.dir), "HOME": str(self.dir / "home"),
                   "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
        return subprocess.run(list(argv), capture_output=True, text=True, cwd=PROJECT_ROOT, env=environ,
                              stdin=subprocess.DEVNULL, timeout=120)

    # -- backup sets in backups/<env>/ ------------------------------------------------------------------
    def backup_set(self, name: str, env: str | None = None, host: str = "web1", corrupt: str = "",
                   sealing: dict | None = None) -> Path:
        d = BACKUPS / self.name / name
        d.mkdir(parents=True)
        data = b"PGDMP fake custom-format dump " * 10
        (d / "postgres.dump").write_bytes(data)
        record = {"service": "postgres", "artifact": "postgres.dump", "file": "postgres.dump", "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "sealing": sealing or {}}
        manifest = json.dumps({"format": 2, "env": env or self.name, "host": host, "role": "both", "kind": "backup",
                               "finished": f"{name[:4]}-{name[4:6]}-{name[6:8]}T{name[9:11]}:{name[11:13]}:{name[13:15]}Z",
                               "artifacts": [record]})
        (d / "manifest.json").write_text(manifest)
        if corrupt == "truncated":
            (d / "postgres.dump").write_bytes(data[:100])
        elif corrupt == "flipped":
            (d / "postgres.dump").write_bytes(b"X" + data[1:])
        elif corrupt == "manifest":
            (d / "manifest.json").write_text(manifest[: len(manifest) // 2])
        return d


@pytest.fixture
def envs(tmp_path):
    e = Envs(tmp_path)
    e.write()
    yield e
    shutil.rmtree(BACKUPS / e.name, ignore_errors=True)


def refused(proc: subprocess.CompletedProcess, code: int, *fragments: str, lines: int = 1) -> list[str]:
    """Exit ``code``, ``lines`` error lines each saying what and how (`error: what (how)`), no traceback, and
    no connection attempt."""
    where = f"\nexit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == code, where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    print(f"exit {proc.returncode}: " + " | ".join(errors))  # the catalogue line (pytest -s shows it)
    assert len(errors) == lines, where
    for line in errors:
        assert re.fullmatch(r"error: \S.* \(\S.*\)", line), f"no '(how to fix)' in {line!r}"
    text = "\n".join(errors)
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    if code != ExitCode.FAILED:
        assert "cannot reach web1" not in proc.stderr, where
    return errors


# -- settings files -----------------------------------------------------------------------------------------
def test_env_file_syntax_error_names_the_line(envs):
    path = envs.write()
    path.write_text(path.read_text() + "BATCH_SIZE 2\n")
    lines = len(path.read_text().splitlines())
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, f"{path}:{lines}: cannot parse this line",
            "use KEY=value")


def test_unknown_key_suggests_the_known_one(envs):
    envs.write(DEPLOY_PTH="/srv/x")
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, "DEPLOY_PTH: unknown setting (did you mean DEPLOY_PATH?)")


def test_missing_required_key(envs):
    envs.write(HOSTS=None)
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, "HOSTS: required for env",
            "Comma-separated SSH host aliases")


def test_wrong_type(envs):
    envs.write(BATCH_SIZE="two")
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, "BATCH_SIZE: expected a whole number, got 'two'")


def test_several_problems_one_line_each(envs):
    envs.write(BATCH_SIZE="two", KEEP_RELEASES="0", TOPOLOGY="star")
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, "BATCH_SIZE:", "KEEP_RELEASES: must be at least 1",
            "TOPOLOGY: expected one of shared, cells, got 'star'", lines=3)


def test_example_password_on_production(envs):
    envs.write("production", REDIS_PASSWORD="redis123")
    errors = refused(envs.run("fab", "deploy", "--env", envs.name), 2,
                     "REDIS_PASSWORD: is an example value from the deployment report", "openssl rand")
    assert "redis123" not in "".join(errors)


def test_example_env_copied_as_its_header_says(envs):
    """`KEY=   # comment` reads as empty: copied as it is, exactly the secrets it leaves blank are missing (no
    comment taken for a value); with them filled in, it loads."""
    text = (PROJECT_ROOT / "env" / "example.env").read_text()
    (envs.dir / "prod.env").write_text(text)
    secrets = ["DB_PASSWORD", "REDIS_PASSWORD", "INFLUX_PASSWORD", "INFLUX_TOKEN", "MONGO_PASSWORD", "MINIO_PASSWORD",
               "QDRANT_API_KEY", "EMQX_PASSWORD", "JWT_SECRET", "DEEPSEEK_API_KEY"]
    errors = refused(envs.run("fab", "deploy", "--env", "prod"), 2, lines=len(secrets))
    assert [e.split(":")[1].strip() for e in errors] == secrets
    assert all("required for env 'prod'" in e for e in errors) and "#" not in "".join(errors)
    filled = "".join(f"{line.split('=')[0]}=Strong-{line.split('=')[0]}-9f8e7d6c5b4a\n"
                     if line.split("=")[0] in secrets else line + "\n" for line in text.splitlines())
    (envs.dir / "prod.env").write_text(filled)
    s = load_settings("prod", directory=envs.dir)
    assert (s.primary_host, s.roles, s.data_address, s.disabled_services, s.tls_cert_file, s.tls_key_file,
            s.backup_age_recipients, s.backup_age_identity_file) == ("", (), "", (), "", "", (), "")
    assert s.backup_services == ("postgres", "influxdb", "mongodb", "minio") and s.drain_seconds == 2.0
    assert s.ssh_config == str(Path("~/.ssh/config").expanduser())  # the default may be missing


def test_mistyped_ssh_config_is_an_error_not_home_ssh_config(envs):
    envs.write(SSH_CONFIG=str(envs.dir / "ssh_confg"))
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, f"SSH_CONFIG: file {envs.dir / 'ssh_confg'} does not exist",
            "remove the line to use ~/.ssh/config")


@pytest.mark.parametrize("identity, what", [
    ("missing", "does not exist"),
    ("directory", "cannot be read: Is a directory"),
    ("public", "is not a private key"),
], ids=["missing", "unreadable", "public-key"])
def test_identity_file_problem_is_said_as_such(envs, identity, what):
    path = {"missing": envs.dir / "id_nosuch", "directory": envs.dir, "public": envs.dir / "id_ed25519.pub"}[identity]
    envs.ssh_hosts(identity=str(path))
    errors = refused(envs.run("fab", "-H", "web1", "releases", "--env", envs.name), 2,
                     f"IdentityFile {path} of web1 {what}", f"fix IdentityFile of Host web1 in {envs.ssh_config}")
    assert "HostName/Port" not in errors[0]


# -- hosts ----------------------------------------------------------------------------------------------------
def test_host_not_in_the_environment(envs):
    refused(envs.run("fab", "-H", "web9", "deploy", "--env", envs.name), 2,
            f"host(s) web9 are not in HOSTS of env '{envs.name}'", "pick from web1")


def test_host_of_no_environment(envs):
    refused(envs.run("fab", "-H", "web9", "deploy"), 2, "no environment lists host 'web9' in HOSTS", "pass --env NAME")


def test_alias_that_is_no_host_in_ssh_config_nor_in_dns(envs):
    envs.write(HOSTS="nosuch.invalid")
    refused(envs.run("fab", "releases", "--env", envs.name), 2,
            f"cannot reach nosuch.invalid: nosuch.invalid is neither a Host in {envs.ssh_config} nor a name DNS knows",
            "add `Host nosuch.invalid`")


def test_unreachable_host(envs):
    refused(envs.run("fab", "-H", "web1", "releases", "--env", envs.name), 1,
            f"cannot reach web1 ({NOWHERE[0]}:{NOWHERE[1]}): ", "check HostName/Port")


def test_unknown_environment(envs):
    refused(envs.run("fab", "deploy", "--env", "nosuch"), 2, f"no settings file {envs.dir / 'nosuch.env'}",
            f"known environments: {envs.name}")


# -- what the host would refuse late, refused here at once ----------------------------------------------------
def test_compose_limit_refused_before_connecting(envs):
    envs.write(BACKEND_MEMORY="lots")
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, "BACKEND_MEMORY: 'lots' is not a memory size",
            "e.g. 512m or 1g")
    started = time.monotonic()
    with pytest.raises(SettingsError):
        build_settings("x", {"HOSTS": "web1", "ENV_KIND": "sandbox", "BACKEND_MEMORY": "lots"})
    assert time.monotonic() - started < 1


def test_server_names_that_would_fail_nginx_t(envs):
    envs.write(SERVER_NAMES="a.test; include /etc/passwd")
    refused(envs.run("fab", "deploy", "--env", envs.name), 2,
            "SERVER_NAMES: 'a.test; include /etc/passwd' is not a host name", "health.example.com")
    started = time.monotonic()
    with pytest.raises(SettingsError):
        build_settings("x", {"HOSTS": "web1", "ENV_KIND": "sandbox", "SERVER_NAMES": "a.test; include /etc/passwd"})
    assert time.monotonic() - started < 1
    build_settings("x", {"HOSTS": "web1", "ENV_KIND": "sandbox", "SERVER_NAMES": "health.example.com,*.example.org,_"})


def _pair(directory: Path, tag: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as PEM files."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"{tag}.example.com")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=9))
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return directory / "cert.pem", directory / "key.pem"


def test_tls_certificate_that_is_not_pem(envs):
    cert, key = _pair(envs.dir / "a", "a")
    cert.write_text("not a certificate\n")
    envs.write(TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    refused(envs.run("fab", "deploy", "--env", envs.name), 2, f"TLS_CERT_FILE: {cert} is not a PEM certificate",
            "-----BEGIN CERTIFICATE-----")


def test_tls_key_of_another_certificate(envs):
    cert, _ = _pair(envs.dir / "a", "a")
    _, other_key = _pair(envs.dir / "b", "b")
    envs.write(TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(other_key))
    refused(envs.run("fab", "deploy", "--env", envs.name), 2,
            f"TLS_KEY_FILE: {other_key} does not belong to the certificate in {cert}", "give the key the certificate")


# -- arguments ------------------------------------------------------------------------------------------------
def test_unknown_service(envs):
    refused(envs.run("fab", "-H", "web1", "logs", "nosuch", "--env", envs.name), 2, "unknown service 'nosuch'",
            "one of backend, ai-service")


@pytest.mark.parametrize("argv, flag", [
    (("fab", "-H", "web1", "logs", "backend", "--tail", "x"), "--tail must be a whole number, got 'x'"),
    (("fab", "-H", "web1", "audit", "--lines", "ten"), "--lines must be a whole number, got 'ten'"),
    (("fab", "-H", "web1", "health", "--timeout", "soon"), "--timeout must be a number of seconds, got 'soon'"),
    (("inv", "backup.prune", "--last", "x"), "--last must be a whole number, got 'x'"),
], ids=["tail", "lines", "timeout", "last"])
def test_non_numeric_option(envs, argv, flag):
    refused(envs.run(*argv, "--env", envs.name), 2, flag, "e.g. --")


def test_non_numeric_value_of_any_int_option_is_one_line(envs):
    """Options declared with an int default are cast by invoke while parsing (a traceback before the task runs)."""
    refused(envs.run("inv", "test", "--workers", "many"), 2, "--workers must be a whole number, got 'many'",
            "see `inv --help test`")


def test_exec_without_a_command(envs):
    refused(envs.run("fab", "-H", "web1", "exec", "backend", "--env", envs.name), 2, "no command given",
            "fab -H HOST exec SERVICE -- COMMAND")


def test_option_before_the_task_name_fab(envs):
    refused(envs.run("fab", "--env", envs.name, "deploy", "--dry-run"), 2,
            "--env is an option of the task deploy, not of fab itself",
            f"write it after the task name: fab deploy --env {envs.name} --dry-run")


def test_unknown_option_with_json_still_prints_a_document(envs):
    proc = envs.run("fab", "deploy", "--env", envs.name, "--json", "--dry-rum")
    refused(proc, 2, "No idea what '--dry-rum' is", "see `fab --help deploy`")
    assert json.loads(proc.stdout)["error"]["exit_code"] == 2


def test_option_before_the_task_name_inv(envs):
    refused(envs.run("inv", "--env", envs.name, "checklist"), 2, "--env is an option of the task checklist",
            f"inv checklist --env {envs.name}")


def test_help_points_only_to_docs_that_exist(envs):
    proc = envs.run("inv", "--help", "checklist")
    assert proc.returncode == 0 and "docs/checklist.md" in proc.stdout
    import fabfile
    import tasks

    named = set()
    for collection in (fabfile.ns, tasks.ns):
        for name in collection.task_names:
            task = collection[name]
            named |= set(re.findall(r"docs/[\w.-]+\.md", " ".join([task.__doc__ or "", *task.help.values()])))
    assert named and all((PROJECT_ROOT / doc).is_file() for doc in named), named


# -- backup sets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corrupt, what", [
    ("truncated", "has 100 bytes, the manifest says 300 (truncated or corrupt)"),
    ("flipped", "SHA-256 differs from the manifest (corrupt)"),
    ("manifest", "manifest.json is unreadable"),
])
@pytest.mark.parametrize("task", ["restore", "backup.verify"])
def test_damaged_backup_set(envs, task, corrupt, what):
    envs.backup_set("20260101T000000Z", corrupt=corrupt)
    refused(envs.run("inv", task, "--env", envs.name, "--from", "20260101T000000Z", *(["--yes"] if task == "restore" else [])),
            8, what, "this set cannot be trusted")


@pytest.mark.parametrize("task", ["restore", "backup.verify"])
def test_backup_set_of_another_environment(envs, task):
    envs.backup_set("20260101T000000Z", env="staging")
    refused(envs.run("inv", task, "--env", envs.name, "--from", "20260101T000000Z"), 2,
            f"20260101T000000Z is a backup of env 'staging', not '{envs.name}'", "a set of this environment")


def test_backup_set_of_another_role(envs):
    envs.write(HOSTS="web1,web2", ROLES="web1=data,web2=app")
    envs.backup_set("20260101T000000Z", host="web1")  # taken when web1 ran the whole stack (role both)
    refused(envs.run("inv", "restore", "--env", envs.name, "--from", "20260101T000000Z"), 2,
            "20260101T000000Z was taken from a 'both' host; web1 is a 'data' host", "pass --other-host")


def test_unknown_backup_set(envs):
    refused(envs.run("inv", "restore", "--env", envs.name, "--from", "20990101T000000Z"), 2,
            "is not a backup set (no manifest.json)", f"inv backup.list --env {envs.name}")


def test_truncated_manifest_does_not_crash_backup_list(envs):
    envs.backup_set("20260101T000000Z")
    envs.backup_set("20260102T000000Z", corrupt="manifest")
    proc = envs.run("inv", "backup.list", "--env", envs.name, "--json")
    refused(proc, 8, "1 backup set(s)", "have an unreadable manifest.json: 20260102T000000Z", "remove them")
    data = json.loads(proc.stdout)
    assert [(s["set"], bool(s["problem"])) for s in data["sets"]] == [("20260101T000000Z", False),
                                                                       ("20260102T000000Z", True)]
    assert data["error"]["exit_code"] == 8
    refused(envs.run("inv", "backup.list", "--env", envs.name), 8, "20260102T000000Z")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "for-real"])
def test_truncated_manifest_does_not_crash_backup_prune(envs, dry_run):
    for day in range(1, 4):
        envs.backup_set(f"2026010{day}T000000Z")
    broken = envs.backup_set("20260104T000000Z", corrupt="manifest")
    proc = envs.run("inv", "backup.prune", "--env", envs.name, "--last", "1", "--daily", "0", "--weekly", "0",
                    "--monthly", "0", *(["--dry-run"] if dry_run else []))
    refused(proc, 8, "20260104T000000Z")
    assert "left alone (manifest unreadable)" in proc.stdout and broken.is_dir()
    kept = sorted(p.name for p in (BACKUPS / envs.name).iterdir())
    assert kept == (["20260101T000000Z", "20260102T000000Z", "20260103T000000Z", "20260104T000000Z"] if dry_run
                    else ["20260103T000000Z", "20260104T000000Z"])


def test_production_restore_needs_yes_when_not_interactive(envs):
    from deploy.backup import signing

    key, allowed = envs.dir / "signing_key", envs.dir / "allowed_signers"
    signing.write_keypair(str(key), str(allowed))
    envs.write("production", BACKUP_SIGNING_KEY=str(key), BACKUP_ALLOWED_SIGNERS=str(allowed))
    signing.sign_set(envs.backup_set("20260101T000000Z"), str(key))
    refused(envs.run("inv", "restore", "--env", envs.name, "--from", "20260101T000000Z"), 2,
            f"restoring 20260101T000000Z over production data of '{envs.name}' needs confirmation", "rerun with --yes")


def test_production_restore_of_an_unsigned_set_is_refused(envs):
    envs.write("production")
    envs.backup_set("20260101T000000Z")
    refused(envs.run("inv", "restore", "--env", envs.name, "--from", "20260101T000000Z", "--yes"), 8,
            "cannot check who made this set: BACKUP_ALLOWED_SIGNERS is not set", f"set it in env/{envs.name}.env")


def test_encrypted_set_without_its_key(envs):
    envs.backup_set("20260101T000000Z", sealing={"encryption": "age", "compression": None})
    refused(envs.run("inv", "restore", "--env", envs.name, "--from", "20260101T000000Z"), 2,
            "postgres.dump is encrypted with age and BACKUP_AGE_IDENTITY_FILE is not set",
            f"set it in env/{envs.name}.env")


def test_unknown_backup_service(envs):
    refused(envs.run("inv", "backup", "--env", envs.name, "--services", "postgres,nosql"), 2,
            "cannot back up 'nosql'", "choose from postgres")


# -- machine-readable reports of refusals -------------------------------------------------------------------
def test_checklist_with_bad_settings_still_writes_its_reports(envs):
    envs.write("production", REDIS_PASSWORD="redis123", BATCH_SIZE="two")
    junit = envs.dir / "checklist.xml"
    proc = envs.run("inv", "checklist", "--env", envs.name, "--json", "--junit", str(junit))
    refused(proc, 2, "REDIS_PASSWORD: is an example value", "BATCH_SIZE: expected a whole number", lines=2)
    data = json.loads(proc.stdout)
    assert data["passed"] is False and data["counts"] == {"pass": 0, "warn": 0, "fail": 2}
    assert {c["name"]: c["status"] for c in data["checks"]} == {"settings: BATCH_SIZE": "fail",
                                                                "settings: REDIS_PASSWORD": "fail"}
    assert data["error"]["exit_code"] == 2 and len(data["error"]["problems"]) == 2
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "2"
    assert {c.get("name") for c in suite.iter("testcase")} == {"settings: BATCH_SIZE", "settings: REDIS_PASSWORD"}
    assert "redis123" not in proc.stdout + junit.read_text()


def test_checklist_with_an_unreadable_checklist_file_still_writes_its_reports(envs):
    junit = envs.dir / "checklist.xml"
    proc = envs.run("inv", "checklist", "--env", envs.name, "--file", str(envs.dir / "nosuch.toml"), "--json",
                    "--junit", str(junit))
    refused(proc, 2, f"cannot read checklist {envs.dir / 'nosuch.toml'}: No such file or directory", "check --file")
    assert json.loads(proc.stdout)["checks"][0]["status"] == "fail"
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_checklist_junit_path_that_cannot_be_written(envs):
    checklist = envs.dir / "local.toml"
    checklist.write_text('[[check]]\nkind = "secrets_not_default"\n')
    refused(envs.run("inv", "checklist", "--env", envs.name, "--file", str(checklist), "--junit",
                     str(envs.dir / "no" / "such" / "dir.xml")), 2, "cannot write --junit", "give a writable file path")


def test_deploy_json_refusal_prints_a_json_document(envs):
    envs.write(BATCH_SIZE="two")
    proc = envs.run("fab", "deploy", "--env", envs.name, "--json")
    refused(proc, 2, "BATCH_SIZE")
    error = json.loads(proc.stdout)["error"]
    assert error["exit_code"] == 2 and error["problems"][0]["key"] == "BATCH_SIZE"
    assert error["lines"] == [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_every_exit_code_is_documented():
    doc = (PROJECT_ROOT / "docs" / "exit-codes.md").read_text()
    for code in ExitCode:
        shown = "100+N" if code is ExitCode.REMOTE_BASE else str(int(code))
        assert f"\n| {shown} | " in doc, code
    assert "docs/exit-codes.md" in (PROJECT_ROOT / "README.md").read_text()
