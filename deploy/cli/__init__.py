"""The operations behind the fab/inv tasks: resolve -> observe -> plan -> confirm -> apply -> render.

Tasks stay thin: they call one function of this package. ``Runtime`` carries the outside world (console,
connector) so tests can swap it. Modules: ``deploy`` (deploy, rollback), ``health`` (health, checklist,
release), ``backup`` (backup, restore, verify, list, prune, keygen), ``day2`` (status, logs, exec, releases,
audit, lock status, trust), ``render`` (one renderer per result type).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from invoke.exceptions import Exit, ParseError

from deploy.core.console import Console
from deploy.core.errors import EXIT_OK, ExitCode, HealthdeployError, UsageError
from deploy.core.settings import Settings, find_env_for_host, load_settings
from deploy.execute.executor import Interrupted, install_signal_handlers
from deploy.execute.ssh import RemoteHost, resolve
from deploy.stack.render import Target


@dataclass
class Runtime:
    settings: Settings
    console: Console = field(default_factory=Console)
    connector: Callable[[Settings, str], RemoteHost] | None = None

    def connect(self, alias: str) -> RemoteHost:
        if self.connector:
            return self.connector(self.settings, alias)
        s = self.settings
        return RemoteHost.connect(alias, s.ssh_config, s.ssh_known_hosts, s.ssh_connect_timeout, secrets=s.secrets)

    def target(self, alias: str, address: str | None = None) -> Target:
        s = self.settings
        if address is None:
            address, _, _ = resolve(alias, s.ssh_config)
        return Target.of(s, alias, address, data_address=self.data_address())

    def data_address(self) -> str:
        """The private address the application hosts reach the data host on (TOPOLOGY=shared, several hosts)."""
        s = self.settings
        if s.topology == "cells" or len(s.hosts) == 1:
            return ""
        if s.data_address:
            return s.data_address
        address, _, _ = resolve(s.data_host, s.ssh_config)
        return address


def entry(func):
    """Turn expected errors into one clear message per problem and the documented exit code; SIGINT and
    SIGTERM are handled the same way (every thread undoes, the lock is released, exit 130)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        install_signal_handlers()
        try:
            code = func(*args, **kwargs)
        except HealthdeployError as exc:
            if kwargs.get("json") and not getattr(exc, "json_reported", False):
                # A release script reading --json gets a document even for a refusal (docs/exit-codes.md).
                print(json.dumps({"error": exc.to_json()}, indent=2, sort_keys=True), flush=True)
            for line in exc.lines():
                print(line, file=sys.stderr)
            raise Exit(code=int(exc.exit_code)) from None
        except (KeyboardInterrupt, Interrupted):
            print("error: interrupted (unfinished changes were undone)", file=sys.stderr)
            raise Exit(code=int(ExitCode.INTERRUPTED)) from None
        except BrokenPipeError:  # `fab status | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=EXIT_OK) from None
        if code:
            raise Exit(code=int(code))
        return None

    return wrapper


def settings_for(env: str | None, hosts: list[str]) -> Settings:
    if not env:
        if not hosts:
            raise UsageError("no environment given", "pass --env NAME (or -H HOST of a known environment)")
        names = {find_env_for_host(h) for h in hosts}
        if len(names) > 1:
            raise UsageError(f"hosts belong to several environments ({', '.join(sorted(names))})", "pass --env NAME")
        env = names.pop()
    return load_settings(env)


def choose_hosts(settings: Settings, cli_hosts: list[str]) -> list[str]:
    """The hosts a command acts on: data hosts first, then the primary application host, then the rest."""
    hosts = cli_hosts or list(settings.hosts)
    unknown = [h for h in hosts if h not in settings.hosts]
    if unknown:
        raise UsageError(f"host(s) {', '.join(unknown)} are not in HOSTS of env '{settings.env_name}'",
                         f"add them to {settings.source} or pick from {', '.join(settings.hosts)}")
    order = {h: i for i, h in enumerate(settings.hosts)}
    return sorted(hosts, key=lambda h: (not (settings.role_of(h).runs_data and not settings.role_of(h).runs_app),
                                        h != settings.primary, order[h]))


