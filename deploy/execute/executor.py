"""The executor protocol: what the rest of the library needs from a host, and the shared pieces every
executor uses (results, the held command, cancellation).

Executors: ``ssh.RemoteHost`` (real), ``readonly.ReadOnlyHost`` (refuses anything that is not a fact: what a
dry run runs), ``recording.RecordingHost`` (tests: records commands, answers from a model, fails at command N).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Protocol

from deploy.commands.base import Command
from deploy.core.errors import HealthdeployError

DEFAULT_TIMEOUT = 300.0  # seconds any remote command gets unless its builder says otherwise


@dataclass(frozen=True)
class Result:
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@dataclass(frozen=True)
class StreamResult:
    bytes: int
    sha256: str
    remote_sha256: str | None
    exit_status: int
    seconds: float
    stderr: str


@dataclass
class Tunnel:
    """A reverse tunnel while it is open (``reverse_tunnel``): the port the host listens on (its 127.0.0.1), and
    the bytes carried each way so far (``to_host``: what this machine's service sent to the host)."""

    port: int
    to_host: int = 0
    from_host: int = 0
    connections: int = 0


class HeldCommand:
    """A command kept running for as long as we hold something (the lock's holder process)."""

    def __init__(self, closer: Callable[[], None] | None, first_line: str, rest: str):
        self._closer = closer
        self.first_line = first_line
        self.rest = rest
        # The host lock: who held it before us (commands.lock), read once we hold it; "" when unknown.
        self.previous_holder = ""

    @property
    def holding(self) -> bool:
        return self._closer is not None

    def close(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer()


class Executor(Protocol):
    alias: str
    address: str

    def run(self, command: Command, check: bool = True, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None, structured: tuple[str, ...] = ()) -> Result: ...

    def hold(self, command: Command, timeout: float = 30) -> HeldCommand: ...

    # ``structured``: stderr lines starting with one of these prefixes are all kept (not only the tail).
    def stream_to_file(self, command: Command, target: BinaryIO,
                       progress: Callable[[int], None] | None = None,
                       structured: tuple[str, ...] = ()) -> StreamResult: ...

    def stream_from_file(self, command: Command, source: BinaryIO,
                         progress: Callable[[int], None] | None = None,
                         structured: tuple[str, ...] = ()) -> StreamResult: ...

    def open_tcp(self, address: str, port: int, timeout: float = 10): ...

    def reverse_tunnel(self, address: str, port: int) -> "contextlib.AbstractContextManager[Tunnel]": ...

    def abort_streams(self) -> None: ...

    def close(self) -> None: ...


# -- interruptions -----------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached an operation: it undoes what it registered, releases the lock, audits."""


_CANCEL = threading.Event()
_SHIELD = threading.local()


def cancelled() -> bool:
    return _CANCEL.is_set() and not getattr(_SHIELD, "on", False)


def check_cancelled() -> None:
    """Raise ``Interrupted`` in this thread if a signal asked every operation to stop (executors call it
    while they wait, so every thread of a batch stops, not only the main one)."""
    if cancelled():
        raise Interrupted()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Undo and clean-up run to their end even after a signal."""
    before = getattr(_SHIELD, "on", False)
    _SHIELD.on = True
    try:
        yield
    finally:
        _SHIELD.on = before


def request_cancel() -> None:
    _CANCEL.set()


def reset_cancel() -> None:
    _CANCEL.clear()


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM both: every thread stops at its next wait, the main thread at once. A CI cancel
    (SIGTERM) undoes the same way as Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum, frame):
        first = not _CANCEL.is_set()
        request_cancel()
        if first and not getattr(_SHIELD, "on", False):
            raise Interrupted()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


class ConnectionLost(HealthdeployError):
    """The SSH connection to a host went away (network cut, sshd gone)."""
