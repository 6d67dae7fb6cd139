"""A bounded HTTP load on loopback: GET and POST alternately, a new connection per request (or, with
``keepalive=True``, one persistent HTTP/1.1 connection per worker), and a small WebSocket client.

Used by the integration tests (zero failed requests during a roll) and by bench/.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_APP = Path(__file__).resolve().parent.parent / "deploy" / "sandbox" / "app" / "app.py"


def _sample_app():
    """The sample app's module (one WebSocket codec for the server and this client)."""
    spec = importlib.util.spec_from_file_location("healthdeploy_sample_app", _APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ws = _sample_app()
_BUILD_META = re.compile(rb'<meta name="healthdeploy-build" content="([^"]*)"')


@dataclass
class LoadResult:
    total: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    builds: dict[str, int] = field(default_factory=dict)
    connections: int = 0  # TCP connections opened (with keepalive, far fewer than requests)
    # Requests sent again once because a REUSED keep-alive connection was closed before any byte of the
    # response (the server closed it as the request went out): what browsers do, counted apart, never hidden.
    resent_on_stale: int = 0
    failures: list[tuple[float, float, str]] = field(default_factory=list)  # (started, seconds, error), monotonic
    # The load ran out of time (``limit_s``) before its block ended: what came after went unmeasured.
    cut_short: bool = False

    def p99_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def build_of(content_type: str, data: bytes) -> str | None:
    """The build id a response carries: "build" of a JSON body, or the SPA's build meta tag."""
    if "json" in content_type:
        try:
            return json.loads(data).get("build")
        except ValueError:
            return None
    if "html" in content_type:
        match = _BUILD_META.search(data)
        return match.group(1).decode() if match else None
    return None


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """urllib3's is_connection_dropped: an idle keep-alive socket that is readable has been closed by the peer."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class Load:
    """``with Load(host, port, rate=100): ...`` sends requests until the block ends (at most ``limit_s``).

    GET ``path`` and POST ``post_path`` alternate (``post_path=None``: GETs only). ``keepalive=True``
    gives every worker one persistent HTTP/1.1 connection, reused for all its requests and reopened
    after the server closed it. Like urllib3/requests and browsers, an idle connection is checked before
    it is reused (readable = the server sent its FIN, e.g. an nginx worker retiring after a reload): a
    dropped one is replaced, not written to. If the server closes a reused connection just as a request
    goes out (no byte of a response came back), the request is sent once more on a new connection, as
    Chromium and Firefox do for any method (the request never reached an application: nginx closes only
    idle connections); these are counted in ``resent_on_stale``. Anything else counts as failed.
    """

    def __init__(self, host: str, port: int, rate: float = 100, workers: int = 16, path: str = "/api/build",
                 limit_s: float = 1800, timeout: float = 10, keepalive: bool = False,
                 post_path: str | None = "/api/echo"):
        self.host, self.port, self.rate, self.workers, self.path = host, port, rate, workers, path
        self.limit_s, self.timeout, self.keepalive, self.post_path = limit_s, timeout, keepalive, post_path
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _connection(self) -> http.client.HTTPConnection:
        load = self

        class Counted(http.client.HTTPConnection):
            def connect(self):
                super().connect()
                with load._lock:
                    load.result.connections += 1

        return Counted(self.host, self.port, timeout=self.timeout)

    def _one(self, n: int, conn: http.client.HTTPConnection | None) -> http.client.HTTPConnection | None:
        method = "GET" if n % 2 == 0 or self.post_path is None else "POST"
        started = time.monotonic()
        error = None
        build = None
        try:
            if conn is not None and _dropped(conn):
                conn.close()
                conn = None
            reused = conn is not None
            if conn is None:
                conn = self._connection()
            body = b'{"n": %d}' % n if method == "POST" else None
            target = self.path if method == "GET" else self.post_path
            headers = {"Content-Type": "application/json"}
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                conn.close()
                with self._lock:
                    self.result.resent_on_stale += 1
                conn = self._connection()
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
            data = response.read()
            if not self.keepalive:
                conn.close()
                conn = None
            if response.status != 200:
                error = f"{method} -> HTTP {response.status}"
            elif method == "GET":
                build = build_of(response.getheader("Content-Type", ""), data)
        except Exception as exc:  # every failure counts, whatever it is
            error = f"{method} -> {type(exc).__name__}: {exc}"
            if conn is not None:
                conn.close()
            conn = None
        elapsed = time.monotonic() - started
        with self._lock:
            self.result.total += 1
            self.result.latencies.append(elapsed)
            if error:
                self.result.failed += 1
                self.result.errors.append(error)
                self.result.failures.append((started, elapsed, error))
            if build:
                self.result.builds[build] = self.result.builds.get(build, 0) + 1
        return conn if self.keepalive else None

    def _worker(self, index: int) -> None:
        interval = self.workers / self.rate
        n = index
        deadline = time.monotonic() + self.limit_s
        next_at = time.monotonic() + index * (1 / self.rate)
        conn = None
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                conn = self._one(n, conn)
                n += self.workers
                next_at += interval
            if not self._stop.is_set():
                self.result.cut_short = True
        finally:
            if conn is not None:
                conn.close()

    def __enter__(self) -> "Load":
        for i in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        if self.result.cut_short and exc[0] is None:
            # Silence after the limit would read as "no failed request": a test must not pass on it.
            raise AssertionError(f"load on :{self.port} stopped at its limit of {self.limit_s:.0f} s before the "
                                 f"measured block ended; give Load a larger limit_s")


# ------------------------------------------------------------------------------- WebSocket

class WebSocketClient:
    """A minimal RFC 6455 client: connect (through the gateway's /socket.io/, say), send text, read
    messages, and tell how the connection ended.

    ``outcome`` after the end: ``"close"`` (the server sent a close frame: ``close_code``,
    ``close_reason``), ``"reset"`` (ECONNRESET), ``"eof"`` (the TCP connection ended without a close
    frame: the server process died) or ``"timeout"``.

        client = WebSocketClient(host, 5000).connect()
        hello = client.recv_json()            # {"type": "hello", "build": ..., ...}
        client.send_text("ping"); assert client.recv_text() == "ping"
        client.watch()                        # count messages in the background until the end
        ...; client.ended.wait(5); client.outcome, client.close_code, client.messages
    """

    def __init__(self, host: str, port: int, path: str = "/socket.io/", timeout: float = 10):
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.sock: socket.socket | None = None
        self.response_headers: dict[str, str] = {}
        self.messages: list[str | bytes] = []
        self.outcome: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended = threading.Event()
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self._closing = False
        self._watching = False
        self.pongs = 0
        self._reader = ws.MessageReader(self._read_exact, require_mask=False)

    # -- opening
    def connect(self) -> "WebSocketClient":
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed during the WebSocket handshake")
            self._buf += chunk
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0]
        self.response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if " 101 " not in status + " ":
            raise ConnectionError(f"WebSocket handshake refused: {status}")
        if self.response_headers.get("sec-websocket-accept") != ws.ws_accept_key(key):
            raise ConnectionError("WebSocket handshake: wrong Sec-WebSocket-Accept")
        return self

    # -- frames
    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _send(self, opcode: int, payload: bytes | str = b"") -> None:
        with self._send_lock:
            self.sock.sendall(ws.encode_frame(opcode, payload, mask_key=os.urandom(4)))

    def send_text(self, text: str) -> None:
        self._send(ws.OP_TEXT, text)

    def ping(self, payload: bytes = b"") -> None:
        self._send(ws.OP_PING, payload)

    def recv(self, timeout: float | None = None):
        """The next data message (str or bytes); answers pings; raises EOFError when the connection ended."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            try:
                opcode, payload = self._reader.next_message()
            except socket.timeout:
                self._end("timeout")
                raise
            except ConnectionResetError:
                self._end("reset")
                raise
            except (EOFError, OSError):
                self._end("eof")
                raise EOFError("connection ended without a close frame")
            if opcode == ws.OP_PING:
                self._send(ws.OP_PONG, payload)
            elif opcode == ws.OP_PONG:
                self.pongs += 1
            elif opcode == ws.OP_CLOSE:
                self.close_code, self.close_reason = ws.parse_close_payload(payload)
                if not self._closing:  # answer the server's close, as the protocol asks
                    try:
                        self._send(ws.OP_CLOSE, payload[:2])
                    except OSError:
                        pass
                self._end("close")
                raise EOFError(f"closed by the server: {self.close_code} {self.close_reason}")
            else:
                self.messages.append(payload)
                return payload

    def recv_text(self, timeout: float | None = None) -> str:
        message = self.recv(timeout)
        assert isinstance(message, str), message
        return message

    def recv_json(self, timeout: float | None = None) -> dict:
        return json.loads(self.recv_text(timeout))

    def _end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self.ended.set()

    def watch(self, timeout: float | None = None) -> threading.Thread:
        """Read (and count) messages in a background thread until the connection ends."""
        def loop():
            self.sock.settimeout(timeout)
            try:
                while True:
                    self.recv()
            except BaseException:
                self._end(self.outcome or "eof")

        self._watching = True
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def close(self, code: int = 1000, wait: float = 2.0) -> None:
        """Start the closing handshake, wait for the server's answer, then close the socket."""
        if self.sock is None:
            return
        if not self.ended.is_set():
            self._closing = True
            try:
                self._send(ws.OP_CLOSE, ws.close_payload(code))
                if self._watching:  # the watcher reads the answer
                    self.ended.wait(wait)
                deadline = time.monotonic() + wait
                while not self.ended.is_set() and time.monotonic() < deadline:
                    self.recv(timeout=max(0.05, deadline - time.monotonic()))
            except (EOFError, OSError):
                pass
        self.sock.close()
