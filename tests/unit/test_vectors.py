"""Qdrant snapshots (deploy/vectors.py) against a stand-in HTTP server on loopback that answers like
Qdrant's snapshot API: no Qdrant server can be had on this machine (no image, no registry)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deploy.backup import vectors
from deploy.core.errors import IntegrityError

SNAPSHOT = os.urandom(3 << 20)


class FakeQdrant(BaseHTTPRequestHandler):
    snapshots: dict = {}
    lie_about_checksum = False

    def log_message(self, *args):
        pass

    def _json(self, result, status=200):
        body = json.dumps({"result": result, "status": "ok"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/collections":
            return self._json({"collections": [{"name": "knowledge"}, {"name": "病历"}]})
        if self.path.startswith("/collections/"):
            return self._json({"points_count": 1200 if self.path.endswith("knowledge") else 3})
        name = self.path.split("/")[-1]
        data = self.snapshots[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        name = f"full-snapshot-{len(self.snapshots)}.snapshot"
        self.snapshots[name] = SNAPSHOT
        checksum = hashlib.sha256(b"other" if self.lie_about_checksum else SNAPSHOT).hexdigest()
        self._json({"name": name, "size": len(SNAPSHOT), "checksum": checksum})

    def do_DELETE(self):
        del self.snapshots[self.path.split("?")[0].split("/")[-1]]
        self._json(True)


@pytest.fixture
def qdrant():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeQdrant)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeQdrant.snapshots, FakeQdrant.lie_about_checksum = {}, False
    yield server.server_address[1]
    server.shutdown()


def test_snapshot_is_streamed_checked_and_removed_from_the_server(qdrant):
    out = io.BytesIO()
    seen = []
    record = vectors.snapshot(lambda: socket.create_connection(("127.0.0.1", qdrant)), f"127.0.0.1:{qdrant}", out,
                              progress=seen.append)
    assert out.getvalue() == SNAPSHOT and seen[-1] == len(SNAPSHOT)
    assert record == {"snapshot": "full-snapshot-0.snapshot", "points": {"knowledge": 1200, "病历": 3}}
    assert FakeQdrant.snapshots == {}  # deleted on the server after the download


def test_a_snapshot_that_differs_from_the_servers_checksum_is_refused(qdrant):
    FakeQdrant.lie_about_checksum = True
    with pytest.raises(IntegrityError, match="SHA-256 differs from the server's checksum"):
        vectors.snapshot(lambda: socket.create_connection(("127.0.0.1", qdrant)), f"127.0.0.1:{qdrant}", io.BytesIO())
    assert FakeQdrant.snapshots == {}
