"""An executor that runs facts and refuses everything else: what a dry run and the planning phase use, so
"changes nothing" is enforced, not promised."""

from __future__ import annotations

from typing import Callable

from deploy.commands.base import Command
from deploy.core.errors import HealthdeployError
from deploy.execute.executor import Executor, Result


class WriteRefused(HealthdeployError):
    pass


class ReadOnlyHost:
    def __init__(self, real: Executor):
        self.real = real
        self.alias = real.alias
        self.address = real.address

    def run(self, command: Command, check: bool = True, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None, structured: tuple[str, ...] = ()) -> Result:
        if not command.readonly:
            raise WriteRefused(f"internal: a read-only phase tried to run {command.description!r} on {self.alias}",
                               "this is a bug in healthdeploy; nothing was changed")
        return self.real.run(command, check=check, timeout=timeout, on_line=on_line, structured=structured)

    def __getattr__(self, name):
        if name in ("hold", "stream_from_file", "reverse_tunnel"):
            raise WriteRefused(f"internal: a read-only phase tried to {name} on {self.alias}")
        return getattr(self.real, name)
