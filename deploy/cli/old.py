"""The operations behind the fab/inv tasks: resolve env and hosts, connect, run, print, exit code.

Tasks stay thin: they call one function here. ``Runtime`` carries the outside world (console,
connector) so tests can swap it.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from invoke.exceptions import Exit

from deploy.stack import payload as pl
from deploy.core.console import Console
from deploy.core.errors import EXIT_OK, HealthdeployError, UsageError
from deploy.execute.release_old import DeployStopped, HostDeploy, HostOutcome, run_on_hosts
from deploy.core.settings import Settings, find_env_for_host, load_settings
from deploy.execute.ssh import DryRunHost, RemoteHost, add_known_host, fetch_host_key, fingerprint, resolve
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

    def target(self, alias: str) -> Target:
        address, _, _ = resolve(alias, self.settings.ssh_config)
        return Target.of(self.settings, alias, address)


def entry(func):
    """Turn expected errors into one clear message per problem and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            code = func(*args, **kwargs)
        except HealthdeployError as exc:
            for line in exc.lines():
                print(line, file=sys.stderr)
            raise Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise Exit(code=130) from None
        except BrokenPipeError:  # `fab status | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=EXIT_OK) from None
        if code:
            raise Exit(code=code)
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
    hosts = cli_hosts or list(settings.hosts)
    unknown = [h for h in hosts if h not in settings.hosts]
    if unknown:
        raise UsageError(f"host(s) {', '.join(unknown)} are not in HOSTS of env '{settings.env_name}'",
                         f"add them to {settings.source} or pick from {', '.join(settings.hosts)}")
    # The primary host goes first: it migrates before any other host switches.
    return sorted(hosts, key=lambda h: h != settings.primary)


def summary(console: Console, outcomes: list[HostOutcome], as_json: bool) -> None:
    if as_json:
        console.json({"hosts": [o.__dict__ for o in outcomes]})
        return
    console.table(["host", "result", "release", "previous", "services", "migrated", "sent", "seconds", "message"],
                  [[o.host, o.result, o.release, o.previous, ",".join(o.services) or "-", "yes" if o.migrated else "no",
                    f"{o.uploaded_files} files/{o.uploaded_bytes} B", o.seconds, o.message] for o in outcomes])


def deploy(runtime: Runtime, cli_hosts: list[str], dry_run: bool = False, break_lock: bool = False,
           as_json: bool = False) -> int:
    s = runtime.settings
    hosts = choose_hosts(s, cli_hosts)
    migrate_on = hosts[0]
    if s.app_source and pl.is_git(s.app_source):
        # Resolve the ref once, on the primary host, so every host deploys the same commit.
        # (`git ls-remote` only reads: a dry run or a preflight refusal leaves the host as it was.)
        with runtime.connect(migrate_on) as primary:
            commit = HostDeploy(s, Target.of(s, migrate_on, primary.address), primary, runtime.console).resolve_git()
        source = pl.git_source_files(s.app_source, commit)
        runtime.console.info(f"source: {pl.display_url(s.app_source)} {s.app_ref} = {commit}")
    else:
        source = pl.collect_source(s.app_source) if s.app_source else {}
    release = pl.new_release_id(pl.manifest_of(source))
    runtime.console.info(f"deploy {s.env_name} release {release} to {', '.join(hosts)}"
                         + (" (dry run: nothing will change)" if dry_run else ""))

    def work(alias: str, outcome: HostOutcome) -> None:
        real = runtime.connect(alias)
        host = DryRunHost(real, alias, runtime.console.info) if dry_run else real
        try:
            target = Target.of(s, alias, real.address)
            files = pl.build_payload(s, target, source)
            job = HostDeploy(s, target, host, runtime.console, dry_run=dry_run)
            if dry_run:
                plan(job, outcome, files)
            else:
                job.deploy(outcome, files, release, migrate=(alias == migrate_on), break_lock=break_lock)
        finally:
            host.close()

    return _on_hosts(runtime, hosts, work, as_json)


