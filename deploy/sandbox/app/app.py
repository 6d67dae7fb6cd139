#!/usr/bin/env python3
"""Sandbox stand-in for backend, ai-service, frontend-web and frontend-patient.

Stdlib only.  `python3 app.py` serves HTTP; `python3 app.py migrate` applies
$SERVICE_DIR/migrations/*.sql to PostgreSQL with the psql CLI.

Environment:
  SERVICE       service name (set by the image)
  PORT          listen port (default per service: 5000, 8001, 80)
  WORK_MS       simulated work per request in ms (default 50; not for /health)
  RELEASE_ID    optional, echoed as "release"
  DATABASE_URL  postgresql://user:pass@host:5432/db (migrate only)
  SERVICE_DIR   default /app/service (build_id, health_mode, migrations/)
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PORTS = {"backend": 5000, "ai-service": 8001,
                 "frontend-web": 80, "frontend-patient": 80}
SERVICE = os.environ.get("SERVICE", "backend")
SERVICE_DIR = os.environ.get("SERVICE_DIR", "/app/service")
DRAIN_SECONDS = 10.0


def log(msg):
    print("[%s] %s" % (SERVICE, msg), flush=True)


def read_file(name, default=""):
    try:
        with open(os.path.join(SERVICE_DIR, name), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return default


def work_seconds():
    try:
        return max(0.0, float(os.environ.get("WORK_MS", "50")) / 1000.0)
    except ValueError:
        return 0.05


BUILD_ID = read_file("build_id", "unknown")


def identity():
    info = {"service": SERVICE, "build": BUILD_ID, "host": socket.gethostname()}
    if os.environ.get("RELEASE_ID"):
        info["release"] = os.environ["RELEASE_ID"]
    return info


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so draining never waits on idle
    # keep-alive sockets.
    protocol_version = "HTTP/1.0"
    server_version = "healthdeploy-sandbox"

    def log_message(self, format, *args):  # no per-request log lines
        pass

    def _send(self, status, payload, head=False):
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

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

    def _get(self, head=False):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            # Checked per request so `echo fail > health_mode` flips it live.
            if read_file("health_mode").lower() == "fail":
                return self._send(500, dict(identity(), status="fail"), head)
            return self._send(200, dict(identity(), status="ok"), head)
        time.sleep(work_seconds())
        # Every other GET answers 200 (frontends behave like an SPA fallback;
        # the gateway may route any /api/ path to the backend).
        return self._send(200, dict(identity(), path=path, method=self.command), head)

    def do_GET(self):
        self._get()

    def do_HEAD(self):
        self._get(head=True)

    def _write(self):
        body = self._read_body()
        time.sleep(work_seconds())
        path = urllib.parse.urlsplit(self.path).path
        self._send(200, dict(identity(), path=path, method=self.command,
                             received=len(body)))

    do_POST = do_PUT = do_PATCH = do_DELETE = _write


class Server(ThreadingHTTPServer):
    """Counts in-flight requests so SIGTERM can drain them."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inflight = 0
        self.cond = threading.Condition()

    def process_request(self, request, client_address):
        with self.cond:  # counted before the thread starts: no drain race
            self.inflight += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.cond:
                self.inflight -= 1
                self.cond.notify_all()

    def drain(self, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.inflight and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return self.inflight


def serve():
    port = int(os.environ.get("PORT") or DEFAULT_PORTS.get(SERVICE, 5000))
    server = Server(("0.0.0.0", port), Handler)
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            # shutdown() blocks until serve_forever() returns, and that runs
            # in this (main) thread: call it from another thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    extra = (" release=%s" % os.environ["RELEASE_ID"]) if os.environ.get("RELEASE_ID") else ""
    log("build=%s%s listening on 0.0.0.0:%d" % (BUILD_ID, extra, port))
    server.serve_forever(poll_interval=0.2)
    server.server_close()  # stop accepting: new connections are refused
    with server.cond:
        pending = server.inflight
    log("shutting down, draining %d in-flight request(s)" % pending)
    left = server.drain(DRAIN_SECONDS)
    if left:
        log("gave up on %d request(s) after %.0fs" % (left, DRAIN_SECONDS))
    log("stopped")
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
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise MigrationError("DATABASE_URL must start with postgresql://")
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    unq = urllib.parse.unquote
    if parts.hostname:
        env["PGHOST"] = unq(parts.hostname)
    if parts.port:
        env["PGPORT"] = str(parts.port)
    if parts.username:
        env["PGUSER"] = unq(parts.username)
    if parts.password is not None:
        env["PGPASSWORD"] = unq(parts.password)
    if parts.path.strip("/"):
        env["PGDATABASE"] = unq(parts.path.lstrip("/"))
    for key, values in urllib.parse.parse_qs(parts.query).items():
        if key == "sslmode":
            env["PGSSLMODE"] = values[-1]
        elif key == "connect_timeout":
            env["PGCONNECT_TIMEOUT"] = values[-1]
    env.setdefault("PGCONNECT_TIMEOUT", "5")
    env["PGAPPNAME"] = "%s-migrate" % SERVICE
    return env, (unq(parts.password) if parts.password else None)


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
    # Wait a little for the database (psql exit 2 = connection failure), but
    # not on errors that retrying cannot fix.
    deadline = time.monotonic() + float(os.environ.get("MIGRATE_WAIT_SECONDS", "15"))
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
