"""One host's session: its executor, the host lock as a context manager, the audit log, the observation,
and the undo stack every applied step registers with."""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterator

from deploy.commands import files as fs
from deploy.commands import lock as lk
from deploy.core.console import Console
from deploy.core.errors import ExitCode, HealthdeployError
from deploy.core.settings import Settings
from deploy.execute.executor import Executor, HeldCommand, shielded
from deploy.facts.containers import Container, parse_containers, project_containers, stack_only
from deploy.facts.lock import lock_status, parse_lock
from deploy.facts.observe import Observed, observe, parse_observation
from deploy.stack.render import Target, image_prefix


class LockHeld(HealthdeployError):
    exit_code = ExitCode.LOCKED


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def operator() -> str:
    """The local user as a claim (anyone can set $USER; the host's vouched identity is the SSH key)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# Undo phases, run in this order (each newest first): the settings the old containers need (secrets,
# credentials on the servers, the gateway config) come back before any service rolls back, and files last.
SETTINGS, SERVICES, FILES = 0, 1, 2


@dataclass
class UndoStack:
    """Undo actions, registered as each step succeeds; run by phase, newest first, each to its end (shielded
    from signals), every outcome kept for the report."""

    actions: list[tuple[int, str, Callable[[], None]]] = field(default_factory=list)
    outcomes: list[tuple[str, str]] = field(default_factory=list)

    def push(self, description: str, action: Callable[[], None], phase: int = SERVICES) -> None:
        self.actions.append((phase, description, action))

    def discard(self) -> None:
        self.actions.clear()

    def __len__(self) -> int:
        return len(self.actions)

    def run(self, warn: Callable[[str], None]) -> list[tuple[str, str]]:
        with shielded():
            for phase in (SETTINGS, SERVICES, FILES):
                for entry in [a for a in reversed(self.actions) if a[0] == phase]:
                    _, description, action = entry
                    try:
                        action()
                        self.outcomes.append((description, "undone"))
                    except BaseException as exc:  # keep undoing the rest
                        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                        self.outcomes.append((description, f"failed: {message}"))
                        warn(f"undo of {description} failed: {message}")
            self.actions.clear()
        return self.outcomes


class Session:
    def __init__(self, host: Executor, settings: Settings, target: Target, console: Console):
        self.host = host
        self.s = settings
        self.t = target
        self.console = console
        self.undo = UndoStack()
        self.identity = getattr(host, "identity", "")

    @property
    def alias(self) -> str:
        return self.t.alias

    def say(self, message: str) -> None:
        self.console.phase(self.t.alias, message)

    def warn(self, message: str) -> None:
        self.console.warn(f"{self.t.alias}: {message}")

    def run(self, command, **kwargs):
        return self.host.run(command, **kwargs)

    # -- facts ----------------------------------------------------------------------------------------
    def observe(self) -> Observed:
        text = self.host.run(observe(self.t.deploy_path, self.t.project, image_prefix(self.s, self.t))).text
        return parse_observation(text, self.t.project)

    def containers(self) -> list[Container]:
        return stack_only(parse_containers(self.host.run(project_containers(self.t.project)).text, self.t.project))

    # -- audit ----------------------------------------------------------------------------------------
    def audit(self, entry: dict) -> None:
        record = {"ts": utc_now(), "who": operator(), "key": self.identity, "env": self.s.env_name,
                  "host": self.t.alias, **entry}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        with shielded():
            self.host.run(fs.append_line(f"{self.t.shared}/audit.log", line), check=False)

    # -- the host lock --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, operation: str, release: str = "", break_lock: bool = False) -> Iterator[HeldCommand]:
        held = self.acquire(operation, release, break_lock)
        try:
            yield held
        finally:
            self.release(held, operation, release)

    def acquire(self, operation: str, release: str = "", break_lock: bool = False) -> HeldCommand:
        lock_dir = self.t.lock_dir
        status = parse_lock(self.host.run(lock_status(lock_dir)).text)
        if status.state == "stale":
            # A backup changes nothing on the host: one that died leaves nothing half-done, so its stale lock
            # is broken without asking (and audited like any broken lock).
            if status.info.get("operation") == "backup":
                break_lock = True
            if not break_lock:
                raise LockHeld(f"{self.t.alias}: the host lock is stale ({status.describe()})",
                               "its holder is gone; rerun with --break-lock to remove it")
            self.say(f"breaking stale lock ({status.describe()})")
            if self.host.run(lk.lock_break(lock_dir)).text.strip() != "broken":
                raise LockHeld(f"{self.t.alias}: the lock was taken again while breaking it", "run it again")
            self.audit({"event": "lock-broken", "previous_holder": status.info})
        elif status.state == "held":
            what = status.info.get("operation", "deploy")
            raise LockHeld(f"{self.t.alias}: another {what} holds the lock ({status.describe()})",
                           "wait for it to finish; `fab lock.status` shows it")
        self.host.run(fs.mkdirs(self.t.deploy_path, mode="0755"))
        held = self.host.hold(lk.lock_hold(lock_dir))
        if held.first_line != "acquired":
            raise LockHeld(f"{self.t.alias}: another operation took the lock just now ({parse_lock(held.rest).describe()})",
                           "wait for it to finish")
        info = {"who": operator(), "key": self.identity, "since": utc_now(), "release": release, "pid": os.getpid(),
                "machine": socket.gethostname(), "env": self.s.env_name, "operation": operation}
        try:
            self.host.run(lk.lock_info_write(lock_dir, json.dumps(info).encode()))
        except BaseException:
            self.release(held, operation, release, audit=False)
            raise
        return held

    def release(self, held: HeldCommand, operation: str, release: str = "", audit: bool = True) -> None:
        with shielded():
            try:
                self.host.run(lk.lock_release(self.t.lock_dir), check=False)
            except HealthdeployError:
                pass  # the connection is gone: the holder dies with it, the lock reads as stale
            finally:
                held.close()
        if audit:
            try:
                self.audit({"event": "unlock", "operation": operation, "release": release})
            except HealthdeployError:
                pass
