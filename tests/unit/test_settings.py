"""Settings: typed values, every problem reported together with key and hint, secrets never shown."""

import subprocess
import sys
from pathlib import Path

import pytest

from deploy.core.errors import SettingsError, UsageError
from deploy.core.secret import Secret
from deploy.core.settings import build_settings, find_env_for_host, load_settings, parse_env_text

GOOD_PROD = {
    "HOSTS": "web1,web2", "ROLES": "web1=both,web2=app", "APP_SOURCE": "/src/app", "DB_PASSWORD": "Zq8!vT3#long-db-pass",
    "REDIS_PASSWORD": "r3dis-0a9f8e7d", "INFLUX_PASSWORD": "infl-9d8c7b6a", "INFLUX_TOKEN": "tok-5e4d3c2b1a",
    "MONGO_PASSWORD": "mongo-1a2b3c4d", "MINIO_PASSWORD": "minio-9z8y7x6w", "EMQX_PASSWORD": "emqx-5v4u3t2s",
    "JWT_SECRET": "j" * 40, "DEEPSEEK_API_KEY": "sk-live-123456789", "QDRANT_API_KEY": "qdr-7c6b5a4d3e",
}


def test_typed_values_and_defaults():
    s = build_settings("prod", dict(GOOD_PROD, BATCH_SIZE="2", DRAIN_SECONDS="1.5"))
    assert s.hosts == ("web1", "web2")
    assert s.batch_size == 2 and s.drain_seconds == 1.5
    assert s.primary == "web1"
    assert isinstance(s.db_password, Secret) and s.db_password.reveal() == "Zq8!vT3#long-db-pass"
    assert s.keep_releases == 5  # default
    assert s.limits("ai-service") == (1.0, "1g")
    with pytest.raises(Exception):
        s.hosts = ("x",)  # frozen


def test_every_problem_reported_with_key_and_hint():
    values = dict(GOOD_PROD, BATCH_SIZE="two", REDIS_PASSWORD="redis123", DB_PASWORD="x")
    del values["JWT_SECRET"]
    with pytest.raises(SettingsError) as info:
        build_settings("prod", values)
    lines = info.value.lines()
    assert "error: BATCH_SIZE: expected a whole number, got 'two' (How many application hosts a deploy updates at a time.)" in lines
    assert any(line.startswith("error: REDIS_PASSWORD: is an example value from the deployment report") for line in lines)
    assert any(line.startswith("error: JWT_SECRET: required for env 'prod'") for line in lines)
    assert any("DB_PASWORD: unknown setting (did you mean DB_PASSWORD?)" in line for line in lines)
    assert len(lines) == 4
    assert not any("redis123" in line for line in lines)  # the refused secret itself is never echoed


def test_sandbox_kind_does_not_require_secrets():
    s = build_settings("dev", {"HOSTS": "a", "ENV_KIND": "sandbox"})
    assert s.jwt_secret.reveal() == ""


def test_disabled_services_skip_their_secrets_and_only_infra():
    values = dict(GOOD_PROD, DISABLED_SERVICES="mongodb,qdrant")
    del values["MONGO_PASSWORD"]
    s = build_settings("prod", values)
    assert "mongodb" not in s.enabled_infra and "qdrant" not in s.enabled_services
    with pytest.raises(SettingsError) as info:
        build_settings("prod", dict(GOOD_PROD, DISABLED_SERVICES="backend"))
    assert "DISABLED_SERVICES: 'backend' cannot be disabled" in info.value.lines()[0]


def test_syntax_error_reported_by_line(tmp_path):
    (tmp_path / "bad.env").write_text("HOSTS=a\nthis is not valid\nENV_KIND=sandbox\n")
    values, bad = parse_env_text((tmp_path / "bad.env").read_text())
    assert bad == [2]
    with pytest.raises(SettingsError) as info:
        load_settings("bad", directory=tmp_path)
    assert info.value.lines() == [f"error: {tmp_path / 'bad.env'}:2: cannot parse this line "
                                  "(use KEY=value, quote values with spaces or #)"]


def test_unknown_env_and_env_from_host(tmp_path):
    (tmp_path / "prod.env").write_text("HOSTS=web1,web2\n")
    (tmp_path / "staging.env").write_text("HOSTS=stage1\n")
    assert find_env_for_host("web2", tmp_path) == "prod"
    with pytest.raises(UsageError, match="no environment lists host 'nope'"):
        find_env_for_host("nope", tmp_path)
    with pytest.raises(UsageError, match="no settings file"):
        load_settings("qa", directory=tmp_path)


def test_committed_env_files_are_valid():
    load_settings("sandbox")
    values, bad = parse_env_text(Path("env/example.env").read_text())
    assert not bad
    from deploy.core.settings import KEYS_BY_NAME
    documented = set(values)
    assert documented == set(KEYS_BY_NAME) - {"SAMPLE_APP_IMAGE"}, "env/example.env must document every key"


def test_bad_settings_exit_nonzero_without_connecting(tmp_path):
    """`fab deploy` with bad settings: one line per problem, exit 2, and no SSH attempt (host unreachable)."""
    (tmp_path / "prod.env").write_text("HOSTS=nowhere.invalid\nBATCH_SIZE=x\nKEEP_RELEASES=-1\n")
    proc = subprocess.run([sys.executable, "-m", "fabric", "--env", "prod"] if False else
                          ["fab", "-H", "nowhere.invalid", "deploy", "--env", "prod"],
                          capture_output=True, text=True, env={**__import__("os").environ, "HEALTHDEPLOY_ENV_DIR": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "error: BATCH_SIZE: expected a whole number, got 'x' (How many application hosts a deploy updates at a time.)" in errors
    assert any(line.startswith("error: KEEP_RELEASES: must be at least 1") for line in errors)
    assert any(line.startswith("error: JWT_SECRET: required for env 'prod'") for line in errors)
    assert "cannot reach" not in proc.stderr and "Traceback" not in proc.stderr


def test_sandbox_settings_load_before_the_sandbox_wrote_its_ssh_config(tmp_path, monkeypatch):
    """A fresh clone has no .sandbox/ yet: `inv sandbox.up` loads the settings before it writes the file."""
    import deploy.core.settings as settings_module
    monkeypatch.setattr(settings_module, "PROJECT_ROOT", tmp_path)
    monkeypatch.setenv("HEALTHDEPLOY_ENV_DIR", str(Path("env").resolve()))
    s = load_settings("sandbox")
    assert s.ssh_config == str(tmp_path / ".sandbox" / "ssh_config")
    (tmp_path / "prod.env").write_text("HOSTS=web1\nSSH_CONFIG=.sandbox/../ssh_confg\n")
    monkeypatch.setenv("HEALTHDEPLOY_ENV_DIR", str(tmp_path))
    with pytest.raises(SettingsError) as caught:
        load_settings("prod")
    assert [p.message for p in caught.value.problems if p.key == "SSH_CONFIG"] == [
        f"file {tmp_path / '.sandbox/../ssh_confg'} does not exist"]