def _on_hosts(runtime: Runtime, hosts: list[str], work, as_json: bool) -> int:
    """Run ``work`` host by host (in batches); the summary is printed whether or not a host failed."""
    try:
        outcomes = run_on_hosts(hosts, runtime.settings.batch_size, work)
    except DeployStopped as stopped:
        summary(runtime.console, stopped.outcomes, as_json)
        raise
    summary(runtime.console, outcomes, as_json)
    return EXIT_OK


def plan(job: HostDeploy, outcome: HostOutcome, files: dict[str, bytes]) -> None:
    """Dry run: facts are read for real; the changes are listed, nothing is written."""
    from deploy.facts.parse import parse_lock
    from deploy.commands import files as fs

    facts = job.preflight()
    manifest = pl.manifest_of(files)
    live = job.live_files(facts.current, manifest) if facts.current else {}
    change = pl.diff(manifest, live)
    lock = parse_lock(job.host.run(fs.lock_status(job.lock_dir)).text)
    job.say(f"lock: {lock.describe()}")
    for path in change.changed:
        job.say(f"would send {path} ({'changed' if path in live else 'new'})")
    for path in change.removed:
        job.say(f"would remove {path}")
    touched = sorted(change.services_touched()) if facts.current else ["all application services"]
    job.say(f"would rebuild: {', '.join(touched) or 'nothing (Docker cache)'}; services roll only when their image "
            "or env file changed")
    outcome.result = "planned" if not change.empty else "unchanged"
    outcome.previous = facts.current


def rollback(runtime: Runtime, cli_hosts: list[str], to: str | None, break_lock: bool = False,
             as_json: bool = False) -> int:
    s = runtime.settings
    hosts = choose_hosts(s, cli_hosts)

    def work(alias: str, outcome: HostOutcome) -> None:
        host = runtime.connect(alias)
        try:
            HostDeploy(s, Target.of(s, alias, host.address), host, runtime.console).rollback(outcome, to, break_lock)
        finally:
            host.close()

    return _on_hosts(runtime, hosts, work, as_json)


