"""Qdrant (an optional extra of `inv backup`): a full storage snapshot through Qdrant's HTTP API, over the
SSH tunnel to its loopback port on the host (the Qdrant image has no HTTP client to run inside it).

The snapshot is created on the server, streamed into the artifact at constant memory with its size and
SHA-256 compared with what Qdrant reports, and then deleted on the server, so the host keeps no copy.
The points per collection, read just before the snapshot, go into the manifest. Restoring a full
snapshot means starting Qdrant with ``--storage-snapshot``; healthdeploy does not automate it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from typing import BinaryIO, Callable
from urllib.parse import quote

from deploy.core.errors import HealthdeployError, IntegrityError
from deploy.core.secret import Secret

PIECE = 1 << 20


class _TunnelHTTP(http.client.HTTPConnection):
    """http.client over a socket-like object from ``open_socket`` (an SSH channel or a plain socket)."""

    def __init__(self, open_socket: Callable[[], object], endpoint: str, timeout: float):
        super().__init__(endpoint, timeout=timeout)
        self._open_socket = open_socket

    def connect(self) -> None:
        self.sock = self._open_socket()
        self.sock.settimeout(self.timeout)


def _headers(api_key) -> dict[str, str]:
    """Qdrant's API key (QDRANT__SERVICE__API_KEY) goes in the ``api-key`` header of every request."""
    headers = {"Accept": "application/json"}
    if api_key:
        headers["api-key"] = api_key.reveal() if isinstance(api_key, Secret) else api_key
    return headers


def _call(conn: http.client.HTTPConnection, method: str, path: str, api_key=None):
    conn.request(method, path, headers=_headers(api_key))
    response = conn.getresponse()
    body = response.read()
    if response.status in (401, 403):
        raise HealthdeployError(f"Qdrant {method} {path}: HTTP {response.status}: the API key was refused",
                                "set QDRANT_API_KEY to the key the server runs with (its QDRANT__SERVICE__API_KEY)")
    if response.status >= 300:
        raise HealthdeployError(f"Qdrant {method} {path}: HTTP {response.status}: {body[:200].decode('utf-8', 'replace')}",
                                "check that Qdrant is healthy (`fab health`) and has disk space for the snapshot")
    return json.loads(body).get("result")


def snapshot(open_socket: Callable[[], object], endpoint: str, out: BinaryIO,
             progress: Callable[[int], None] | None = None, timeout: float = 600, api_key=None) -> dict:
    """Stream a full Qdrant snapshot into ``out``; return what the manifest records. ``api_key`` (a Secret, the
    QDRANT_API_KEY setting) is sent with every request."""
    conn = _TunnelHTTP(open_socket, endpoint, timeout)
    try:
        names = [c["name"] for c in _call(conn, "GET", "/collections", api_key)["collections"]]
        points = {name: _call(conn, "GET", f"/collections/{quote(name, safe='')}", api_key).get("points_count")
                  for name in names}
        made = _call(conn, "POST", "/snapshots?wait=true", api_key)
        path = f"/snapshots/{quote(made['name'], safe='')}"
        try:
            conn.request("GET", path, headers=_headers(api_key))
            response = conn.getresponse()
            if response.status != 200:
                raise HealthdeployError(f"Qdrant GET {path}: HTTP {response.status}", "run the backup again")
            digest, total = hashlib.sha256(), 0
            while chunk := response.read(PIECE):
                out.write(chunk)
                digest.update(chunk)
                total += len(chunk)
                if progress:
                    progress(total)
            if made.get("size") is not None and total != made["size"]:
                raise IntegrityError(f"Qdrant snapshot {made['name']}: {total} bytes received, the server made {made['size']}",
                                     "the stream was cut; run the backup again")
            if made.get("checksum") and digest.hexdigest() != made["checksum"]:
                raise IntegrityError(f"Qdrant snapshot {made['name']}: SHA-256 differs from the server's checksum",
                                     "the stream was corrupted; run the backup again")
        finally:
            _call(conn, "DELETE", f"{path}?wait=true", api_key)  # the host keeps no copy of the snapshot
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        raise HealthdeployError(f"Qdrant snapshot through the tunnel failed: {exc}", "run the backup again") from None
    finally:
        conn.close()
    return {"snapshot": made["name"], "points": points}
