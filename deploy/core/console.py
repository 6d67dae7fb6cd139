"""Operator output: progress lines on stderr, results (tables or JSON) on stdout."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Iterable, TextIO


class Console:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, quiet: bool = False):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._started:6.1f}s"

    def phase(self, host: str, message: str) -> None:
        if not self.quiet:
            with self._lock:
                print(f"{self._elapsed()} [{host}] {message}", file=self.err, flush=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            with self._lock:
                print(message, file=self.err, flush=True)

    def warn(self, message: str) -> None:
        with self._lock:
            print(f"warning: {message}", file=self.err, flush=True)

    def result(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def json(self, data: Any) -> None:
        self.result(json.dumps(data, indent=2, sort_keys=True, default=str))

    def table(self, headers: list[str], rows: Iterable[Iterable[Any]]) -> None:
        self.result(format_table(headers, rows))


def format_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths))
    out = [line.rstrip()]
    for row in rows:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(out)
