"""Qdrant's API key (QDRANT_API_KEY -> QDRANT__SERVICE__API_KEY): a request without it is refused, `inv backup`
sends it on every request. Against a stand-in HTTP server that checks the `api-key` header the way Qdrant does
(401 without it): no Qdrant server can run on this machine (no image, no registry)."""

from __future__ import annotations

import io
import socket
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest

from deploy.backup import vectors
from deploy.core.errors import HealthdeployError
from deploy.core.secret import Secret
from deploy.core.settings import build_settings
from deploy.stack.render import Target, env_halves
from test_vectors import SNAPSHOT, FakeQdrant

KEY = "qdrant-key-4f1e-9a0b"


class KeyedQdrant(FakeQdrant):
    seen_keys: list = []

    def _authorized(self) -> bool:
        type(self).seen_keys.append(self.headers.get("api-key"))
        if self.headers.get("api-key") == KEY:
            return True
        self._json({"error": "Must provide an API key or an Authorization bearer token"}, status=401)
        return False

    def do_GET(self):
        if self._authorized():
            super().do_GET()

    def do_POST(self):
        if self._authorized():
            super().do_POST()

    def do_DELETE(self):
        if self._authorized():
            super().do_DELETE()


@pytest.fixture
def keyed():
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeyedQdrant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    KeyedQdrant.snapshots, KeyedQdrant.seen_keys, KeyedQdrant.lie_about_checksum = {}, [], False
    yield server.server_address[1]
    server.shutdown()


def test_a_request_without_the_key_is_refused(keyed):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{keyed}/collections", timeout=5)
    assert err.value.code == 401
    with pytest.raises(HealthdeployError, match="the API key was refused") as refused:
        vectors.snapshot(lambda: socket.create_connection(("127.0.0.1", keyed)), f"127.0.0.1:{keyed}", io.BytesIO())
    assert "QDRANT_API_KEY" in refused.value.hint


def test_the_backup_sends_the_key_on_every_request(keyed):
    out = io.BytesIO()
    record = vectors.snapshot(lambda: socket.create_connection(("127.0.0.1", keyed)), f"127.0.0.1:{keyed}", out,
                              api_key=Secret(KEY))
    assert out.getvalue() == SNAPSHOT and record["points"] == {"knowledge": 1200, "病历": 3}
    assert len(KeyedQdrant.seen_keys) == 6 and set(KeyedQdrant.seen_keys) == {KEY}  # list, 2 counts, make, get, delete
    assert KeyedQdrant.snapshots == {}


def test_the_key_reaches_qdrant_and_ai_service_only_in_their_secret_env_halves():
    s = build_settings("t", {"HOSTS": "h", "ENV_KIND": "sandbox", "STACK_VARIANT": "sandbox", "QDRANT_API_KEY": KEY})
    release, secret = env_halves(s, Target.of(s, "h", "127.0.0.2"))
    assert f"QDRANT__SERVICE__API_KEY='{KEY}'" in secret["env/qdrant.env"].decode()
    assert f"QDRANT_API_KEY='{KEY}'" in secret["env/ai-service.env"].decode()
    assert not any(KEY in data.decode() for data in release.values())
    assert not any(KEY in data.decode() for name, data in secret.items() if name not in ("env/qdrant.env", "env/ai-service.env"))
    assert Secret(KEY) in s.secrets