def releases(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    rows = []
    for alias in choose_hosts(runtime.settings, cli_hosts):
        with runtime.connect(alias) as host:
            job = HostDeploy(runtime.settings, Target.of(runtime.settings, alias, host.address), host, runtime.console)
            facts = job.facts()
            for release in facts.releases:
                rows.append({"host": alias, "release": release, "live": release == facts.current})
    if as_json:
        runtime.console.json({"releases": rows})
    else:
        runtime.console.table(["host", "release", "live"], [[r["host"], r["release"], "*" if r["live"] else ""] for r in rows])
    return EXIT_OK


def audit(runtime: Runtime, cli_hosts: list[str], lines: int = 20, as_json: bool = False) -> int:
    import json as _json
    from deploy.commands import files as fs

    entries = []
    for alias in choose_hosts(runtime.settings, cli_hosts):
        with runtime.connect(alias) as host:
            target = Target.of(runtime.settings, alias, host.address)
            text = host.run(fs.read_file(f"{target.shared}/audit.log")).text
            for line in text.splitlines()[-lines:]:
                try:
                    entries.append(_json.loads(line))
                except ValueError:
                    continue
    if as_json:
        runtime.console.json({"entries": entries})
    else:
        runtime.console.table(["ts", "host", "event", "release", "result", "who", "seconds"],
                              [[e.get("ts"), e.get("host"), e.get("event"), e.get("release", ""), e.get("result", ""),
                                e.get("who"), e.get("duration_s", "")] for e in entries])
    return EXIT_OK


def lock_status(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    from deploy.commands import files as fs
    from deploy.facts.parse import parse_lock

    rows = []
    for alias in choose_hosts(runtime.settings, cli_hosts):
        with runtime.connect(alias) as host:
            target = Target.of(runtime.settings, alias, host.address)
            state = parse_lock(host.run(fs.lock_status(f"{target.deploy_path}/.lock")).text)
            rows.append({"host": alias, "state": state.state, **state.info})
    if as_json:
        runtime.console.json({"locks": rows})
    else:
        runtime.console.table(["host", "state", "who", "since", "release"],
                              [[r["host"], r["state"], r.get("who", ""), r.get("since", ""), r.get("release", "")] for r in rows])
    return EXIT_OK


def trust_host(settings: Settings, alias: str, expected: str | None, yes: bool, console: Console) -> int:
    name, key = fetch_host_key(alias, settings.ssh_config)
    shown = f"{key.get_name()} {fingerprint(key)}"
    console.result(f"{alias} ({name}) presents {shown}")
    if expected:
        if expected.strip() != fingerprint(key):
            raise HealthdeployError(f"fingerprint of {alias} is {fingerprint(key)}, not {expected}",
                                    "do not trust this host until you know why")
    elif not yes:
        if not sys.stdin.isatty():
            raise UsageError("not trusting a host key without confirmation",
                             "pass --fingerprint SHA256:... (compare out of band) or --yes")
        answer = input(f"Trust {shown} for {alias}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UsageError("not trusted", "nothing was written")
    add_known_host(settings.ssh_known_hosts, name, key)
    console.result(f"trusted: {name} added to {settings.ssh_known_hosts}")
    return EXIT_OK


def show_endpoints(runtime: Runtime, cli_hosts: list[str]) -> int:
    """After the demo deploy: each application endpoint through the gateway, probed from here."""
    import json as _json
    import urllib.request

    rows = []
    failed = False
    for alias in choose_hosts(runtime.settings, cli_hosts):
        address = runtime.target(alias).gateway_bind
        from deploy.stack.render import GATEWAY_PORT_OF

        for service, port in GATEWAY_PORT_OF.items():
            url = f"http://{address}:{port}/health"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = _json.loads(response.read() or b"{}")
                    rows.append([alias, service, url, response.status, body.get("build", "")])
            except Exception as exc:  # report every endpoint, then fail
                failed = True
                rows.append([alias, service, url, f"error: {exc}", ""])
    runtime.console.table(["host", "service", "url", "status", "build"], rows)
    return 7 if failed else EXIT_OK


def _with_deadline(func, seconds: float):
    """Run ``func`` in a daemon thread; a hung host cannot hang the command (or its exit)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = func()
        except BaseException as exc:  # reported by the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def host_health(runtime: Runtime, alias: str):
    from deploy.plan import health as hl
    from deploy.commands import probe
    from deploy.facts.parse import stack_containers

    result = hl.HostHealth(alias)
    with runtime.connect(alias) as host:
        s = runtime.settings
        target = Target.of(s, alias, host.address)
        containers = stack_containers(host, target.project)
        releases = sorted({c.image_ref.rsplit(":", 1)[-1] for c in containers if c.service == "backend" and c.state == "running"})
        result.release = ",".join(releases)
        result.checks += hl.container_checks(alias, s, containers)
        gateway = next((c for c in containers if c.service == "gateway" and c.state == "running"), None)
        targets = hl.probe_targets(s, containers)
        output = host.run(probe.probes_in(gateway.name, targets), check=False).text if gateway else None
        result.checks += hl.probe_checks(alias, targets, output)
        listeners = host.run(probe.listening_sockets(), check=False)
        published = host.run(probe.probes_on_host(hl.published_targets(target.gateway_bind)), check=False).text
        if listeners.ok:
            result.checks += hl.port_checks(alias, s, target.gateway_bind, hl.parse_listeners(listeners.text), published)
        else:
            result.checks.append(hl.Check(alias, "ports", "fail", "cannot list sockets (is iproute2's ss installed?)"))
    return result


def health(runtime: Runtime, cli_hosts: list[str], as_json: bool = False, timeout: float = 60) -> int:
    """Every check on every host, in parallel, each host bounded by ``timeout``; exit 0 only if all pass."""
    import threading

    from deploy.plan import health as hl

    hosts = choose_hosts(runtime.settings, cli_hosts)
    results: dict[str, hl.HostHealth] = {}

    def one(alias: str) -> None:
        try:
            results[alias] = _with_deadline(lambda: host_health(runtime, alias), timeout)
        except HealthdeployError as exc:
            results[alias] = hl.HostHealth(alias, error=exc.message)
        except Exception as exc:  # a hung or broken host is a result, not a crash
            results[alias] = hl.HostHealth(alias, error=f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(alias,), daemon=True) for alias in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    ordered = [results.get(a) or hl.HostHealth(a, error="no result") for a in hosts]
    if as_json:
        runtime.console.json(hl.to_json(ordered, runtime.settings.env_name))
    else:
        rows = []
        for r in ordered:
            if r.error:
                rows.append([r.host, "host", "FAIL", r.error])
            rows += [[c.host, c.name, c.status.upper(), c.detail] for c in r.checks]
        runtime.console.table(["host", "check", "status", "detail"], rows)
        verdict = "healthy" if all(r.healthy for r in ordered) else "UNHEALTHY"
        runtime.console.result(f"{runtime.settings.env_name}: {verdict}")
    return EXIT_OK if all(r.healthy for r in ordered) else 7


def gather_checklist_facts(runtime: Runtime, items, now=None):
    """Connect to each host once (only when a remote check is listed) and collect every fact."""
    import datetime as _dt
    import json as _json

    from deploy.plan import checklist as cl
    from deploy.commands import docker as dk
    from deploy.commands import files as fs
    from deploy.facts.parse import HostFacts, parse_containers
    from deploy.core.settings import PROJECT_ROOT

    s = runtime.settings
    facts = cl.Facts(settings=s, now=now or _dt.datetime.now(_dt.timezone.utc),
                     backups_dir=PROJECT_ROOT / "backups")
    if not any(item.kind in cl.REMOTE_KINDS for item in items):
        return facts
    for alias in s.hosts:
        try:
            def collect(alias=alias):
                with runtime.connect(alias) as host:
                    target = Target.of(s, alias, host.address)
                    hf = HostFacts.parse(host.run(fs.host_facts(target.deploy_path)).text)
                    raw = host.run(dk.project_containers(target.project)).text
                    containers = [c for c in parse_containers(raw, target.project) if not c.oneoff]
                    logs = {item["Name"].lstrip("/"): (item.get("HostConfig") or {}).get("LogConfig") or {}
                            for item in _json.loads(raw or "[]")}
                    return hf, containers, logs
            hf, containers, logs = _with_deadline(collect, 60)
            facts.hosts[alias], facts.containers[alias], facts.log_configs[alias] = hf, containers, logs
            if any(item.kind == "services_healthy" for item in items):
                facts.healthy[alias] = _with_deadline(lambda alias=alias: host_health(runtime, alias), 60).healthy
        except HealthdeployError as exc:
            facts.host_errors[alias] = exc.message
        except Exception as exc:  # a broken host is a failed check, not a crash
            facts.host_errors[alias] = f"{type(exc).__name__}: {exc}"
    return facts


def checklist(runtime: Runtime, as_json: bool = False, junit: str | None = None, file: str | None = None) -> int:
    from pathlib import Path

    from deploy.plan import checklist as cl
    from deploy.core.settings import env_dir

    path = Path(file) if file else cl.checklist_path(env_dir(), runtime.settings.env_name)
    items = cl.load_items(path)
    outcomes = cl.evaluate(gather_checklist_facts(runtime, items), items)
    env = runtime.settings.env_name
    if junit:
        Path(junit).write_bytes(cl.to_junit(env, outcomes))
    if as_json:
        runtime.console.json(cl.to_json(env, outcomes))
    else:
        runtime.console.table(["check", "status", "reason", "hint"],
                              [[o.name, o.status.upper(), o.reason, o.hint if o.status != "pass" else ""] for o in outcomes])
        counts = cl.to_json(env, outcomes)["counts"]
        runtime.console.result(f"{env}: {counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed "
                               f"({path.name})")
    return EXIT_OK if all(o.status != "fail" for o in outcomes) else 7


def _age(started: str) -> str:
    import datetime as _dt

    try:
        when = _dt.datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return "-"
    seconds = int((_dt.datetime.now(_dt.timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    """Release, uptime and health of every service on every host, in one screen."""
    from deploy.commands import files as fs
    from deploy.facts.parse import HostFacts, stack_containers

    s = runtime.settings
    rows, data = [], []
    for alias in choose_hosts(s, cli_hosts):
        with runtime.connect(alias) as host:
            target = Target.of(s, alias, host.address)
            facts = HostFacts.parse(host.run(fs.host_facts(target.deploy_path)).text)
            containers = stack_containers(host, target.project)
            for c in containers:
                entry = {"host": alias, "release": facts.current, "service": c.service, "container": c.name,
                         "state": c.state, "health": c.health, "uptime": _age(c.started) if c.state == "running" else "-",
                         "restarts": c.restart_count, "image": c.image_ref}
                data.append(entry)
                rows.append([alias, facts.current or "-", c.service, c.state, c.health or "-", entry["uptime"],
                             c.restart_count, c.image_ref.rsplit("/", 1)[-1]])
    if as_json:
        runtime.console.json({"services": data})
    else:
        runtime.console.table(["host", "release", "service", "state", "health", "uptime", "restarts", "image"], rows)
    return EXIT_OK


def _service_containers(runtime: Runtime, host, service: str) -> list:
    from deploy.facts.parse import stack_containers
    from deploy.core.settings import ALL_SERVICES

    if service not in ALL_SERVICES:
        raise UsageError(f"unknown service {service!r}", f"one of {', '.join(ALL_SERVICES)}")
    target = Target.of(runtime.settings, host.alias, host.address)
    found = [c for c in stack_containers(host, target.project) if c.service == service and c.state == "running"]
    if not found:
        raise HealthdeployError(f"{host.alias}: no running {service} container", "see `fab status`")
    return found


def logs(runtime: Runtime, cli_hosts: list[str], service: str, tail: int = 100, follow: bool = False) -> int:
    from deploy.commands import cmd

    for alias in choose_hosts(runtime.settings, cli_hosts):
        with runtime.connect(alias) as host:
            for container in _service_containers(runtime, host, service):
                argv = ["docker", "logs", "--tail", str(tail), "--timestamps"] + (["--follow"] if follow else [])
                host.run(cmd(*argv, container.name, description=f"logs of {container.name}", readonly=True),
                         on_line=lambda line, a=alias, n=container.name: runtime.console.result(f"[{a} {n}] {line}"))
    return EXIT_OK


def exec_in_service(runtime: Runtime, cli_hosts: list[str], service: str, command: str) -> int:
    """Run ``command`` (a shell string) in the service's first running container on each host."""
    from deploy.commands import cmd

    if not command.strip():
        raise UsageError("no command given", "fab -H HOST exec SERVICE -- COMMAND")
    worst = 0
    for alias in choose_hosts(runtime.settings, cli_hosts):
        with runtime.connect(alias) as host:
            container = _service_containers(runtime, host, service)[0]
            result = host.run(cmd("docker", "exec", container.name, "sh", "-c", command,
                                  description=f"exec in {container.name}"), check=False,
                              on_line=lambda line, a=alias: runtime.console.result(f"[{a}] {line}"))
            worst = worst or result.exit_status
    return worst


def run_backup(runtime: Runtime, host_alias: str | None, services: tuple[str, ...] | None,
               as_json: bool = False) -> int:
    from deploy.backup import run as bk
    from deploy.core.settings import PROJECT_ROOT

    s = runtime.settings
    alias = host_alias or s.primary
    if alias not in s.hosts:
        raise UsageError(f"host {alias} is not in HOSTS of env '{s.env_name}'", f"pick from {', '.join(s.hosts)}")
    with runtime.connect(alias) as host:
        path = bk.backup(s, host, runtime.console, PROJECT_ROOT / "backups", services)
        event = {"event": "backup", "set": path.name, "result": "ok"}
        HostDeploy(s, Target.of(s, alias, host.address), host, runtime.console).audit(event)
    manifest = _read_json(path / "manifest.json")
    if as_json:
        runtime.console.json({"set": str(path), "manifest": manifest})
    else:
        runtime.console.table(["file", "service", "bytes", "sha256", "seconds"],
                              [[a["file"], a["service"], a["bytes"], a["sha256"][:16], a["seconds"]]
                               for a in manifest["artifacts"]])
        runtime.console.result(f"backup set {path}")
    return EXIT_OK


def _read_json(path):
    import json as _json

    return _json.loads(path.read_text())


def backup_keygen(console, out: str) -> int:
    """Write a new age identity to ``out`` (0600, never overwritten) and print its public key."""
    import os as _os

    from deploy.backup.sealing import generate_identity

    secret, public = generate_identity()
    try:
        fd = _os.open(out, _os.O_WRONLY | _os.O_CREAT | _os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{out} already exists", "choose another path; an existing key is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}", "choose a writable path") from None
    with _os.fdopen(fd, "w") as f:
        f.write(f"# healthdeploy backup key, public key: {public}\n{secret}\n")
    console.result(f"private key written to {out} (keep it off the servers; set BACKUP_AGE_IDENTITY_FILE={out} "
                   "where you restore)")
    console.result(f"BACKUP_AGE_RECIPIENTS={public}")
    return EXIT_OK


def list_backups(runtime: Runtime, as_json: bool = False) -> int:
    from deploy.backup import run as bk
    from deploy.core.settings import PROJECT_ROOT

    sets = bk.list_sets(PROJECT_ROOT / "backups", runtime.settings.env_name)
    if as_json:
        runtime.console.json({"sets": sets})
    else:
        runtime.console.table(["set", "finished", "host", "release", "services", "bytes", "verified"],
                              [[x["set"], x["finished"], x["host"], x["release"], ",".join(x["services"]), x["bytes"],
                                x["verified"] or "-"] for x in sets])
    return EXIT_OK


def run_restore(runtime: Runtime, set_name: str, host_alias: str | None, services: tuple[str, ...] | None,
                yes: bool = False, safety_backup: bool = True, break_lock: bool = False) -> int:
    """Check the set, confirm, lock, take a safety backup, stop writers, restore, restart, check health, audit."""
    import time as _time

    from deploy.backup import run as bk
    from deploy.core.settings import PROJECT_ROOT

    s = runtime.settings
    root = PROJECT_ROOT / "backups"
    path = bk.resolve_set(root, s.env_name, set_name)
    manifest = bk.check_set(path)  # refuses a corrupt or truncated set before touching anything
    if manifest.get("env") != s.env_name:
        raise UsageError(f"{path.name} is a backup of env '{manifest.get('env')}', not '{s.env_name}'",
                         "restore a set of this environment")
    services = bk.restore_plan(s, manifest, services)  # what it lacks or a missing key: refused before any change
    alias = host_alias or s.primary
    if alias not in s.hosts:
        raise UsageError(f"host {alias} is not in HOSTS of env '{s.env_name}'", f"pick from {', '.join(s.hosts)}")
    if s.env_kind == "production" and not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"restoring {path.name} over production data of '{s.env_name}' needs confirmation",
                             "rerun with --yes")
        answer = input(f"Restore {path.name} over the live data of {s.env_name} on {alias}? Type the env name: ")
        if answer.strip() != s.env_name:
            raise UsageError("not confirmed", "nothing was changed")
    started = _time.monotonic()
    with runtime.connect(alias) as host:
        job = HostDeploy(s, Target.of(s, alias, host.address), host, runtime.console)
        held = job.take_lock(f"restore:{path.name}", break_lock)
        try:
            safety = None
            if safety_backup:
                runtime.console.phase(alias, "safety backup of the current data first")
                safety = bk.backup(s, host, runtime.console, root,
                                   tuple(x for x in (services or s.backup_services) if x in s.enabled_infra))
            restored = bk.restore(s, host, runtime.console, path, manifest, services, job=job)
            job.audit({"event": "restore", "set": path.name, "services": restored, "result": "ok",
                       "safety_backup": safety.name if safety else None,
                       "duration_s": round(_time.monotonic() - started, 1)})
        except HealthdeployError as exc:
            job.audit({"event": "restore", "set": path.name, "result": "failed", "reason": exc.message,
                       "duration_s": round(_time.monotonic() - started, 1)})
            raise
        finally:
            job.drop_lock(held)
    runtime.console.result(f"restored {', '.join(restored)} from {path.name} on {alias}"
                           + (f"; safety backup {safety.name}" if safety else ""))
    # The application must be healthy again with the restored data.
    return health(runtime, [alias])


def run_verify(runtime: Runtime, set_name: str, as_json: bool = False) -> int:
    from deploy.backup import run as bk
    from deploy.core.settings import PROJECT_ROOT

    s = runtime.settings
    path = bk.resolve_set(PROJECT_ROOT / "backups", s.env_name, set_name)
    manifest = bk.check_set(path)
    with runtime.connect(s.primary) as host:
        report = bk.verify(s, host, runtime.console, path, manifest)
    if as_json:
        runtime.console.json(report)
    else:
        for check in report["checks"]:
            runtime.console.result(f"{check['service']}: {check['result']}"
                                   + (f" ({check['reason']})" if check.get("reason") else "")
                                   + "".join(f"\n  {m}" for m in check.get("mismatches", [])))
        runtime.console.result(f"{path.name}: {report['result']} (verify.json written)")
    return EXIT_OK if report["result"] == "ok" else 8


def release(runtime: Runtime, checklist_file: str | None = None) -> int:
    """The scripted release: checklist, backup (+ restore drill), deploy, health, checklist again.

    Stops at the first failed step; every run leaves one audit entry on the primary host.
    """
    import time as _time

    s = runtime.settings
    quiet = Runtime(s, Console(out=sys.stderr), runtime.connector)  # step tables go to stderr
    steps = [
        ("checklist", lambda: checklist(quiet, file=checklist_file)),
        ("backup", lambda: _backup_and_drill(quiet)),
        ("deploy", lambda: deploy(quiet, [])),
        ("health", lambda: health(quiet, [])),
        ("checklist-after", lambda: checklist(quiet, file=checklist_file)),
    ]
    done = []
    failed = None
    for name, step in steps:
        started = _time.monotonic()
        runtime.console.info(f"== release step: {name}")
        try:
            code = step() or 0
            error = "" if code == 0 else f"exit status {code}"
        except HealthdeployError as exc:
            code, error = exc.exit_code, exc.message.splitlines()[0]
        done.append({"step": name, "result": "ok" if code == 0 else "failed", "exit": code, "error": error,
                     "seconds": round(_time.monotonic() - started, 1)})
        if code:
            failed = name
            break
    with runtime.connect(s.primary) as host:
        HostDeploy(s, Target.of(s, s.primary, host.address), host, runtime.console).audit(
            {"event": "release", "result": "failed" if failed else "ok", "failed_step": failed, "steps": done})
    runtime.console.table(["step", "result", "exit", "seconds", "error"],
                          [[d["step"], d["result"], d["exit"], d["seconds"], d["error"]] for d in done]
                          + [[n, "skipped", "", "", ""] for n, _ in steps[len(done):]])
    return done[-1]["exit"] if failed else EXIT_OK


def _backup_and_drill(runtime: Runtime) -> int:
    from deploy.backup import run as bk
    from deploy.core.settings import PROJECT_ROOT

    s = runtime.settings
    with runtime.connect(s.primary) as host:
        path = bk.backup(s, host, runtime.console, PROJECT_ROOT / "backups")
        report = bk.verify(s, host, runtime.console, path, bk.check_set(path))
    runtime.console.info(f"backup set {path.name}: restore drill {report['result']}")
    return EXIT_OK if report["result"] == "ok" else 8


def prune_backups(runtime: Runtime, policy, dry_run: bool = False, as_json: bool = False) -> int:
    """Delete the sets the retention policy does not keep (never the newest verified one)."""
    import datetime as _dt
    import shutil

    from deploy.backup import run as bk
    from deploy.plan import retention
    from deploy.core.settings import PROJECT_ROOT

    root = PROJECT_ROOT / "backups"
    env = runtime.settings.env_name
    sets = []
    for entry in bk.list_sets(root, env):
        finished = _dt.datetime.fromisoformat((entry["finished"] or "").replace("Z", "+00:00"))
        sets.append(retention.BackupSet(entry["set"], finished, entry["verified"] == "ok"))
    kept = retention.keep(sets, policy)
    rows = []
    for s in sorted(sets, key=lambda x: x.finished):
        action = f"keep ({kept[s.name]})" if s.name in kept else ("would delete" if dry_run else "deleted")
        if s.name not in kept and not dry_run:
            shutil.rmtree(root / env / s.name)
        rows.append({"set": s.name, "finished": s.finished.isoformat(), "verified": s.verified, "action": action})
    if as_json:
        runtime.console.json({"sets": rows})
    else:
        runtime.console.table(["set", "finished", "verified", "action"],
                              [[r["set"], r["finished"], "yes" if r["verified"] else "no", r["action"]] for r in rows])
    return EXIT_OK
