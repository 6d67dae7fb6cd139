"""Sample application of the sandbox: stands in for backend, ai-service, frontend-web and frontend-patient.

Stdlib only. Answers /health (500 when service/health_mode says "fail"), reports its build id, does
WORK_MS of work per request, finishes in-flight requests on SIGTERM, and `app.py migrate` applies
service/migrations/*.sql to PostgreSQL with psql, once each.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SERVICE_DIR = Path("/app/service")
SERVICE = os.environ.get("SERVICE", "app")
PORT = int(os.environ.get("PORT", "5000"))
WORK_MS = int(os.environ.get("WORK_MS", "50"))


def build_id() -> str:
    try:
        return (SERVICE_DIR / "build_id").read_text().strip()
    except OSError:
        return "unknown"


def health_failing() -> bool:
    try:
        return (SERVICE_DIR / "health_mode").read_text().strip() == "fail"
    except OSError:
        return False


BUILD = build_id()
FAILING = health_failing()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # one line per request would drown the logs under load
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            if FAILING:
                return self._send(500, {"status": "failing", "service": SERVICE, "build": BUILD})
            return self._send(200, {"status": "ok", "service": SERVICE, "build": BUILD})
        time.sleep(WORK_MS / 1000)
        self._send(200, {"service": SERVICE, "build": BUILD, "release": os.environ.get("RELEASE_ID", ""),
                         "path": self.path})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        time.sleep(WORK_MS / 1000)
        self._send(200, {"service": SERVICE, "build": BUILD, "received": len(data)})


def serve() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = False  # in-flight requests finish before exit
    server.block_on_close = True

    def stop(signum, frame):
        # Stop accepting; serve_forever returns, server_close joins the request threads.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{SERVICE} build {BUILD} listening on {PORT}", flush=True)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    print(f"{SERVICE} stopped gracefully", flush=True)


def psql(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-t", "-A", *args],
                          capture_output=True, text=True)


def migrate() -> int:
    url = os.environ.get("DATABASE_URL", "").split("?")[0]
    if not url:
        print("migrate: DATABASE_URL is not set", file=sys.stderr)
        return 2
    result = psql(url, "-c", "CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    if result.returncode:
        print(f"migrate: {result.stderr.strip()}", file=sys.stderr)
        return 1
    applied = set(psql(url, "-c", "SELECT name FROM schema_migrations").stdout.split())
    for path in sorted((SERVICE_DIR / "migrations").glob("*.sql")):
        if path.name in applied:
            continue
        sql = path.read_text() + f"\nINSERT INTO schema_migrations(name) VALUES ('{path.name}');\n"
        result = psql(url, "--single-transaction", "-c", sql)
        if result.returncode:
            print(f"migrate: {path.name} failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"migrate: applied {path.name}", flush=True)
    print("migrate: schema up to date", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate"]:
        sys.exit(migrate())
    serve()
