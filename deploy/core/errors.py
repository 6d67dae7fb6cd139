"""Errors that reach the operator as one clear line and a distinct exit code."""

from __future__ import annotations

from dataclasses import dataclass

import enum


class ExitCode(enum.IntEnum):
    """Exit codes scripts can act on (README: "Exit codes"). 1 is kept for unexpected failures."""

    OK = 0
    FAILED = 1
    USAGE = 2  # bad settings or arguments: nothing was touched
    PREFLIGHT = 3  # refused by preflight: the host is untouched
    LOCKED = 4  # another operation holds the host's lock
    ROLLED_BACK = 5  # the new release was unhealthy and the old one serves again
    HOSTKEY = 6  # unknown or changed SSH host key
    UNHEALTHY = 7  # health/checklist found failures
    INTEGRITY = 8  # a backup or stream failed its checksum/length/signature check
    INTERRUPTED = 130  # SIGINT/SIGTERM: what the plan registered was undone, the lock released
    # `fab exec`: the remote command's own status N is reported as REMOTE_BASE + N (capped at 255), so a
    # remote 5 can never read as "rolled back".
    REMOTE_BASE = 100


EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_PREFLIGHT = ExitCode.PREFLIGHT
EXIT_LOCKED = ExitCode.LOCKED
EXIT_ROLLED_BACK = ExitCode.ROLLED_BACK
EXIT_HOSTKEY = ExitCode.HOSTKEY
EXIT_UNHEALTHY = ExitCode.UNHEALTHY
EXIT_INTEGRITY = ExitCode.INTEGRITY


class HealthdeployError(Exception):
    """An expected failure: printed as ``error: <message>`` (+ hint), never as a traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def lines(self) -> list[str]:
        text = f"error: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return [text]

    def to_json(self) -> dict:
        """The error as `--json` prints it (docs/exit-codes.md): what, how to fix it, the exit code."""
        return {"message": self.message, "hint": self.hint or "", "exit_code": int(self.exit_code),
                "lines": self.lines()}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the settings, tied to the key it concerns."""

    key: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class SettingsError(HealthdeployError):
    exit_code = EXIT_USAGE

    def __init__(self, env_name: str, problems: list[Problem]):
        super().__init__(f"{len(problems)} problem(s) in settings for env '{env_name}'")
        self.env_name = env_name
        self.problems = problems

    def lines(self) -> list[str]:
        return [f"error: {p}" for p in self.problems]

    def to_json(self) -> dict:
        return {**super().to_json(), "problems": [{"key": p.key, "message": p.message, "hint": p.hint}
                                                  for p in self.problems]}


class UsageError(HealthdeployError):
    exit_code = EXIT_USAGE


class HostKeyError(HealthdeployError):
    exit_code = EXIT_HOSTKEY


class RemoteCommandError(HealthdeployError):
    """A remote command exited non-zero where success was required."""

    def __init__(self, description: str, exit_status: int, stderr_tail: str):
        tail = stderr_tail.strip()
        message = f"{description} failed with exit status {exit_status}"
        if tail:
            lines = [line.strip() for line in tail.splitlines() if line.strip()]
            message += ": " + " | ".join(lines[-3:])[:600]
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr_tail = tail


class IntegrityError(HealthdeployError):
    exit_code = EXIT_INTEGRITY
