"""A bounded HTTP load on loopback: GET and POST alternately, a new connection per request.

Used by the integration tests (zero failed requests during a roll) and by bench/.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    total: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    builds: dict[str, int] = field(default_factory=dict)

    def p99_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


class Load:
    """``with Load(host, port, rate=100): ...`` sends requests until the block ends (at most ``limit_s``)."""

    def __init__(self, host: str, port: int, rate: float = 100, workers: int = 16, path: str = "/api/build",
                 limit_s: float = 600, timeout: float = 10):
        self.host, self.port, self.rate, self.workers, self.path = host, port, rate, workers, path
        self.limit_s, self.timeout = limit_s, timeout
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _one(self, n: int) -> None:
        method = "GET" if n % 2 == 0 else "POST"
        started = time.monotonic()
        error = None
        build = None
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            body = b'{"n": %d}' % n if method == "POST" else None
            conn.request(method, self.path if method == "GET" else "/api/echo", body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            conn.close()
            if response.status != 200:
                error = f"{method} -> HTTP {response.status}"
            elif method == "GET":
                import json

                build = json.loads(data).get("build")
        except Exception as exc:  # every failure counts, whatever it is
            error = f"{method} -> {type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        with self._lock:
            self.result.total += 1
            self.result.latencies.append(elapsed)
            if error:
                self.result.failed += 1
                self.result.errors.append(error)
            if build:
                self.result.builds[build] = self.result.builds.get(build, 0) + 1

    def _worker(self, index: int) -> None:
        interval = self.workers / self.rate
        n = index
        deadline = time.monotonic() + self.limit_s
        next_at = time.monotonic() + index * (1 / self.rate)
        while not self._stop.is_set() and time.monotonic() < deadline:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._one(n)
            n += self.workers
            next_at += interval

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
