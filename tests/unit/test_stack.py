"""The rendered stack: golden files pin the output; static checks hold the report's rules."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from deploy.core.settings import load_settings
from deploy.stack.render import Target, render_build_files, render_env_files, render_release_files, render_upstream

FIXTURES = Path(__file__).parent.parent / "fixtures"
GOLDEN = Path(__file__).parent.parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def environments():
    return {
        "prod": (load_settings("prod", directory=FIXTURES), "web1", "10.0.0.11"),
        "sandbox": (load_settings("sandbox"), "sandbox", "127.0.0.2"),
    }


@pytest.mark.parametrize("name", ["prod", "sandbox"])
def test_rendered_files_match_golden(name):
    settings, alias, address = environments()[name]
    files = render_release_files(settings, Target.of(settings, alias, address))
    for path, data in files.items():
        golden = GOLDEN / name / path
        if UPDATE:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_bytes(data)
        assert golden.read_bytes() == data, f"{path} differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    pinned = sorted(str(p.relative_to(GOLDEN / name)) for p in (GOLDEN / name).rglob("*") if p.is_file())
    assert pinned == sorted(files)


def test_upstream_file():
    import datetime as dt
    text = render_upstream("backend", ["172.18.0.5", "172.18.0.6"], "r1", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert "upstream backend {" in text and "server 172.18.0.5:5000 max_fails=0;" in text
    assert "server 172.18.0.6:5000" in text and "keepalive 16;" in text
    empty = render_upstream("frontend-web", [], "r1")
    assert "upstream frontend_web {" in empty and "server 127.0.0.1:9 down;" in empty


def final_stage(dockerfile: str) -> str:
    return dockerfile[dockerfile.rindex("\nFROM "):]


@pytest.mark.parametrize("service", ["backend", "ai-service", "frontend-web", "frontend-patient"])
def test_production_dockerfiles_follow_the_report(service):
    settings = load_settings("prod", directory=FIXTURES)
    files = render_build_files(settings)
    dockerfile = files[f"{service}/Dockerfile"]
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(froms) >= 2, "multi-stage"
    for image in froms:
        assert image in (settings.node_image, settings.python_image, settings.nginx_image), "bases pinned by settings"
        assert not image.endswith(":latest") and ":" in image
    final = final_stage(dockerfile)
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and users[-1] not in ("root", "0"), "runs as non-root"
    assert "HEALTHCHECK" in final and "/health" in final
    port = {"backend": "5000", "ai-service": "8001"}.get(service, "80")
    assert f"EXPOSE {port}" in final
    # No secret in any layer: no ENV/ARG carrying a secret-looking name, no .env copied explicitly.
    for line in dockerfile.splitlines():
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", line), line
    assert ".env" in files[f"{service}/.dockerignore"].split()
    assert "node_modules" in files[f"{service}/.dockerignore"] or service == "ai-service"
    # Dependencies before source: the lock file is copied before the whole tree.
    assert dockerfile.index("COPY . .") > dockerfile.index("COPY p")


def test_frontend_nginx_has_the_reports_rules():
    files = render_build_files(load_settings("prod", directory=FIXTURES))
    for service in ("frontend-web", "frontend-patient"):
        conf = files[f"{service}/nginx.conf"]
        for rule in ("try_files $uri $uri/ /index.html", "gzip on", "expires 1y", "X-Frame-Options",
                     "X-Content-Type-Options", "location /socket.io/", 'proxy_set_header Upgrade $http_upgrade',
                     "location /api/", "location = /health"):
            assert rule in conf, f"{service}: {rule}"


def test_gateway_passes_websocket_upgrades():
    settings = load_settings("prod", directory=FIXTURES)
    conf = render_release_files(settings, Target.of(settings, "web1", "10.0.0.11"))["gateway/nginx.conf"].decode()
    # Both hop-by-hop headers must be set again, or the handshake reaches the backend as a plain GET.
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    assert conf.count("location /socket.io/") == 2  # the frontend sites 3000 and 3001 (5000 passes everything)


def test_compose_hardening():
    settings = load_settings("prod", directory=FIXTURES)
    compose = render_release_files(settings, Target.of(settings, "web1", "10.0.0.11"))["compose.yaml"].decode()
    assert compose.count("init: true") == 12 and compose.count("restart: unless-stopped") == 12
    assert compose.count("healthcheck:") == 12
    assert "condition: service_healthy" in compose
    assert '"127.0.0.1:5432:5432"' in compose and '"0.0.0.0:5432' not in compose  # PUBLISH_INFRA=loopback
    assert "max-size" in compose and "max-file" in compose
    for secret in settings.secrets:  # no secret in the compose file
        assert secret.reveal() not in compose
    for app in ("backend", "ai-service", "frontend-web", "frontend-patient"):
        block = compose.split(f"\n  {app}:\n")[1].split("\n\n")[0]
        assert "image: healthdeploy/" in block and "ports:" not in block, f"{app} must not publish ports"


def test_env_files_hold_the_secrets_per_service():
    envs = render_env_files(load_settings("prod", directory=FIXTURES))
    backend = envs["env/backend.env"].decode()
    assert "JWT_SECRET='jjjj" in backend and "DATABASE_URL='postgresql://admin:Zq8vT3-long-db-pass@postgres:5432/" in backend
    assert "DEEPSEEK_API_KEY" not in backend  # each service gets only what it needs
    assert "DB_PASSWORD" not in envs["env/ai-service.env"].decode()
    assert set(envs) == {f"env/{s}.env" for s in ("backend", "ai-service", "frontend-web", "frontend-patient", "postgres",
                                                   "redis", "influxdb", "mongodb", "emqx", "minio", "qdrant")}
