"""Remote tasks: `fab -H prod deploy`, `fab -H web1,web2 deploy`, `fab --env prod rollback`, ...

Thin on purpose: each task resolves env and hosts, then calls one function of deploy.cli.
Without -H a task acts on the environment's HOSTS; without --env the environment is found from -H.
"""

from invoke import Collection, task

from deploy import cli
from deploy.cli import backup as cli_backup  # noqa: F401  (keeps the import graph the same for inv and fab)
from deploy.cli import day2, health as cli_health
from deploy.cli import deploy as cli_deploy
from deploy.core.console import Console
from deploy.core.errors import UsageError
from deploy.execute.fabric_executor import cli_hosts, remainder_words

cli.install_argument_hints("fab")  # `fab --env prod deploy`: one line saying where --env goes, exit 2


def _runtime(c, env, quiet=False):
    hosts = cli_hosts(c)
    settings = cli.settings_for(env, hosts)
    return cli.Runtime(settings, Console(quiet=quiet)), hosts


@task(help={"env": "environment name (env/NAME.env); found from -H when omitted",
            "dry-run": "show the plan (files, rebuilds, rolls, each with its reason); change nothing",
            "break-lock": "remove a stale lock whose holder is gone",
            "json": "print the summary as JSON"})
@cli.entry
def deploy(c, env=None, dry_run=False, break_lock=False, json=False):
    """Deploy the stack with zero-downtime rolls; roll back by itself when the new release is unhealthy."""
    runtime, hosts = _runtime(c, env, quiet=False)
    return cli_deploy.deploy(runtime, hosts, dry_run=dry_run, break_lock=break_lock, as_json=json)


@task(help={"env": "environment name", "to": "release id (default: the one live before the current one)",
            "with-secrets": "also put back the secrets that release ran with (default: the current secrets stay)",
            "dry-run": "show the plan; change nothing",
            "break-lock": "remove a stale lock", "json": "print the summary as JSON"})
@cli.entry
def rollback(c, env=None, to=None, with_secrets=False, dry_run=False, break_lock=False, json=False):
    """Return to the previous (or a named) release without rebuilding."""
    runtime, hosts = _runtime(c, env)
    return cli_deploy.rollback(runtime, hosts, to=to, break_lock=break_lock, as_json=json, with_secrets=with_secrets,
                               dry_run=dry_run)


@task(help={"env": "environment name", "json": "print JSON"})
@cli.entry
def releases(c, env=None, json=False):
    """List the releases kept on each host; * marks the live one."""
    runtime, hosts = _runtime(c, env)
    return day2.releases(runtime, hosts, as_json=json)


@task(help={"env": "environment name", "lines": "entries per host (default 20)", "json": "print JSON"})
@cli.entry
def audit(c, env=None, lines=None, json=False):
    """Show the recent audit entries (deploys, rollbacks, locks, restores) of each host."""
    lines = cli.parse_int(lines, "lines", 20)
    runtime, hosts = _runtime(c, env)
    return day2.audit(runtime, hosts, lines=lines, as_json=json)


@task(name="status", help={"env": "environment name", "json": "print JSON"})
@cli.entry
def lock_status(c, env=None, json=False):
    """Who holds the host lock on each host (free, held, or stale)."""
    runtime, hosts = _runtime(c, env)
    return day2.lock_status(runtime, hosts, as_json=json)


@task(help={"env": "environment name", "fingerprint": "expected SHA256:... fingerprint of the host (checked before trusting)",
            "hop": "expected fingerprints of jump hosts: NAME=SHA256:...[,NAME=SHA256:...] (NAME as ProxyJump writes it)",
            "yes": "trust new keys without asking (only after checking the fingerprints out of band; never a changed key)"})
@cli.entry
def trust(c, env=None, fingerprint=None, hop=None, yes=False):
    """Show and record the SSH host key of each hop to a host (jump hosts first, each reached through the ones
    before it); strict checking refuses unknown and changed keys on every hop."""
    hosts = cli_hosts(c)
    if len(hosts) != 1:
        raise UsageError("hosts.trust takes exactly one host", "fab -H HOST hosts.trust")
    settings = cli.settings_for(env, hosts)
    return day2.trust_host(settings, hosts[0], fingerprint, yes, Console(), day2.parse_hop_fingerprints(hop))


@task(help={"env": "environment name", "json": "print JSON (schema: docs/health.md)",
            "timeout": "seconds each host gets before it counts as failed (default 60)"})
@cli.entry
def health(c, env=None, json=False, timeout=None):
    """Containers, health checks, HTTP/TCP probes and published ports on every host; exit 7 when unhealthy."""
    timeout = cli.parse_float(timeout, "timeout", 60)
    runtime, hosts = _runtime(c, env)
    return cli_health.health(runtime, hosts, as_json=json, timeout=timeout)


@task(help={"env": "environment name", "json": "print JSON"})
@cli.entry
def status(c, env=None, json=False):
    """Release, uptime and health of every service on every host, by role, in one screen."""
    runtime, hosts = _runtime(c, env)
    return day2.status(runtime, hosts, as_json=json)


@task(help={"env": "environment name", "tail": "lines from the end (default 100)", "follow": "keep following"})
@cli.entry
def logs(c, service, env=None, tail=None, follow=False):
    """Logs of a service on each host: `fab -H prod logs backend --follow`."""
    tail = cli.parse_int(tail, "tail", 100)
    runtime, hosts = _runtime(c, env)
    return day2.logs(runtime, hosts, service, tail=tail, follow=follow)


@task(name="exec", help={"env": "environment name"})
@cli.entry
def exec_(c, service, env=None):
    """Run a command in a service: `fab -H prod exec backend -- node -v` (exit 100+N when it exits N)."""
    runtime, hosts = _runtime(c, env)
    return day2.exec_in_service(runtime, hosts, service, remainder_words())


ns = Collection(deploy, rollback, releases, audit, health, status, logs, exec_)
ns.add_collection(Collection("lock", lock_status))
ns.add_collection(Collection("hosts", trust))
