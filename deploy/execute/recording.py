"""A recording executor for tests: every command is recorded, answered by a model of the host (``world``), and
any command can be made to fail (the Nth, or the first matching one) with any error, including a lost
connection or an interrupt. Orchestration (deploy, rollback, restore and their undo paths) is tested with it
in milliseconds, without sshd.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import BinaryIO, Callable

from deploy.commands.base import Command
from deploy.core.errors import RemoteCommandError
from deploy.execute.executor import HeldCommand, Result, StreamResult, Tunnel


class RecordingHost:
    def __init__(self, world, alias: str = "h1", address: str = "10.0.0.1",
                 fail_at: int | None = None, fail_when: Callable[[Command], bool] | None = None,
                 error: BaseException | None = None):
        self.world = world
        self.alias = alias
        self.address = address
        self.commands: list[Command] = []
        self.fail_at = fail_at
        self.fail_when = fail_when
        self.error = error or RemoteCommandError("injected failure", 1, "injected")
        self.failed: Command | None = None
        self.identity = "SHA256:recording"
        self.tunnels: list[tuple[str, int, int]] = []  # (local address, local port, host port) of reverse tunnels

    # -- fault injection ----------------------------------------------------------------------------
    def _record(self, command: Command) -> None:
        self.commands.append(command)
        hit = (self.fail_at is not None and len(self.commands) == self.fail_at) or (
            self.fail_when is not None and self.failed is None and self.fail_when(command))
        if hit:
            self.failed = command
            self.fail_at, self.fail_when = None, None  # one failure: undo must be able to run
            raise self.error

    def intents(self, only: tuple[str, ...] = ()) -> list[tuple]:
        return [c.intent for c in self.commands if c.intent and (not only or c.intent[0] in only)]

    # -- the executor protocol ------------------------------------------------------------------------
    def run(self, command: Command, check: bool = True, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None, structured: tuple[str, ...] = ()) -> Result:
        self._record(command)
        result = self.world.answer(command)
        if on_line:
            for line in (result.text + result.err).splitlines():
                on_line(line)
        if check and not result.ok:
            raise RemoteCommandError(f"{command.description} on {self.alias}", result.exit_status, result.err)
        return result

    def hold(self, command: Command, timeout: float = 30) -> HeldCommand:
        self._record(command)
        first, rest = self.world.hold(command)
        if first != "acquired":
            return HeldCommand(None, first, rest)
        return HeldCommand(lambda: self.world.drop_holder(command), "acquired", "")

    def stream_from_file(self, command: Command, source: BinaryIO, progress=None, structured=()) -> StreamResult:
        self._record(command)
        data = source.read()
        result = self.world.receive(command, data)
        digest = hashlib.sha256(data).hexdigest()
        if not result.ok:
            raise RemoteCommandError(f"{command.description} on {self.alias}", result.exit_status, result.err)
        return StreamResult(len(data), digest, digest, 0, 0.0, "")

    def stream_to_file(self, command: Command, target: BinaryIO, progress=None, structured=()) -> StreamResult:
        self._record(command)
        data, stderr = self.world.send(command)
        target.write(data)
        digest = hashlib.sha256(data).hexdigest()
        return StreamResult(len(data), digest, digest, 0, 0.0, stderr)

    def open_tcp(self, address: str, port: int, timeout: float = 10):
        raise NotImplementedError("the recording executor has no tunnels")

    @contextlib.contextmanager
    def reverse_tunnel(self, address: str, port: int):
        """A pretend reverse tunnel: the model sees its port; ``world.tunnel_bytes`` says what "crossed" it."""
        tunnel = Tunnel(40000 + len(self.commands), to_host=getattr(self.world, "tunnel_bytes", 0))
        self.tunnels.append((address, port, tunnel.port))
        yield tunnel

    def abort_streams(self) -> None:
        pass

    def close(self) -> None:
        pass