# Numeric options are declared with a None default and parsed here: an int default makes invoke cast the value
# while parsing, which prints a traceback for `--tail x` (and refuses `--timeout 2.5`).
def parse_int(value, name: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a whole number, got {value!r}", f"e.g. --{name} 20") from None
    if number < 0:
        raise UsageError(f"--{name} must not be negative, got {number}", f"e.g. --{name} 20")
    return number


def parse_float(value, name: str, default: float | None = None) -> float:
    if value is None and default is not None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a number of seconds, got {value!r}", f"e.g. --{name} 60") from None
    if not number > 0:
        raise UsageError(f"--{name} must be more than 0 seconds, got {value!r}", f"e.g. --{name} 60")
    return number


# -- invoke's own parse errors -----------------------------------------------------------------------------
def argument_error(message: str, argv: list[str], collection, binary: str) -> UsageError:
    """What invoke's parser refused, as one `error:` line (invoke would print "No idea what '--env' is!", exit 1).

    The common one: a task's option written before the task name (`fab --env prod deploy`), which invoke
    reads as an option of fab itself. The line says so and gives the command in the right order."""
    names = set(collection.task_names) | {a for aliases in collection.task_names.values() for a in aliases}
    words = argv[1:]
    position = next((i for i, w in enumerate(words) if w in names), None)
    task = words[position] if position is not None else None
    hint = f"see `{binary} --help {task}`" if task else f"see `{binary} --list`"
    unknown = re.match(r"No idea what '(--?[^'=]+)", message)
    flag = unknown.group(1) if unknown else ""
    where = next((i for i, w in enumerate(words) if flag and (w == flag or w.startswith(flag + "="))), None)
    if task and where is not None and where < position:
        wanted = flag.lstrip("-").replace("-", "_")
        argument = next((a for a in collection[task].get_arguments()
                         if wanted in {n.replace("-", "_") for n in a.names}), None)
        if argument is not None:
            takes_value = argument.kind is not bool and "=" not in words[where]
            moved = words[where:where + 1 + takes_value]
            rest = words[:where] + words[where + len(moved):]
            at = rest.index(task) + 1
            fixed = " ".join([binary, *rest[:at], *moved, *rest[at:]])
            return UsageError(f"{flag} is an option of the task {task}, not of {binary} itself",
                              f"write it after the task name: {fixed}")
    return UsageError(message.rstrip("!"), hint)


def _cast_message(exc: ValueError, argv: list[str]) -> str:
    """invoke's "invalid literal for int() with base 10: 'x'" as "--workers must be a whole number, got 'x'"."""
    value = str(exc).rpartition(": ")[2].strip("'")
    for i, word in enumerate(argv[1:], 1):
        if word.startswith("-") and (word.endswith("=" + value) or (i + 1 < len(argv) and argv[i + 1] == value)):
            return f"{word.split('=')[0]} must be a whole number, got {value!r}"
    return f"an option must be a whole number, got {value!r}"


def install_argument_hints(binary: str) -> None:
    """Make invoke's parse errors one `error:` line with a hint and exit 2 (bad arguments), for fab and inv.

    Installed when the fabfile / tasks.py is imported, which invoke does before it parses the task part of
    the command line; invoke offers no other hook there (docs/exit-codes.md)."""
    from invoke.program import Program

    original = Program.parse_tasks
    if getattr(original, "healthdeploy_hints", False):
        return

    def parse_tasks(self) -> None:
        try:
            original(self)
        except (ParseError, ValueError) as exc:  # ValueError: invoke casting a value for an option with an int default
            error = argument_error(_cast_message(exc, sys.argv) if isinstance(exc, ValueError) else str(exc),
                                   sys.argv, self.collection, binary)
            if "--json" in sys.argv:  # the task never started, but a script reading stdout still gets a document
                print(json.dumps({"error": error.to_json()}, indent=2, sort_keys=True), flush=True)
            raise Exit(error.lines()[0], code=int(error.exit_code)) from None

    parse_tasks.healthdeploy_hints = True
    Program.parse_tasks = parse_tasks
