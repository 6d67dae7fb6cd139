"""The sandbox sample app's pure parts (WebSocket codec, connection pool, URL parsing, SPA build,
shipped nginx config) and its HTTP server as a local process (keep-alive, backlog, WebSocket,
polite and rude SIGTERM). No Docker, no database."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.core.settings import PROJECT_ROOT, load_settings
from deploy.stack.render import render_build_files
from load import Load, WebSocketClient, build_of, ws as app

APP_DIR = PROJECT_ROOT / "deploy" / "sandbox" / "app"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


# ------------------------------------------------------------------------------ WebSocket codec

def reader_of(data: bytes, require_mask: bool):
    buffer = bytearray(data)

    def read_exact(n):
        if len(buffer) < n:
            raise EOFError
        chunk = bytes(buffer[:n])
        del buffer[:n]
        return chunk

    return app.MessageReader(read_exact, require_mask=require_mask)


def test_accept_key_is_the_rfc_example():
    assert app.ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [True, False])
def test_frames_round_trip_at_every_length_encoding(size, masked):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frame = app.encode_frame(app.OP_BINARY, payload, mask_key=b"\x01\x02\x03\x04" if masked else None)
    header = 2 + (0 if size < 126 else 2 if size < 65536 else 8) + (4 if masked else 0)
    assert len(frame) == header + size
    if masked and size:
        assert frame[header:] != payload  # really masked on the wire
    assert reader_of(frame, require_mask=masked).next_message() == (app.OP_BINARY, payload)


def test_fragments_are_joined_and_control_frames_pass_between_them():
    key = b"abcd"
    data = (app.encode_frame(app.OP_TEXT, "héllo ", mask_key=key, fin=False)
            + app.encode_frame(app.OP_PING, b"p", mask_key=key)
            + app.encode_frame(app.OP_CONT, "wörld", mask_key=key))
    reader = reader_of(data, require_mask=True)
    assert reader.next_message() == (app.OP_PING, b"p")
    assert reader.next_message() == (app.OP_TEXT, "héllo wörld")


@pytest.mark.parametrize("frame, require_mask, code", [
    (app.encode_frame(app.OP_TEXT, "x"), True, 1002),  # a client frame must be masked
    (app.encode_frame(app.OP_TEXT, "x", mask_key=b"abcd"), False, 1002),  # a server frame must not
    (bytes([0x80 | 0x40 | app.OP_TEXT, 0]), False, 1002),  # reserved bit
    (bytes([0x80 | 0x3, 0]), False, 1002),  # unknown opcode
    (bytes([0x80 | app.OP_PING, 126, 0, 200]) + b"x" * 200, False, 1002),  # control frame > 125
    (app.encode_frame(app.OP_CONT, "x"), False, 1002),  # continuation of nothing
    (app.encode_frame(app.OP_TEXT, b"\xff\xfe"), False, 1007),  # not UTF-8
    (bytes([0x80 | app.OP_BINARY, 127]) + (1 << 30).to_bytes(8, "big"), False, 1009),  # too big
])
def test_protocol_violations_are_refused_with_their_close_code(frame, require_mask, code):
    with pytest.raises(app.WebSocketError) as info:
        reader_of(frame, require_mask).next_message()
    assert info.value.code == code


def test_control_frames_cannot_be_built_too_big_or_fragmented():
    with pytest.raises(ValueError):
        app.encode_frame(app.OP_CLOSE, b"x" * 126)
    with pytest.raises(ValueError):
        app.encode_frame(app.OP_PING, b"", fin=False)


def test_close_payload():
    assert app.parse_close_payload(app.close_payload(1001, "going away")) == (1001, "going away")
    assert app.parse_close_payload(b"") == (1005, "")


# --------------------------------------------------------------------------------- the pool

class FakeConn:
    def __init__(self, n):
        self.n, self.closed, self.queries = n, 0, 0


class FakeDatabase:
    """connect() hands out numbered connections; ``down`` makes connecting fail."""

    def __init__(self):
        self.made, self.down = [], False

    def connect(self):
        if self.down:
            raise ConnectionRefusedError("database is down")
        conn = FakeConn(len(self.made))
        self.made.append(conn)
        return conn

    def restart(self):
        for conn in self.made:
            conn.closed = 2  # what psycopg2 reports for a connection the server dropped


def query(conn):
    if conn.closed:
        raise OSError("server closed the connection unexpectedly")
    conn.queries += 1
    return conn.n


def test_pool_reuses_one_connection_for_sequential_work():
    db = FakeDatabase()
    pool = app.Pool(db.connect, size=3)
    assert [pool.run(query) for _ in range(5)] == [0] * 5
    assert len(db.made) == 1 and pool.idle == 1


def test_pool_reconnects_once_after_the_database_restarted():
    db = FakeDatabase()
    pool = app.Pool(db.connect, size=3)
    pool.run(query)
    db.restart()  # the pooled connection is stale now
    assert pool.run(query) == 1  # retried on a new connection, no error reaches the caller
    assert len(db.made) == 2 and pool.idle == 1 and db.made[0].queries == 1


def test_pool_does_not_retry_on_a_fresh_connection_and_frees_the_slot():
    db = FakeDatabase()
    pool = app.Pool(db.connect, size=1, acquire_timeout=0.2)

    def breaks(conn):
        conn.closed = 2
        raise OSError("connection lost mid-query")

    with pytest.raises(OSError):
        pool.run(breaks)  # fresh connection: the error is real, not staleness
    assert len(db.made) == 1 and pool.idle == 0
    assert pool.run(query) == 1  # the slot was given back


def test_pool_gives_query_errors_to_the_caller_and_keeps_the_connection():
    db = FakeDatabase()
    pool = app.Pool(db.connect, size=2)

    def missing_table(conn):
        raise LookupError('relation "requests" does not exist')

    with pytest.raises(LookupError):
        pool.run(missing_table)
    assert pool.idle == 1 and pool.run(query) == 0  # same connection, still good


def test_pool_connect_failure_propagates_and_recovers():
    db = FakeDatabase()
    pool = app.Pool(db.connect, size=1, acquire_timeout=0.2)
    db.down = True
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            pool.run(query)
    db.down = False
    assert pool.run(query) == 0


def test_pool_is_bounded_and_times_out():
    db = FakeDatabase()
    pool = app.Pool(db.connect, size=2, acquire_timeout=0.3)
    release = threading.Event()
    started = threading.Barrier(3)

    def hold(conn):
        started.wait()
        release.wait(5)
        return conn.n

    threads = [threading.Thread(target=pool.run, args=(hold,)) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait()
    began = time.monotonic()
    with pytest.raises(app.PoolTimeout):
        pool.run(query)
    assert time.monotonic() - began >= 0.25
    release.set()
    for t in threads:
        t.join()
    assert len(db.made) == 2 and pool.idle == 2


def test_database_url_parsing():
    assert app.parse_database_url("postgresql://admin:p%40ss%2Fw@postgres:5432/health_mgmt?schema=public") == {
        "host": "postgres", "port": 5432, "user": "admin", "password": "p@ss/w", "dbname": "health_mgmt",
        "schema": "public"}
    assert app.parse_database_url("postgres://u@10.0.0.5/db?sslmode=require&connect_timeout=2") == {
        "host": "10.0.0.5", "port": 5432, "user": "u", "dbname": "db", "sslmode": "require", "connect_timeout": "2"}
    with pytest.raises(ValueError):
        app.parse_database_url("mysql://u@h/db")


def test_migration_env_comes_from_the_same_parser():
    env, secret = app.pg_env("postgresql://admin:s3cret@10.1.2.3:5433/db?schema=public")
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"], env["PGPASSWORD"], env["PGDATABASE"]) == (
        "10.1.2.3", "5433", "admin", "s3cret", "db")
    assert secret == "s3cret" and "DATABASE_URL" not in env


# ----------------------------------------------------------------------------- the frontends

@pytest.mark.parametrize("service", ["frontend-web", "frontend-patient"])
def test_shipped_frontend_nginx_conf_is_the_rendered_production_template(service):
    rendered = render_build_files(load_settings("sandbox"))[f"{service}/nginx.conf"]
    shipped = APP_DIR / service / "nginx.conf"
    if UPDATE:
        shipped.write_text(rendered)
    assert shipped.read_text() == rendered, (f"{shipped} differs from deploy/stack/templates/app/frontend/nginx.conf.j2 "
                                             "(UPDATE_GOLDEN=1 to regenerate)")


def load_build_spa():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_spa", APP_DIR / "build_spa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spa_build_has_content_hashed_assets_and_the_build_id(tmp_path):
    build_spa = load_build_spa()
    info = build_spa.build(APP_DIR / "frontend-web", tmp_path / "a", "frontend-web", "web-v7")
    page = (tmp_path / "a" / "index.html").read_text()
    js, css = info["assets"]
    assert re.fullmatch(r"/assets/app\.[0-9a-f]{8}\.js", js) and re.fullmatch(r"/assets/app\.[0-9a-f]{8}\.css", css)
    assert f'src="{js}"' in page and f'href="{css}"' in page
    for asset in (js, css):
        data = (tmp_path / "a" / asset.lstrip("/")).read_bytes()
        assert build_spa.content_hash(data) in asset  # the name is the content's hash
    assert build_of("text/html", page.encode()) == "web-v7"
    assert json.loads((tmp_path / "a" / "build.json").read_text()) == {
        "service": "frontend-web", "build": "web-v7", "assets": [js, css]}
    assert '"web-v7"' in (tmp_path / "a" / js.lstrip("/")).read_text()
    # Same input, same bytes; another build id, other asset names (the CSS did not change).
    again = build_spa.build(APP_DIR / "frontend-web", tmp_path / "b", "frontend-web", "web-v7")
    assert again == info and (tmp_path / "b" / "index.html").read_text() == page
    other = build_spa.build(APP_DIR / "frontend-web", tmp_path / "c", "frontend-web", "web-v8")
    assert other["assets"][0] != js and other["assets"][1] == css


def test_dockerfile_stages_copy_only_their_own_service_dir():
    text = (APP_DIR / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    for stage in stages:
        name = stage.split()[2] if " AS " in stage.splitlines()[0] else None
        if name in ("backend", "ai-service", "frontend-web", "frontend-patient"):
            copies = re.findall(r"^COPY (?:--chown=\S+ )?(\S+)", stage, re.M)
            assert copies == [f"{name}/"], (name, copies)
    assert stages[-1].strip() == "${SERVICE}"


# ------------------------------------------------------------- the HTTP server, as a process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, tmp_path, behaviour="polite"):
        self.dir = tmp_path / "service"
        self.dir.mkdir()
        (self.dir / "build_id").write_text("ai-test-1\n")
        (self.dir / "behaviour").write_text(behaviour + "\n")
        self.port = free_port()
        env = {**os.environ, "SERVICE": "ai-service", "PORT": str(self.port), "SERVICE_DIR": str(self.dir),
               "WORK_MS": "0", "DRAIN_SECONDS": "5", "RELEASE_ID": "r-test"}
        env.pop("BEHAVIOUR", None)
        self.proc = subprocess.Popen([sys.executable, str(APP_DIR / "app.py")], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(self.stop())
                time.sleep(0.05)

    def get(self, path, headers=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        if own:
            conn.close()
        return response, json.loads(body)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return out


@pytest.fixture
def server(tmp_path):
    running = Running(tmp_path)
    yield running
    running.stop()


def test_health_build_release_and_health_mode(server):
    response, body = server.get("/health")
    assert response.status == 200 and body["build"] == "ai-test-1" and body["release"] == "r-test"
    assert body["behaviour"] == "polite" and "db" not in body  # ai-service keeps no database
    (server.dir / "health_mode").write_text("fail\n")
    assert server.get("/health")[0].status == 500
    assert server.get("/ready")[0].status == 200


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(5):
        response, body = server.get("/api/build", conn=conn)
        assert response.status == 200 and response.version == 11 and not response.will_close
    _, counts = server.get("/internal/connections")
    assert counts["keepalive_idle"] == 1 and counts["http_inflight"] == 0
    conn.close()
    with Load("127.0.0.1", server.port, rate=200, workers=4, keepalive=True) as load:
        time.sleep(1)
    assert load.result.failed == 0 and load.result.total > 100 and load.result.connections == 4


def test_internal_connections_is_not_served_through_a_proxy(server):
    assert server.get("/internal/connections", headers={"X-Forwarded-For": "10.0.0.9"})[0].status == 404


def test_listen_backlog_is_realistic(server):
    ss = subprocess.run(["ss", "-Hltn", f"sport = :{server.port}"], capture_output=True, text=True)
    if ss.returncode != 0:
        pytest.skip("no ss")
    assert ss.stdout.split()[2] == "1024"  # Send-Q of a listening socket is its backlog


def test_websocket_hello_echo_and_ping(server):
    client = WebSocketClient("127.0.0.1", server.port).connect()
    hello = client.recv_json()
    assert hello["type"] == "hello" and hello["build"] == "ai-test-1" and hello["service"] == "ai-service"
    client.send_text("ping 1")
    assert client.recv_text() == "ping 1"
    client.ping(b"x")
    client.send_text("after ping")
    assert client.recv_text() == "after ping" and client.pongs == 1
    assert server.get("/internal/connections")[1]["websockets"] == 1
    client.close()
    assert client.outcome == "close" and client.close_code == 1000


def slow_request(port, ms, results):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/api/slow?ms={ms}")
        response = conn.getresponse()
        results.append((response.status, json.loads(response.read())["slept_ms"]))
    except Exception as exc:
        results.append(type(exc).__name__)


def test_polite_sigterm_drains_then_closes_websockets_with_1001(server):
    client = WebSocketClient("127.0.0.1", server.port).connect()
    client.recv_json()
    client.watch()
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    server.get("/health", conn=idle)  # an idle keep-alive connection
    results = []
    slow = threading.Thread(target=slow_request, args=(server.port, 1000, results))
    slow.start()
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    slow.join(10)
    assert results == [(200, 1000.0)]  # the in-flight request finished
    assert client.ended.wait(5) and client.outcome == "close" and client.close_code == 1001
    assert client.close_reason == "going away"
    assert server.proc.wait(10) == 0
    out = server.stop()
    assert "closed 1 idle keep-alive connection(s)" in out and "sent close 1001 to 1 WebSocket(s)" in out, out


def test_rude_sigterm_cuts_everything_at_once(tmp_path):
    running = Running(tmp_path, behaviour="rude")
    try:
        client = WebSocketClient("127.0.0.1", running.port).connect()
        client.recv_json()
        client.watch()
        results = []
        slow = threading.Thread(target=slow_request, args=(running.port, 3000, results))
        slow.start()
        time.sleep(0.3)
        began = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(5) == 143 and time.monotonic() - began < 1
        slow.join(5)
        assert results and results[0] in ("RemoteDisconnected", "ConnectionResetError"), results
        assert client.ended.wait(5) and client.outcome in ("eof", "reset") and client.close_code is None
        assert "SIGTERM (rude)" in running.stop()
    finally:
        running.stop()
