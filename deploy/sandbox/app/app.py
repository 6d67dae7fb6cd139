#!/usr/bin/env python3
"""Sandbox stand-in for the backend (NestJS) and ai-service (FastAPI); the two frontends are nginx
serving a static build (see build_spa.py and the Dockerfile).

`python3 app.py` serves HTTP/1.1 with keep-alive; `python3 app.py migrate` applies
$SERVICE_DIR/migrations/*.sql to PostgreSQL with the psql CLI. Standard library, plus psycopg2 and
redis (Debian's python3-psycopg2 and python3-redis) for the backend's data stores, imported lazily.

What it does, per service:
  backend     GET /api/build reads PostgreSQL (patients, requests) and INCRs a Redis counter;
              POST /api/echo INSERTs a row into `requests` and answers 200 only once it committed.
              A missing table, an unreachable database or refused Redis credentials answer 5xx.
  ai-service  GET and POST answer from memory (no data store).
  both        /health (cheap; health_mode=fail makes it 500; reports "db" for the backend),
              /ready (503 when the data stores cannot serve), GET /api/slow?ms=N, a WebSocket at
              /socket.io/ (hello with the build id, then echoes), /internal/connections (only when
              reached directly on the container network, never through the gateway).

Behaviour on SIGTERM (env BEHAVIOUR, else the file $SERVICE_DIR/behaviour, read when the signal
arrives; default polite):
  polite  stop accepting, close idle keep-alive connections, finish in-flight requests (at most
          DRAIN_SECONDS), then send a close frame 1001 "going away" to every open WebSocket, exit 0.
  rude    exit at once (like a NestJS app without shutdown hooks): in-flight requests, keep-alive
          connections and WebSockets are cut.

Environment:
  SERVICE        service name (set by the image)
  PORT           listen port (default per service: 5000, 8001)
  WORK_MS        simulated work per API request in ms (default 50; not for /health)
  RELEASE_ID     optional, echoed as "release"
  DATABASE_URL   postgresql://user:pass@host:5432/db[?schema=public] (backend, and migrate)
  REDIS_HOST, REDIS_PORT, REDIS_PASSWORD   (backend)
  LISTEN_BACKLOG listen queue length (default 1024, as Node's default 511 or more; the kernel
                 caps it at net.core.somaxconn)
  KEEPALIVE_S    idle keep-alive timeout (default 75: longer than nginx's upstream 60 s, so the
                 proxy, not the server, closes idle connections)
  DB_POOL_SIZE   persistent PostgreSQL connections (default 5)
  BEHAVIOUR      polite | rude (see above)
  SERVICE_DIR    default /app/service (build_id, health_mode, behaviour, migrations/)
"""

import base64
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PORTS = {"backend": 5000, "ai-service": 8001}
SERVICE = os.environ.get("SERVICE", "backend")
SERVICE_DIR = os.environ.get("SERVICE_DIR", "/app/service")
BEHAVIOURS = ("polite", "rude")


def _env_number(name, default, kind=float):
    try:
        return kind(os.environ.get(name) or default)
    except ValueError:
        return kind(default)


DRAIN_SECONDS = _env_number("DRAIN_SECONDS", 10.0)
WS_CLOSE_WAIT = 2.0
LISTEN_BACKLOG = _env_number("LISTEN_BACKLOG", 1024, int)
KEEPALIVE_S = _env_number("KEEPALIVE_S", 75.0)


def log(msg):
    print("[%s] %s" % (SERVICE, msg), flush=True)


