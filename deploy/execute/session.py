"""One host's session: its executor, the host lock as a context manager, the audit log, the observation,
and the undo stack every applied step registers with."""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import socket
from typing import Callable, Iterator

from deploy.commands import files as fs
from deploy.commands import journal
from deploy.commands import lock as lk
from deploy.commands.base import Command
from deploy.core.console import Console
from deploy.core.errors import ExitCode, HealthdeployError
from deploy.core.settings import Settings
from deploy.execute.executor import Executor, HeldCommand, shielded
from deploy.facts.containers import Container, inspect_named, parse_containers, project_containers, stack_only
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


class UndoStack:
    """The operation's undo journal on the host (``commands.journal``): each action is written there BEFORE the
    change it undoes; ``run`` executes it by phase, newest first, each step to its end (shielded from signals);
    if we die instead, the lock's holder on the host runs the same journal."""

    def __init__(self, session: "Session"):
        self.session = session
        self.seq = 0
        self.outcomes: list[tuple[str, str]] = []

    def push(self, description: str, undo: Command, phase: int = SERVICES) -> None:
        self.seq += 1
        self.session.run(journal.journal_add(self.session.t.lock_dir, phase, self.seq, description, undo))

    def __len__(self) -> int:
        return self.seq

    def discard(self) -> None:
        """The operation committed: nothing is to be undone any more."""
        if self.seq:
            with shielded():
                self.session.run(journal.journal_clear(self.session.t.lock_dir))
        self.seq = 0

    def run(self, warn: Callable[[str], None]) -> list[tuple[str, str]]:
        if not self.seq:
            return self.outcomes
        with shielded():
            try:
                text = self.session.run(journal.journal_run(self.session.t.lock_dir)).text
            except HealthdeployError as exc:  # unreachable host: its lock holder undoes when the connection ends
                warn(f"undo could not run here ({exc.message}); the host undoes by itself when it notices")
                self.outcomes.append(("undo", f"left to the host: {exc.message}"))
                self.seq = 0
                return self.outcomes
        for description, outcome in journal.parse_journal_run(text):
            self.outcomes.append((description, outcome))
            if outcome != "undone":
                warn(f"undo of {description} {outcome}")
        self.seq = 0
        return self.outcomes


class Session:
    def __init__(self, host: Executor, settings: Settings, target: Target, console: Console):
        self.host = host
        self.s = settings
        self.t = target
        self.console = console
        self.undo = UndoStack(self)
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

    def inspect(self, ids: tuple[str, ...]) -> list[Container]:
        """Only these containers (those of them that still exist)."""
        return stack_only(parse_containers(self.host.run(inspect_named(ids)).text or "[]", self.t.project))

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
            taken = parse_lock("held\n" + held.rest)
            who = taken.describe() if taken.info else "held, its holder is still writing its details"
            raise LockHeld(f"{self.t.alias}: another operation took the lock just now ({who})", "wait for it to finish")
        info = {"who": operator(), "key": self.identity, "since": utc_now(), "release": release, "pid": os.getpid(),
                "machine": socket.gethostname(), "env": self.s.env_name, "operation": operation}
        try:
            held.previous_holder = self.host.run(lk.lock_info_write(lock_dir, json.dumps(info).encode())).text.strip()
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
