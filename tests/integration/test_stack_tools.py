"""Rendered stack files checked by the real tools: `docker compose config` and `nginx -t` in a real nginx."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy.core.settings import load_settings
from deploy.stack.render import GATEWAY_DIR, Target, render_build_files, render_env_files, render_release_files, render_upstream

FIXTURES = Path(__file__).parent.parent / "fixtures"
NGINX = "healthdeploy/nginx:1.22"


def settings_for(name: str, **overrides):
    if name == "prod":
        return load_settings("prod", directory=FIXTURES, overrides=overrides)
    return load_settings("sandbox", overrides=overrides)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@pytest.mark.parametrize("name", ["prod", "sandbox"])
def test_compose_file_passes_docker_compose_config(name, tmp_path, sandbox_hosts):
    settings = settings_for(name, DEPLOY_PATH=str(tmp_path / "deploy"))
    target = Target.of(settings, "h1", "127.0.0.9")
    write_tree(tmp_path / "deploy" / "shared", render_env_files(settings))
    release = tmp_path / "deploy" / "releases" / "r1"
    write_tree(release, render_release_files(settings, target))
    (release / "release.env").write_text("RELEASE_ID=r1\n")
    proc = subprocess.run(["docker", "compose", "-p", "hd-render", "-f", str(release / "compose.yaml"),
                           "--env-file", str(release / "release.env"), "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    services = subprocess.run(["docker", "compose", "-p", "hd-render", "-f", str(release / "compose.yaml"),
                               "--env-file", str(release / "release.env"), "config", "--services"],
                              capture_output=True, text=True).stdout.split()
    expected = {"gateway", "backend", "ai-service", "frontend-web", "frontend-patient", *settings.enabled_infra}
    assert set(services) == expected


def gateway_dir_with_upstreams(tmp_path: Path, conf: bytes) -> Path:
    gw = tmp_path / "gateway"
    (gw / "upstreams").mkdir(parents=True)
    (gw / "nginx.conf").write_bytes(conf)
    for service in ("backend", "ai-service", "frontend-web", "frontend-patient"):
        (gw / "upstreams" / f"{service}.conf").write_text(render_upstream(service, ["10.1.2.3"], "r1"))
    return gw


def nginx_t(mounts: list[str], conf: str) -> subprocess.CompletedProcess:
    args = ["docker", "run", "--rm", "--network", "none"]
    for mount in mounts:
        args += ["-v", mount]
    return subprocess.run(args + [NGINX, "nginx", "-t", "-c", conf], capture_output=True, text=True)


def test_gateway_config_passes_nginx_t(tmp_path, sandbox_hosts):
    settings = settings_for("prod")
    conf = render_release_files(settings, Target.of(settings, "web1", "10.0.0.1"))["gateway/nginx.conf"]
    gw = gateway_dir_with_upstreams(tmp_path, conf)
    proc = nginx_t([f"{gw}:{GATEWAY_DIR}:ro"], f"{GATEWAY_DIR}/nginx.conf")
    assert proc.returncode == 0, proc.stderr
    # Without upstream files nginx refuses the config: the check is real.
    for f in (gw / "upstreams").iterdir():
        f.unlink()
    assert nginx_t([f"{gw}:{GATEWAY_DIR}:ro"], f"{GATEWAY_DIR}/nginx.conf").returncode != 0


def test_gateway_tls_config_passes_nginx_t(tmp_path, sandbox_hosts):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
                    "/CN=health.example.com", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    settings = settings_for("prod", TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    files = render_release_files(settings, Target.of(settings, "web1", "10.0.0.1"))
    assert b"listen 443 ssl" in files["gateway/nginx.conf"] and b'"0.0.0.0:443:443"' in files["compose.yaml"]
    gw = gateway_dir_with_upstreams(tmp_path, files["gateway/nginx.conf"])
    (gw / "tls").mkdir()
    (gw / "tls" / "cert.pem").write_bytes(cert.read_bytes())
    (gw / "tls" / "key.pem").write_bytes(key.read_bytes())
    proc = nginx_t([f"{gw}:{GATEWAY_DIR}:ro"], f"{GATEWAY_DIR}/nginx.conf")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("service", ["frontend-web", "frontend-patient"])
def test_frontend_config_passes_nginx_t(service, tmp_path, sandbox_hosts):
    conf = tmp_path / "default.conf"
    conf.write_text(render_build_files(settings_for("prod"))[f"{service}/nginx.conf"])
    html = tmp_path / "html"
    html.mkdir()
    proc = nginx_t([f"{conf}:/etc/nginx/conf.d/default.conf:ro", f"{html}:/usr/share/nginx/html:ro"],
                   "/etc/nginx/nginx.conf")
    assert proc.returncode == 0, proc.stderr