def read_file(name, default=""):
    try:
        with open(os.path.join(SERVICE_DIR, name), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return default


def work_seconds():
    return max(0.0, _env_number("WORK_MS", 50.0) / 1000.0)


def behaviour():
    """polite or rude: env BEHAVIOUR, else the service dir's `behaviour` file (read on every call)."""
    value = (os.environ.get("BEHAVIOUR") or read_file("behaviour") or "polite").strip().lower()
    return value if value in BEHAVIOURS else "polite"


BUILD_ID = read_file("build_id", "unknown")


def identity():
    info = {"service": SERVICE, "build": BUILD_ID, "host": socket.gethostname()}
    if os.environ.get("RELEASE_ID"):
        info["release"] = os.environ["RELEASE_ID"]
    return info


# ------------------------------------------------------------ WebSocket (RFC 6455), pure codec

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
WS_MAX_MESSAGE = 1 << 20


class WebSocketError(Exception):
    """A protocol violation by the peer; ``code`` is the close code to answer with."""

    def __init__(self, message, code=1002):
        super().__init__(message)
        self.code = code


def ws_accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key.strip() + WS_GUID).encode()).digest()).decode()


def encode_frame(opcode, payload=b"", mask_key=None, fin=True):
    """One frame. Clients must mask (pass 4 bytes); servers must not."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if opcode in CONTROL_OPCODES and (len(payload) > 125 or not fin):
        raise ValueError("control frames carry at most 125 bytes and are never fragmented")
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask_key is not None else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if mask_key is None:
        return bytes(head) + payload
    if len(mask_key) != 4:
        raise ValueError("a mask key has 4 bytes")
    return bytes(head) + mask_key + apply_mask(payload, mask_key)


def apply_mask(data, mask_key):
    if not data:
        return b""
    # XOR with the key repeated, done on one big integer (fast enough for test payloads).
    key = (mask_key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def read_frame(read_exact, require_mask, max_size=WS_MAX_MESSAGE):
    """(fin, opcode, payload) of the next frame; ``read_exact(n)`` returns n bytes or raises EOFError."""
    b0, b1 = read_exact(2)
    fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
    masked, n = bool(b1 & 0x80), b1 & 0x7F
    if rsv:
        raise WebSocketError("reserved bits set (no extension was negotiated)")
    if opcode not in (OP_CONT, OP_TEXT, OP_BINARY) + CONTROL_OPCODES:
        raise WebSocketError("unknown opcode %#x" % opcode)
    if opcode in CONTROL_OPCODES and (not fin or n > 125):
        raise WebSocketError("fragmented or oversized control frame")
    if masked != require_mask:
        raise WebSocketError("client frames must be masked" if require_mask else "server frames must not be masked")
    if n == 126:
        n = struct.unpack("!H", read_exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read_exact(8))[0]
    if n > max_size:
        raise WebSocketError("frame of %d bytes is too big" % n, code=1009)
    mask_key = read_exact(4) if masked else None
    payload = read_exact(n) if n else b""
    if mask_key:
        payload = apply_mask(payload, mask_key)
    return fin, opcode, payload


class MessageReader:
    """Whole messages from frames: data frames are joined across continuations; control frames,
    which may arrive between fragments, are returned as they come."""

    def __init__(self, read_exact, require_mask, max_size=WS_MAX_MESSAGE):
        self.read_exact, self.require_mask, self.max_size = read_exact, require_mask, max_size
        self._opcode, self._parts, self._size = None, [], 0

    def next_message(self):
        """(opcode, payload): text payloads are str (UTF-8 checked), others bytes."""
        while True:
            fin, opcode, payload = read_frame(self.read_exact, self.require_mask, self.max_size)
            if opcode in CONTROL_OPCODES:
                return opcode, payload
            if opcode == OP_CONT:
                if self._opcode is None:
                    raise WebSocketError("continuation frame without a message")
            else:
                if self._opcode is not None:
                    raise WebSocketError("new message before the previous one ended")
                self._opcode = opcode
            self._size += len(payload)
            if self._size > self.max_size:
                raise WebSocketError("message too big", code=1009)
            self._parts.append(payload)
            if fin:
                opcode, data = self._opcode, b"".join(self._parts)
                self._opcode, self._parts, self._size = None, [], 0
                if opcode == OP_TEXT:
                    try:
                        return opcode, data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise WebSocketError("text message is not UTF-8", code=1007)
                return opcode, data


def close_payload(code, reason=""):
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


def parse_close_payload(payload):
    """(code, reason) of a close frame; (1005, "") when it carries no code."""
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class WebSocket:
    """The server side of one upgraded connection: hello, then echo every message."""

    def __init__(self, sock, rfile):
        self.sock = sock
        self._send_lock = threading.Lock()
        self.close_sent = False

        def read_exact(n):
            data = rfile.read(n)
            if len(data) < n:
                raise EOFError("connection closed")
            return data

        self.reader = MessageReader(read_exact, require_mask=True)

    def send(self, opcode, payload):
        with self._send_lock:
            if self.close_sent:
                return
            if opcode == OP_CLOSE:
                self.close_sent = True
            self.sock.sendall(encode_frame(opcode, payload))

    def close(self, code=1001, reason="going away"):
        try:
            self.send(OP_CLOSE, close_payload(code, reason))
        except OSError:
            pass

    def abort(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self, hello):
        self.send(OP_TEXT, json.dumps(hello))
        try:
            while True:
                opcode, payload = self.reader.next_message()
                if opcode == OP_TEXT:
                    self.send(OP_TEXT, payload)
                elif opcode == OP_BINARY:
                    self.send(OP_BINARY, payload)
                elif opcode == OP_PING:
                    self.send(OP_PONG, payload)
                elif opcode == OP_CLOSE:
                    code, _ = parse_close_payload(payload)
                    # Echo the peer's code (or answer ours, if we started the closing handshake).
                    self.send(OP_CLOSE, close_payload(code if code != 1005 else 1000))
                    return
        except WebSocketError as exc:
            self.close(exc.code, str(exc)[:100])
        except (EOFError, OSError, ValueError):
            pass


# ---------------------------------------------------------------- PostgreSQL connection pool

class PoolTimeout(Exception):
    pass


def _closed(exc, conn):
    return bool(getattr(conn, "closed", 0))


class Pool:
    """A few persistent connections, opened lazily and reused (like Prisma's pool).

    ``run(fn)`` calls ``fn(conn)``. A connection that turns out to be broken (``is_broken(exc,
    conn)``: psycopg2 sets ``conn.closed`` when the server went away) is discarded; if it came from
    the idle list (stale: the database restarted since), ``fn`` is retried once on a new
    connection. Errors on a fresh connection, and every other error, go to the caller.
    """

    def __init__(self, connect, size=5, acquire_timeout=5.0, is_broken=_closed):
        self.connect, self.size, self.acquire_timeout, self.is_broken = connect, size, acquire_timeout, is_broken
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle = []
        self.opened = 0  # connections ever opened (for tests and logs)

    def _acquire(self, allow_idle=True):
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise PoolTimeout("no database connection free after %.0fs (pool of %d)" % (self.acquire_timeout, self.size))
        if allow_idle:
            with self._lock:
                if self._idle:
                    return self._idle.pop(), True
        try:
            conn = self.connect()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self.opened += 1
        return conn, False

    def _release(self, conn, keep):
        if keep:
            with self._lock:
                self._idle.append(conn)
        else:
            try:
                conn.close()
            except Exception:
                pass
        self._slots.release()

    def run(self, fn):
        conn, reused = self._acquire()
        try:
            result = fn(conn)
        except Exception as exc:
            broken = self.is_broken(exc, conn)
            self._release(conn, keep=not broken)
            if not (broken and reused):
                raise
            conn, _ = self._acquire(allow_idle=False)
            try:
                result = fn(conn)
            except Exception as exc2:
                self._release(conn, keep=not self.is_broken(exc2, conn))
                raise
        self._release(conn, keep=True)
        return result

    @property
    def idle(self):
        with self._lock:
            return len(self._idle)

    def close_all(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:
                pass


def parse_database_url(url):
    """libpq keywords from a postgresql:// URL (Prisma's ?schema= becomes the search_path)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("DATABASE_URL must start with postgresql://")
    unq = urllib.parse.unquote
    out = {}
    if parts.hostname:
        out["host"] = unq(parts.hostname)
    out["port"] = parts.port or 5432
    if parts.username:
        out["user"] = unq(parts.username)
    if parts.password is not None:
        out["password"] = unq(parts.password)
    if parts.path.strip("/"):
        out["dbname"] = unq(parts.path.lstrip("/"))
    for key, values in urllib.parse.parse_qs(parts.query).items():
        if key in ("sslmode", "connect_timeout", "application_name"):
            out[key] = values[-1]
        elif key == "schema":
            out["schema"] = values[-1]
    return out


# ------------------------------------------------------------------------ the backend's data

class DataError(Exception):
    """A data store could not serve: ``status`` 503 (unreachable, overloaded) or 500."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Data:
    """PostgreSQL (pool) and Redis for the backend; absent for services without DATABASE_URL."""

    def __init__(self, service=SERVICE, environ=os.environ):
        self.enabled = service == "backend"
        self.url = environ.get("DATABASE_URL")
        self.redis_host = environ.get("REDIS_HOST")
        self.redis_port = int(environ.get("REDIS_PORT") or 6379)
        self.redis_password = environ.get("REDIS_PASSWORD") or None
        self.pool = None
        self.redis = None
        self.db_state, self.db_error = "unknown", ""
        self._logged = {}
        if not self.enabled:
            return
        if self.url:
            params = parse_database_url(self.url)
            schema = params.pop("schema", None)
            params.setdefault("connect_timeout", "3")
            params.setdefault("application_name", "%s-%s" % (SERVICE, socket.gethostname()))
            options = "-c statement_timeout=5000"
            if schema:
                options += " -c search_path=%s" % schema
            params["options"] = options
            params.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)

            def connect():
                import psycopg2  # Debian's python3-psycopg2 in the base image

                conn = psycopg2.connect(**params)
                conn.autocommit = True  # each statement commits when execute() returns
                return conn

            def broken(exc, conn):
                import psycopg2

                return bool(conn.closed) or isinstance(exc, psycopg2.InterfaceError)

            self.pool = Pool(connect, size=_env_number("DB_POOL_SIZE", 5, int), acquire_timeout=5.0, is_broken=broken)

    # -- helpers
    def _log_once(self, what, message):
        now = time.monotonic()
        key = (what, message)
        if now - self._logged.get(key, -1e9) > 10:
            self._logged[key] = now
            log("%s: %s" % (what, message))

    def _db(self, fn):
        if self.pool is None:
            raise DataError(500, "DATABASE_URL is not set")
        try:
            import psycopg2
        except ImportError:
            raise DataError(500, "psycopg2 is not installed (python3-psycopg2 in the base image)")

        try:
            result = self.pool.run(fn)
        except PoolTimeout as exc:
            self._log_once("db", str(exc))
            raise DataError(503, str(exc))
        except psycopg2.OperationalError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.db_state, self.db_error = "fail", message
            self._log_once("db", message)
            raise DataError(503, "database unavailable: %s" % message)
        except psycopg2.Error as exc:
            self.db_state, self.db_error = "ok", ""  # it answered: reachable, but refused the query
            message = (exc.pgerror or str(exc)).strip().splitlines()[0]
            self._log_once("db", message)
            raise DataError(500, "database error: %s" % message)
        self.db_state, self.db_error = "ok", ""
        return result

    def _redis_client(self):
        if self.redis is None:
            import redis  # Debian's python3-redis

            pool = redis.BlockingConnectionPool(
                host=self.redis_host, port=self.redis_port, password=self.redis_password, max_connections=10,
                timeout=2, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)
            self.redis = redis.Redis(connection_pool=pool)
        return self.redis

    def _redis(self, fn):
        if not self.redis_host:
            raise DataError(500, "REDIS_HOST is not set")
        try:
            import redis
        except ImportError:
            raise DataError(500, "redis is not installed (python3-redis in the base image)")

        try:
            return fn(self._redis_client())
        except redis.exceptions.AuthenticationError as exc:
            self._log_once("redis", "authentication refused: %s" % exc)
            raise DataError(500, "redis refused the credentials: %s" % exc)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._log_once("redis", str(exc))
            raise DataError(503, "redis unavailable: %s" % exc)
        except redis.exceptions.RedisError as exc:
            if str(exc).startswith(("WRONGPASS", "NOAUTH")):  # redis-py 4.3 maps only some of them
                self._log_once("redis", "authentication refused: %s" % exc)
                raise DataError(500, "redis refused the credentials: %s" % exc)
            self._log_once("redis", str(exc))
            raise DataError(500, "redis error: %s" % exc)

    # -- what the API does
    def read_build(self):
        def query(conn):
            with conn.cursor() as cur:
                cur.execute("SELECT (SELECT count(*) FROM patients), (SELECT coalesce(max(id), 0) FROM requests)")
                return cur.fetchone()

        patients, last_id = self._db(query)
        hits = self._redis(lambda r: r.incr("hits:%s" % SERVICE))
        return {"patients": patients, "last_request_id": last_id, "hits": hits}

    def insert_request(self, path, received):
        def insert(conn):
            with conn.cursor() as cur:
                cur.execute("INSERT INTO requests (service, build, host, path, body_bytes) "
                            "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                            (SERVICE, BUILD_ID, socket.gethostname(), path, received))
                return cur.fetchone()[0]

        return {"id": self._db(insert)}

    def check(self):
        """/ready: every store answers and the schema is there."""
        def query(conn):
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM patients LIMIT 0")
                cur.execute("SELECT 1 FROM requests LIMIT 0")

        self._db(query)
        self._redis(lambda r: r.ping())
        return {"db": "ok", "schema": "ok", "redis": "ok"}

    def probe(self):
        """Background check for /health: reachability only, never raises."""
        try:
            self._db(lambda conn: conn.cursor().execute("SELECT 1"))
        except DataError:
            pass

    def start_monitor(self, interval=2.0):
        if self.pool is None:
            return

        def loop():
            while True:
                self.probe()
                time.sleep(interval)

        threading.Thread(target=loop, name="db-monitor", daemon=True).start()


DATA = None  # set by serve()


# -------------------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 with keep-alive, like Node and uvicorn: the gateway's upstream pool reuses connections.
    protocol_version = "HTTP/1.1"
    server_version = "healthdeploy-sandbox"
    timeout = KEEPALIVE_S  # idle keep-alive connections (and stalled reads) end after this

    def log_message(self, format, *args):  # no per-request log lines
        pass

    # -- connection accounting (see Server)
    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.busy = True  # counted as in flight when accepted (Server.process_request)
        self.websocket = None

    def _set_busy(self, busy):
        self.server.set_busy(self, busy)

    def handle(self):
        try:
            self.close_connection = True
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()
        finally:
            self.server.forget(self)

    def handle_one_request(self):
        # BaseHTTPRequestHandler.handle_one_request, plus: the connection counts as in flight from
        # the moment a request line arrives until its response is written, and as idle in between.
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            self._set_busy(True)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, "Unsupported method (%r)" % self.command)
                return
            try:
                method()
            except (TimeoutError, ConnectionError):
                raise
            except Exception as exc:  # a bug must still answer, not reset the connection
                log("error on %s %s: %s: %s" % (self.command, self.path, type(exc).__name__, exc))
                self.close_connection = True
                self._send(500, dict(identity(), error="%s: %s" % (type(exc).__name__, exc)))
            self.wfile.flush()
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        finally:
            if self.websocket is None and not self.server.set_busy(self, False):
                self.close_connection = True  # stopping: do not wait for another request

    # -- responses
    def _send(self, status, payload, head=False):
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.server.stopping.is_set():
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _fail(self, exc, extra=None, head=False):
        self._send(exc.status, dict(identity(), error=str(exc), **(extra or {})), head)

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _proxied(self):
        return bool(self.headers.get("X-Forwarded-For") or self.headers.get("X-Real-IP"))

    def _get(self, head=False):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if self.command == "GET" and path.startswith("/socket.io") and \
                self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        if path == "/health":
            info = dict(identity(), status="ok", behaviour=behaviour())
            if DATA is not None and DATA.enabled:
                info["db"] = DATA.db_state  # ok | fail (| unknown before the first check)
                if DATA.db_error:
                    info["db_error"] = DATA.db_error
            # Checked per request so `echo fail > health_mode` flips it live.
            if read_file("health_mode").lower() == "fail":
                info["status"] = "fail"
                return self._send(500, info, head)
            return self._send(200, info, head)
        if path == "/ready":
            try:
                checks = DATA.check() if DATA is not None and DATA.enabled else {}
            except DataError as exc:
                return self._send(503, dict(identity(), status="not ready", error=str(exc)), head)
            return self._send(200, dict(identity(), status="ready", **checks), head)
        if path == "/internal/connections":
            if self._proxied():  # through the gateway: it does not exist
                return self._send(404, {"error": "not found"}, head)
            return self._send(200, dict(identity(), behaviour=behaviour(), **self.server.counts(self)), head)
        if path == "/api/slow":
            try:
                ms = min(120000.0, max(0.0, float(urllib.parse.parse_qs(url.query).get("ms", ["2000"])[-1])))
            except ValueError:
                ms = 2000.0
            time.sleep(ms / 1000.0)
            return self._send(200, dict(identity(), path=path, slept_ms=ms), head)
        time.sleep(work_seconds())
        info = dict(identity(), path=path, method=self.command)
        if path == "/api/build" and DATA is not None and DATA.enabled:
            try:
                info.update(DATA.read_build())
            except DataError as exc:
                return self._fail(exc, head=head)
        # Every other GET answers 200 (the gateway may route any /api/ path to the backend).
        return self._send(200, info, head)

    def do_GET(self):
        self._get()

    def do_HEAD(self):
        self._get(head=True)

    def _write(self):
        body = self._read_body()
        time.sleep(work_seconds())
        path = urllib.parse.urlsplit(self.path).path
        info = dict(identity(), path=path, method=self.command, received=len(body))
        if path == "/api/echo" and self.command == "POST" and DATA is not None and DATA.enabled:
            try:
                info.update(DATA.insert_request(path, len(body)))
            except DataError as exc:
                return self._fail(exc)
        self._send(200, info)

    do_POST = do_PUT = do_PATCH = do_DELETE = _write

    def _websocket(self):
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or self.headers.get("Sec-WebSocket-Version") != "13" or \
                "upgrade" not in self.headers.get("Connection", "").lower():
            return self._send(400, {"error": "bad WebSocket handshake"})
        if self.server.stopping.is_set():
            return self._send(503, {"error": "shutting down"})
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws_accept_key(key))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self.connection.settimeout(None)  # a WebSocket may stay quiet for long
        ws = WebSocket(self.connection, self.rfile)
        self.websocket = ws
        self.server.opened_websocket(self, ws)
        try:
            ws.run(dict(identity(), type="hello"))
        finally:
            self.server.closed_websocket(ws)


class Server(ThreadingHTTPServer):
    """Counts what SIGTERM has to drain: requests in flight, idle keep-alive connections, WebSockets."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args, **kwargs):
        self.cond = threading.Condition()
        self.inflight = 0
        self.idle = set()
        self.websockets = set()
        self.stopping = threading.Event()
        self.closed_idle = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        with self.cond:  # counted before the thread starts: no drain race
            self.inflight += 1
        super().process_request(request, client_address)

    def set_busy(self, handler, busy):
        """Move a connection between in flight and idle. False: stopping, close it instead of idling."""
        with self.cond:
            if handler.busy != busy:
                handler.busy = busy
                self.inflight += 1 if busy else -1
                self.cond.notify_all()
            if busy:
                self.idle.discard(handler)
                return True
            if self.stopping.is_set():
                return False
            self.idle.add(handler)
            return True

    def forget(self, handler):
        self.set_busy(handler, False)
        with self.cond:
            self.idle.discard(handler)
            self.cond.notify_all()

    def opened_websocket(self, handler, ws):
        with self.cond:
            if handler.busy:
                handler.busy = False
                self.inflight -= 1
            self.websockets.add(ws)
            self.cond.notify_all()

    def closed_websocket(self, ws):
        with self.cond:
            self.websockets.discard(ws)
            self.cond.notify_all()

    def counts(self, asking=None):
        with self.cond:
            inflight = self.inflight - (1 if asking is not None and asking.busy else 0)
            return {"http_inflight": inflight, "keepalive_idle": len(self.idle), "websockets": len(self.websockets)}

    def begin_stop(self):
        """No more keep-alive: idle connections are closed now, busy ones after their response."""
        with self.cond:
            self.stopping.set()
            idle, self.idle = list(self.idle), set()
            self.closed_idle += len(idle)
        for handler in idle:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(idle)

    def drain(self, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.inflight and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return self.inflight

    def close_websockets(self, timeout):
        with self.cond:
            sockets = list(self.websockets)
        for ws in sockets:
            ws.close(1001, "going away")
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.websockets and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            left = list(self.websockets)
        for ws in left:
            ws.abort()
        return len(sockets), len(left)


def make_server(port, host="0.0.0.0"):
    return Server((host, port), Handler)


def polite_stop(server, drain_seconds=DRAIN_SECONDS, ws_wait=WS_CLOSE_WAIT):
    """What a polite SIGTERM does once serve_forever() has returned."""
    server.begin_stop()
    closed_idle = server.closed_idle
    server.server_close()  # stop accepting: new connections are refused
    counts = server.counts()
    log("shutting down (polite): draining %d in-flight request(s), closed %d idle keep-alive connection(s), "
        "%d WebSocket(s) open" % (counts["http_inflight"], closed_idle, counts["websockets"]))
    left = server.drain(drain_seconds)
    if left:
        log("gave up on %d request(s) after %.0fs" % (left, drain_seconds))
    sent, aborted = server.close_websockets(ws_wait)
    if sent:
        log("sent close 1001 to %d WebSocket(s)%s" % (sent, ", %d did not answer" % aborted if aborted else ""))
    if DATA is not None and DATA.pool is not None:
        DATA.pool.close_all()
    log("stopped")


def serve():
    global DATA
    port = int(os.environ.get("PORT") or DEFAULT_PORTS.get(SERVICE, 5000))
    DATA = Data()
    server = make_server(port)
    stopping = threading.Event()

    def on_signal(signum, frame):
        if behaviour() == "rude":
            counts = server.counts()
            log("SIGTERM (rude): exiting at once, cutting %d in-flight request(s), %d keep-alive connection(s), "
                "%d WebSocket(s)" % (counts["http_inflight"], counts["keepalive_idle"], counts["websockets"]))
            os._exit(143)
        if not stopping.is_set():
            stopping.set()
            server.begin_stop()
            # shutdown() blocks until serve_forever() returns, and that runs
            # in this (main) thread: call it from another thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    extra = (" release=%s" % os.environ["RELEASE_ID"]) if os.environ.get("RELEASE_ID") else ""
    log("build=%s%s behaviour=%s listening on 0.0.0.0:%d (backlog %d, HTTP/1.1 keep-alive %.0fs)"
        % (BUILD_ID, extra, behaviour(), port, LISTEN_BACKLOG, KEEPALIVE_S))
    DATA.start_monitor()
    server.serve_forever(poll_interval=0.2)
    polite_stop(server)
    return 0


# --------------------------------------------------------------- migrations

class MigrationError(Exception):
    pass


def find_psql():
    if os.environ.get("PSQL"):
        return os.environ["PSQL"]
    # Prefer the real binary over Debian's perl pg_wrapper (/usr/bin/psql).
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"), reverse=True):
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which("psql")
    if not found:
        raise MigrationError("psql not found on PATH")
    return found


def pg_env(url):
    """libpq env vars from DATABASE_URL; the password never goes to argv."""
    try:
        params = parse_database_url(url)
    except ValueError as exc:
        raise MigrationError(str(exc))
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
             "dbname": "PGDATABASE", "sslmode": "PGSSLMODE", "connect_timeout": "PGCONNECT_TIMEOUT"}
    for key, var in names.items():
        if key in params:
            env[var] = str(params[key])
    env.setdefault("PGCONNECT_TIMEOUT", "5")
    env["PGAPPNAME"] = "%s-migrate" % SERVICE
    return env, params.get("password") or None


def run_psql(psql, env, secret, args):
    cmd = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1"] + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out, err = proc.stdout, proc.stderr
    if secret:  # belt and braces: libpq never echoes it, but never print it
        out, err = out.replace(secret, "***"), err.replace(secret, "***")
    return proc.returncode, out, err


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


def migrate():
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("migrate: DATABASE_URL is not set", file=sys.stderr)
        return 2
    try:
        psql = find_psql()
        env, secret = pg_env(url)
        return _migrate(psql, env, secret)
    except MigrationError as exc:
        print("migrate: %s" % exc, file=sys.stderr)
        return 1


def _migrate(psql, env, secret):
    files = sorted(glob.glob(os.path.join(SERVICE_DIR, "migrations", "*.sql")))
    ddl = ("CREATE TABLE IF NOT EXISTS schema_migrations ("
           "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    # Wait for the database (psql exit 2 = connection failure), but not on errors that retrying cannot fix.
    # 60 s: on a Swarm's first deploy the job's node may reach the data node's overlay address only some time
    # after the database is healthy there (15 s was too little on the loaded 2-core test bed).
    deadline = time.monotonic() + float(os.environ.get("MIGRATE_WAIT_SECONDS", "60"))
    while True:
        # Advisory lock: concurrent CREATE TABLE IF NOT EXISTS can still race.
        rc, _, err = run_psql(psql, env, secret, [
            "--single-transaction", "-c", "SELECT pg_advisory_xact_lock(727001)", "-c", ddl])
        if rc == 0:
            break
        fatal = any(s in err for s in ("authentication failed", "does not exist",
                                       "no password supplied"))
        if rc != 2 or fatal or time.monotonic() >= deadline:
            raise MigrationError("cannot prepare schema_migrations:\n" + err.strip())
        time.sleep(1)

    def applied_names():
        rc, out, err = run_psql(psql, env, secret,
                                ["-A", "-t", "-c", "SELECT name FROM schema_migrations"])
        if rc != 0:
            raise MigrationError("cannot read schema_migrations:\n" + err.strip())
        return set(line for line in out.splitlines() if line)

    done = applied_names()
    count = 0
    for path in files:
        name = os.path.basename(path)
        if name in done:
            continue
        print("migrate: applying %s" % name, flush=True)
        # One transaction: the bookkeeping row first (a concurrent runner
        # blocks on it, then fails on the primary key), then the file.
        rc, _, err = run_psql(psql, env, secret, [
            "--single-transaction",
            "-c", "INSERT INTO schema_migrations(name) VALUES (%s)" % sql_literal(name),
            "-f", path])
        if rc != 0:
            if name in applied_names():
                print("migrate: %s was applied concurrently; skipping" % name, flush=True)
                done.add(name)
                continue
            raise MigrationError("%s failed (rolled back):\n%s" % (name, err.strip()))
        count += 1
    if count:
        print("migrate: applied %d migration(s)" % count, flush=True)
    else:
        print("migrate: nothing to apply (%d applied in total)" % len(done), flush=True)
    return 0


def main(argv):
    if len(argv) > 1 and argv[1] == "migrate":
        return migrate()
    if len(argv) > 1:
        print("usage: app.py [migrate]", file=sys.stderr)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
