"""`inv demo`'s closing table: every endpoint through the gateway, and the build each one names.

A frontend's /health is nginx's plain "ok" (not JSON): the demo read every answer as JSON and so ended
UNHEALTHY (exit 7) on a healthy stack."""

from __future__ import annotations

import io
import urllib.error
from types import SimpleNamespace

from deploy.cli import day2
from deploy.core.errors import EXIT_OK, ExitCode
from deploy.core.settings import PROJECT_ROOT

INDEX = (PROJECT_ROOT / "deploy" / "sandbox" / "app" / "frontend-web" / "index.html").read_bytes().replace(
    b"%BUILD_ID%", b"frontend-web-v1")


def test_build_of_a_json_answer_a_page_and_plain_text():
    assert day2.build_of(b'{"status": "ok", "build": "backend-v3"}') == "backend-v3"
    assert day2.build_of(INDEX) == "frontend-web-v1"
    assert day2.build_of(b"ok\n") == ""
    assert day2.build_of(b"[1, 2]") == ""


class _Answer(io.BytesIO):
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _runtime(tables):
    settings = SimpleNamespace(hosts=("web1",), role_of=lambda alias: SimpleNamespace(runs_app=True))
    console = SimpleNamespace(table=lambda header, rows: tables.append(rows))
    return SimpleNamespace(settings=settings, console=console,
                           target=lambda alias: SimpleNamespace(gateway_bind="127.0.0.9"))


def _serve(monkeypatch, answers):
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        body = answers[url]
        if isinstance(body, Exception):
            raise body
        return _Answer(body)

    monkeypatch.setattr(day2.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(day2, "choose_hosts", lambda settings, hosts: list(hosts))
    return asked


HEALTHY = {
    "http://127.0.0.9:3000/": INDEX,
    "http://127.0.0.9:3001/": INDEX.replace(b"frontend-web-v1", b"frontend-patient-v1"),
    "http://127.0.0.9:5000/health": b'{"status": "ok", "build": "backend-v1"}',
    "http://127.0.0.9:8001/health": b'{"status": "ok", "build": "ai-service-v1"}',
}


def test_a_healthy_stack_is_exit_0_with_every_build(monkeypatch):
    asked, tables = _serve(monkeypatch, HEALTHY), []
    assert day2.show_endpoints(_runtime(tables), ["web1"]) == EXIT_OK
    assert sorted(asked) == sorted(HEALTHY)
    assert {row[1]: row[4] for row in tables[0]} == {
        "frontend-web": "frontend-web-v1", "frontend-patient": "frontend-patient-v1",
        "backend": "backend-v1", "ai-service": "ai-service-v1"}


def test_an_endpoint_that_does_not_answer_is_exit_7_and_named(monkeypatch):
    answers = dict(HEALTHY, **{"http://127.0.0.9:5000/health": urllib.error.URLError("Connection refused")})
    _serve(monkeypatch, answers)
    tables = []
    assert day2.show_endpoints(_runtime(tables), ["web1"]) == ExitCode.UNHEALTHY
    row = next(r for r in tables[0] if r[1] == "backend")
    assert "Connection refused" in str(row[3])
