"""Several hosts in one command: connect and lock every host before changing any, then data hosts first, the
application hosts in batches of BATCH_SIZE (migrations once, between a batch's preparation and its rolls,
before any host switches), and the data hosts' last steps after every application host has rolled.

A failure stops the rest: the hosts of the failing batch that have not switched undo their changes, a host
that completed keeps its new release (each host runs one release completely, never a mix), later hosts are
skipped. SIGINT and SIGTERM reach every thread of a batch (``executor.check_cancelled``).
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from deploy.core.errors import ExitCode, HealthdeployError
from deploy.execute.executor import Interrupted, request_cancel


class HostResult(str, enum.Enum):
    PENDING = "pending"
    DEPLOYED = "deployed"
    CONVERGED = "converged"
    UNCHANGED = "unchanged"
    ROLLED_BACK = "rolled-back"
    ROLLED_BACK_TO = "rolled-back-to"
    FAILED = "failed"
    REFUSED = "refused"
    LOCKED = "locked"
    SKIPPED = "skipped"
    PLANNED = "planned"
    INTERRUPTED = "interrupted"


RESULT_OF_EXIT = {ExitCode.PREFLIGHT: HostResult.REFUSED, ExitCode.LOCKED: HostResult.LOCKED,
                  ExitCode.ROLLED_BACK: HostResult.ROLLED_BACK}


@dataclass
class HostOutcome:
    host: str
    result: str = HostResult.PENDING.value
    role: str = ""
    release: str = ""
    previous: str = ""
    services: list[str] = field(default_factory=list)
    migrated: bool = False
    seconds: float = 0.0
    message: str = ""
    uploaded_bytes: int = 0
    uploaded_files: int = 0
    shipped_bytes: int = 0  # image layers pulled from the shipping registry (docs/build.md)
    shipped_seconds: float = 0.0
    steps: list[dict] = field(default_factory=list)
    undo: list[list[str]] = field(default_factory=list)
    closed_at_drain_limit: int = 0

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, HealthdeployError):
            if self.result == HostResult.PENDING.value:
                self.result = RESULT_OF_EXIT.get(exc.exit_code, HostResult.FAILED).value
            self.message = self.message or exc.message.splitlines()[0]
        elif isinstance(exc, KeyboardInterrupt):
            self.result = HostResult.INTERRUPTED.value
            self.message = self.message or "interrupted: this host's changes were undone"
        else:
            self.result = HostResult.FAILED.value
            self.message = self.message or f"{type(exc).__name__}: {exc}"


class FleetStopped(HealthdeployError):
    """A host failed: the summary of every host is printed, the first error decides the exit code."""

    def __init__(self, outcomes: list[HostOutcome], first: BaseException):
        if isinstance(first, HealthdeployError):
            super().__init__(first.message, first.hint, first.exit_code)
        elif isinstance(first, KeyboardInterrupt):
            super().__init__("interrupted", "every host's unfinished changes were undone", ExitCode.INTERRUPTED)
        else:  # a bug: say what it was, in one line, with the documented code for unexpected failures
            super().__init__(f"unexpected {type(first).__name__}: {first}", "please report it; the hosts' unfinished "
                             "changes were undone", ExitCode.FAILED)
        self.outcomes = outcomes
        self.first = first

    def lines(self) -> list[str]:
        return self.first.lines() if isinstance(self.first, HealthdeployError) else super().lines()

    def to_json(self) -> dict:
        return self.first.to_json() if isinstance(self.first, HealthdeployError) else super().to_json()


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def in_parallel(items: list, work: Callable, errors: list) -> None:
    """``work(item)`` for every item, in threads when there are several; exceptions are collected in
    ``errors`` as (item, exception). A signal in the main thread cancels every thread; we wait for them all
    (each undoes its own changes) before returning."""
    def guarded(item):
        started = time.monotonic()
        try:
            work(item)
        except BaseException as exc:  # collected, reported per host
            errors.append((item, exc))
        finally:
            if hasattr(item, "outcome"):
                item.outcome.seconds = round(item.outcome.seconds + time.monotonic() - started, 1)

    if not items:
        return
    if len(items) == 1:
        guarded(items[0])
        return
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(guarded, item) for item in items]
        while True:
            try:
                wait(futures)
                break
            except KeyboardInterrupt:  # the signal lands here; the threads see the cancel flag
                request_cancel()
                errors.append((None, Interrupted()))


def run_with_deadline(func, seconds: float):
    """Run ``func`` in a daemon thread; a hung host cannot hang the command (or its exit)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = func()
        except BaseException as exc:  # reported by the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def parallel_results(items: list, func, timeout: float) -> dict:
    """``{item: func(item) or the exception}`` for every item, in daemon threads, each bounded by ``timeout``."""
    import threading

    results: dict = {}

    def one(item) -> None:
        try:
            results[item] = run_with_deadline(lambda: func(item), timeout)
        except BaseException as exc:  # a hung or broken host is a result, not a crash
            results[item] = exc

    threads = [threading.Thread(target=one, args=(item,), daemon=True) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return results
