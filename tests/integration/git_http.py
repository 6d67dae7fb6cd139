"""A real git server over HTTP for tests: `git http-backend` (git's own smart-HTTP CGI) behind a tiny
http.server on loopback that requires Basic auth with one user and token. Counts what it answered."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BACKEND = "/usr/lib/git-core/git-http-backend"


class GitHttpServer:
    def __init__(self, root: Path, user: str, token: str, address: str = "127.0.0.1"):
        self.root, self.user, self.token = root, user, token
        self.counts = {"401": 0, "ok": 0}
        self.seen_authorization: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._serve()

            def do_POST(self):
                self._serve()

            def _serve(self):
                header = self.headers.get("Authorization", "")
                expected = "Basic " + base64.b64encode(f"{server.user}:{server.token}".encode()).decode()
                if header != expected:
                    server.counts["401"] += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.counts["ok"] += 1
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                env = {"PATH": "/usr/bin:/bin", "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
                       "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                       "REMOTE_USER": server.user, "REMOTE_ADDR": self.client_address[0],
                       "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.0"}
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                if self.headers.get("Git-Protocol"):
                    env["HTTP_GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                out = subprocess.run([BACKEND], input=body, capture_output=True, env=env).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def command_lines() -> str:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    line = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:  # ended meanwhile
                continue
            if line:  # kernel threads have none
                lines.append(line)
    return "\n".join(lines)


class ProcessSampler:
    """Every process's command line on the host (what `ps -eo args` shows; the sandbox host is this machine) every
    ``interval`` seconds while running. Read from /proc in this process: a `ps` each time cost about 4x the CPU."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(command_lines())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def hits(self, *needles: str) -> list[str]:
        return [line for sample in self.samples for line in sample.splitlines() if any(n in line for n in needles)]


def files_containing(root: Path, *needles: str) -> list[str]:
    """Every file under ``root`` (not following symlinks) whose bytes contain one of ``needles``."""
    found = []
    encoded = [n.encode() for n in needles]
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(n in data for n in encoded):
                found.append(str(path))
    return found
