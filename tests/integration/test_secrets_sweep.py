"""The secrets sweep: a deploy, a second deploy, a backup, a restore and a rollback of the sandbox env, while
the host's process list (`ps -eo args`) is sampled every 0.1 s. Every secret value of the env (raw and
URL-encoded) is then searched for in all output, the samples, the audit log, the rendered release tree
(releases/) and every file under the deploy path outside shared/env: zero hits. (Backups are written
locally under backups/; the sweep covers the host side.) Also on this deployed stack: InfluxDB refuses an
unauthenticated query (401) and answers an authenticated one; the audit log names the SSH key that logged in."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from deploy.core.settings import PROJECT_ROOT, load_settings
from git_http import ProcessSampler, files_containing
from sandbox_env import TEST_HOSTS, _cleanup, new_env

HOST = TEST_HOSTS[1]
NAME = "sw"
PROJECT = f"hd-t{NAME}-{HOST}"
RUN = secrets.token_hex(6)
DB_PASSWORD = f"sw/Pa+ss=w@rd:9!x-{RUN}"
UNIQUE_KEYS = ("REDIS_PASSWORD", "INFLUX_PASSWORD", "INFLUX_TOKEN", "MINIO_PASSWORD", "EMQX_PASSWORD", "JWT_SECRET",
               "DEEPSEEK_API_KEY")


@pytest.fixture(scope="module")
def swept(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, NAME)
    # Secrets of this run only: other test modules (parallel workers) use env/sandbox.env's values, some of them on
    # command lines of their own on purpose, which the machine-wide `ps` would show. DB_PASSWORD's URL-encoded
    # form (inside DATABASE_URL) differs from it, so both forms are swept.
    env.write(hosts=HOST, DB_PASSWORD=DB_PASSWORD, **{key: f"sw-{key.lower().replace('_', '-')}-{RUN}{RUN}"
                                                     for key in UNIQUE_KEYS})
    _cleanup(env)
    env.home = tmp_path_factory.mktemp("home")
    settings = load_settings(NAME, directory=env.directory)
    needles = sorted({form for secret in settings.secrets for form in (secret.reveal(), quote(secret.reveal(), safe=""))})
    outputs: dict[str, str] = {}

    def step(label, *args):
        proc = env.run(*args, extra_env={"HEALTHDEPLOY_HOME": str(env.home)}, timeout=900)
        outputs[label] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{label}: {proc.stderr}"
        return proc

    with ProcessSampler(0.1) as ps:
        subprocess.run(["sh", "-c", "sleep 0.5", "sh", needles[0]])  # positive control for the sampler
        step("deploy", "fab", "-H", HOST, "deploy")
        env.set_build("backend", "backend-v2")
        step("deploy v2", "fab", "-H", HOST, "deploy")
        backup = step("backup", "inv", "backup", "--env", NAME, "--json")
        set_name = json.loads(backup.stdout)["set"]
        step("restore", "inv", "restore", "--env", NAME, "--from", set_name, "--yes")
        step("rollback", "fab", "-H", HOST, "rollback")
    yield env, settings, needles, outputs, ps
    _cleanup(env)


def test_no_secret_anywhere_on_the_host_side(swept):
    env, settings, needles, outputs, ps = swept
    assert len(needles) >= 9 and quote(DB_PASSWORD, safe="") in needles  # every secret of the env, raw and encoded
    control = [line for line in ps.hits(needles[0]) if "sleep 0.5" in line]
    assert control, "the sampler must see a secret on a command line"
    hits = [line for line in ps.hits(*needles) if "sleep 0.5" not in line]
    print(f"secrets sweep: {len(ps.samples)} ps samples, {len(needles)} secret forms, {len(hits)} hits")
    assert len(ps.samples) >= 100 and hits == []
    for label, text in outputs.items():
        assert not [n for n in needles if n in text], f"a secret in the output of {label}"
    root = env.deploy_root(HOST)
    audit = (root / "shared" / "audit.log").read_text()
    assert {"deploy", "backup", "restore", "rollback"} <= {json.loads(line)["event"] for line in audit.splitlines()}
    assert not [n for n in needles if n in audit]
    assert files_containing(root / "releases", *needles) == []
    outside = [p for p in files_containing(root, *needles) if not p.startswith(str(root / "shared" / "env") + "/")]
    assert outside == [], outside
    # The secrets are where they belong: shared/env, its versions and the run/ copies, 0600 files in 0700 dirs.
    assert files_containing(root / "shared" / "env", settings.db_password.reveal())
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in [root / "shared" / "env", *(root / "shared" / "env").rglob("*")]
             if p.stat().st_mode & 0o077}
    assert loose == {}, loose
    assert (root / "shared" / "env" / "run" / "postgres" / "secrets.env").is_file()
    assert any((root / "shared" / "env" / ".versions").iterdir())


def test_the_audit_log_names_the_key_that_logged_in(swept):
    env = swept[0]
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(PROJECT_ROOT / ".sandbox" / "id_ed25519.pub")],
                                 capture_output=True, text=True, check=True).stdout.split()[1]
    records = [json.loads(line) for line in (env.deploy_root(HOST) / "shared" / "audit.log").read_text().splitlines()]
    assert records and all(r["key"] == fingerprint for r in records), {r.get("key") for r in records}
    assert fingerprint.startswith("SHA256:") and all(r["who"] for r in records)


def _curl_in(container: str, url: str, authenticated: bool) -> tuple[int, str]:
    script = ('printf \'user = "%s:%s"\\n\' "$INFLUXDB_ADMIN_USER" "$INFLUXDB_ADMIN_PASSWORD" | curl -K - "$@"'
              if authenticated else 'curl "$@"')
    out = subprocess.run(["docker", "exec", container, "sh", "-c", script, "sh", "-sS", "-o", "/dev/stderr",
                          "-w", "%{http_code}", url], capture_output=True, text=True)
    return int(out.stdout.strip() or 0), out.stderr


def test_influxdb_refuses_unauthenticated_queries(swept):
    influx = f"{PROJECT}-influxdb-1"
    url = "http://127.0.0.1:8086/query?q=SHOW%20DATABASES"
    status, body = _curl_in(influx, url, authenticated=False)
    assert status == 401, body
    status, body = _curl_in(influx, url, authenticated=True)
    assert status == 200 and "health_data" in body
    # From another container on the stack's network (the path the application takes): refused without credentials.
    gateway = f"{PROJECT}-gateway-1"
    out = subprocess.run(["docker", "exec", gateway, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                          "http://influxdb:8086/query?q=SHOW%20DATABASES"], capture_output=True, text=True)
    assert out.stdout.strip() == "401", out
