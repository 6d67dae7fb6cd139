"""The operations behind the fab/inv tasks: resolve -> observe -> plan -> confirm -> apply -> render.

Tasks stay thin: they call one function of this package. ``Runtime`` carries the outside world (console,
connector) so tests can swap it. Modules: ``deploy`` (deploy, rollback), ``health`` (health, checklist,
release), ``backup`` (backup, restore, verify, list, prune, keygen), ``day2`` (status, logs, exec, releases,
audit, lock status, trust), ``render`` (one renderer per result type).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from invoke.exceptions import Exit

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


def parse_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a whole number, got {value!r}", f"e.g. --{name} 20") from None


def parse_float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a number of seconds, got {value!r}", f"e.g. --{name} 60") from None
