"""``Command``: a remote command as argv words, quoted in exactly one place (``render``).

Rules enforced here, so no builder can break them:
- every word is a ``str``; a ``Secret`` is refused (secrets travel as stdin content, never as argv,
  because the host's ``ps`` shows command lines);
- words are joined with ``shlex.quote`` only in ``render``; shell operators come from a fixed set;
- shell scripts are constants of the builder module and take their values as positional
  parameters (``sh -c SCRIPT sh ARG...``), so values are never pasted into shell text.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from typing import Iterable, Union

from deploy.core.secret import Secret

OPERATORS = frozenset({"&&", "||", "|", ";"})

Words = tuple[str, ...]
Part = Union[Words, str]  # a tuple of argv words, or an operator


def _words(argv: Iterable[object]) -> Words:
    words = []
    for word in argv:
        if isinstance(word, Secret):
            raise TypeError("a Secret cannot be part of a command line; send it as stdin or in the env file")
        if not isinstance(word, str):
            raise TypeError(f"command words must be str, got {type(word).__name__}: {word!r}")
        words.append(word)
    if not words:
        raise ValueError("empty command")
    return tuple(words)


@dataclass(frozen=True)
class Command:
    """A command to run on a host.

    ``readonly`` commands only observe (facts); the dry-run executor runs those for real and prints
    the others. ``stdin`` is content sent to the command (file bodies, env files); it is never printed.
    """

    parts: tuple[Part, ...]
    description: str = ""
    readonly: bool = False
    stdin: bytes | None = field(default=None, repr=False)
    # What the command does, machine-readable: (name, *args). The recording executor of the tests answers
    # by it, so orchestration is tested without parsing shell text.
    intent: tuple = ()
    timeout: float | None = None  # the command's own deadline (the executor's default applies otherwise)
    # Run on the host when the command is killed at its deadline (e.g. remove a one-off container).
    on_timeout: "Command | None" = field(default=None, repr=False)
    # For a held command: send one byte on its stdin this often while it is held (commands.presence).
    heartbeat_s: float | None = None

    def render(self) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, tuple):
                out.append(shlex.join(part))
            else:
                out.append(part)
        return " ".join(out)

    def display(self) -> str:
        """What dry-run and logs show: the command line, and the stdin size, never its content."""
        text = self.render()
        if self.stdin is not None:
            text += f"  # stdin: {len(self.stdin)} bytes"
        return text

    def with_stdin(self, data: bytes) -> "Command":
        return replace(self, stdin=data)

    def tagged(self, *intent, timeout: float | None = None, on_timeout: "Command | None" = None) -> "Command":
        return replace(self, intent=tuple(intent), timeout=timeout if timeout is not None else self.timeout,
                       on_timeout=on_timeout or self.on_timeout)

    def __str__(self) -> str:
        return self.display()


def cmd(*argv: str, description: str = "", readonly: bool = False, stdin: bytes | None = None,
        intent: tuple = (), timeout: float | None = None) -> Command:
    words = _words(argv)
    return Command((words,), description or words[0], readonly, stdin, intent, timeout)


def script(body: str, *args: str, description: str, readonly: bool = False, shell: str = "sh",
           stdin: bytes | None = None, intent: tuple = (), timeout: float | None = None) -> Command:
    """``sh -c BODY sh ARGS...``: BODY must be a constant; values go in ARGS ($1, $2, ...)."""
    return cmd(shell, "-c", body, shell, *args, description=description, readonly=readonly, stdin=stdin,
               intent=intent, timeout=timeout)


def with_env(command: Command, environment: dict[str, str]) -> Command:
    """``env K=V ... <command>`` for values that are not secret (compose interpolation of labels)."""
    if not environment:
        return command
    words = tuple(f"{k}={v}" for k, v in sorted(environment.items()))
    for value in environment.values():
        _words((value,))
    return replace(command, parts=(("env",) + words,) + command.parts)


def _join(op: str, commands: tuple[Command, ...], description: str | None) -> Command:
    assert op in OPERATORS
    parts: list[Part] = []
    for index, command in enumerate(commands):
        if index:
            parts.append(op)
        parts.extend(command.parts)
    stdin = commands[0].stdin
    return Command(
        tuple(parts),
        description or " then ".join(c.description for c in commands),
        all(c.readonly for c in commands),
        stdin,
        commands[0].intent,
    )


def pipe(*commands: Command, description: str | None = None) -> Command:
    return _join("|", commands, description)


def and_then(*commands: Command, description: str | None = None) -> Command:
    return _join("&&", commands, description)


# SHA-256 of stdin as one marker line. openssl uses the CPU's SHA instructions (about 3x coreutils'
# sha256sum here, which the stream would otherwise wait for); sha256sum where openssl is missing.
_SHA256_FUNCTION = r"""sha256_of_stdin() {
  if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256; else sha256sum; fi |
    awk '{ print "HEALTHDEPLOY-SHA256 " (($NF == "-") ? $1 : $NF) }'
}
"""

# Runs the inner command, passes its stdout through unchanged and reports the SHA-256 of exactly
# those bytes on stderr, so the receiver can compare checksums end to end. The checksum process is
# started by the main shell (exec 3> >(...)), so closing fd 3 ends it and `wait $!` waits for its
# line before the script exits; pipefail keeps the inner command's failure.
_CHECKSUM_STDOUT = _SHA256_FUNCTION + r"""set -o pipefail
exec 3> >(sha256_of_stdin >&2)
eval "$1" | tee /dev/fd/3
rc=$?
exec 3>&-
wait $! 2>/dev/null
exit $rc"""

# The reverse: checksums what arrives on stdin before the inner command consumes it.
_CHECKSUM_STDIN = _SHA256_FUNCTION + r"""set -o pipefail
exec 3> >(sha256_of_stdin >&2)
tee /dev/fd/3 | eval "$1"
rc=$?
exec 3>&-
wait $! 2>/dev/null
exit $rc"""

CHECKSUM_MARKER = "HEALTHDEPLOY-SHA256 "


def checksummed_stdout(inner: Command) -> Command:
    return script(_CHECKSUM_STDOUT, inner.render(), shell="bash", description=inner.description,
                  readonly=inner.readonly)


def checksummed_stdin(inner: Command) -> Command:
    return script(_CHECKSUM_STDIN, inner.render(), shell="bash", description=inner.description,
                  readonly=inner.readonly)


def parse_checksum(stderr_text: str) -> tuple[str | None, str]:
    """Split the checksum marker out of stderr: (sha256 or None, the rest of stderr)."""
    digest = None
    rest = []
    for line in stderr_text.splitlines():
        if line.startswith(CHECKSUM_MARKER):
            digest = line[len(CHECKSUM_MARKER):].strip()
        else:
            rest.append(line)
    return digest, "\n".join(rest)
