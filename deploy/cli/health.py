"""`fab health`, `inv checklist`, `inv release`."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path

from deploy.cli import Runtime, choose_hosts
from deploy.commands import probe
from deploy.core.console import Console
from deploy.core.errors import EXIT_OK, ExitCode, HealthdeployError, UsageError
from deploy.core.settings import PROJECT_ROOT, env_dir
from deploy.execute.fleet import parallel_results, run_with_deadline
from deploy.execute.session import Session
from deploy.facts.containers import parse_containers, project_containers, stack_only
from deploy.facts.host import HostFacts, host_facts
from deploy.plan import checklist as cl
from deploy.plan import health as hl


def host_health(runtime: Runtime, alias: str) -> hl.HostHealth:
    s = runtime.settings
    result = hl.HostHealth(alias, role=s.role_of(alias).value)
    with runtime.connect(alias) as host:
        target = runtime.target(alias, host.address)
        session = Session(host, s, target, runtime.console)
        containers = session.containers()
        releases = sorted({c.release or c.image_ref.rsplit(":", 1)[-1] for c in containers
                           if c.service == "backend" and c.running})
        result.release = ",".join(releases)
        result.checks += hl.container_checks(alias, s, target, containers)
        gateway = next((c for c in containers if c.service == "gateway" and c.running), None)
        targets = hl.probe_targets(s, target, containers)
        if targets:
            output = host.run(probe.probes_in(gateway.name, targets), check=False).text if gateway else None
            result.checks += hl.probe_checks(alias, targets, output)
        listeners = host.run(probe.listening_sockets(), check=False)
        published = (host.run(probe.probes_on_host(hl.published_targets(target.gateway_bind)), check=False).text
                     if target.role.runs_app else "")
        if listeners.ok:
            result.checks += hl.port_checks(alias, s, target, hl.parse_listeners(listeners.text), published)
        else:
            result.checks.append(hl.Check(alias, "ports", "fail", "cannot list sockets (is iproute2's ss installed?)"))
    return result


def health(runtime: Runtime, cli_hosts: list[str], as_json: bool = False, timeout: float = 60) -> int:
    """Every check on every host, in parallel, each host bounded by ``timeout``; exit 0 only if all pass."""
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.health(runtime, cli_hosts, as_json=as_json, timeout=timeout)
    hosts = choose_hosts(s, cli_hosts)
    results = parallel_results(hosts, lambda alias: host_health(runtime, alias), timeout)
    ordered = []
    for alias in hosts:
        value = results.get(alias)
        if isinstance(value, hl.HostHealth):
            ordered.append(value)
        else:
            error = (value.message if isinstance(value, HealthdeployError)
                     else f"{type(value).__name__}: {value}" if value is not None else "no result")
            ordered.append(hl.HostHealth(alias, role=s.role_of(alias).value, error=error))
    if as_json:
        runtime.console.json(hl.to_json(ordered, s.env_name))
    else:
        rows = []
        for r in ordered:
            if r.error:
                rows.append([r.host, r.role, "host", "FAIL", r.error])
            rows += [[c.host, r.role, c.name, c.status.upper(), c.detail] for c in r.checks]
        runtime.console.table(["host", "role", "check", "status", "detail"], rows)
        verdict = "healthy" if all(r.healthy for r in ordered) else "UNHEALTHY"
        runtime.console.result(f"{s.env_name}: {verdict}")
    return EXIT_OK if all(r.healthy for r in ordered) else ExitCode.UNHEALTHY


def gather_checklist_facts(runtime: Runtime, items, now=None) -> cl.Facts:
    """Connect to each host once (only when a remote check is listed) and collect every fact."""
    s = runtime.settings
    facts = cl.Facts(settings=s, now=now or _dt.datetime.now(_dt.timezone.utc), backups_dir=PROJECT_ROOT / "backups")
    if not any(item.kind in cl.REMOTE_KINDS for item in items):
        return facts
    if s.swarm:
        from deploy.cli import swarm

        return swarm.gather_checklist_facts(runtime, items, facts)
    for alias in s.hosts:
        try:
            def collect(alias=alias):
                with runtime.connect(alias) as host:
                    target = runtime.target(alias, host.address)
                    hf = HostFacts.parse(host.run(host_facts(target.deploy_path)).text)
                    raw = host.run(project_containers(target.project)).text
                    containers = stack_only(parse_containers(raw, target.project))
                    logs = {item["Name"].lstrip("/"): (item.get("HostConfig") or {}).get("LogConfig") or {}
                            for item in json.loads(raw or "[]")}
                    return hf, containers, logs
            hf, containers, logs = run_with_deadline(collect, 60)
            facts.hosts[alias], facts.containers[alias], facts.log_configs[alias] = hf, containers, logs
            if any(item.kind == "services_healthy" for item in items):
                facts.healthy[alias] = run_with_deadline(lambda alias=alias: host_health(runtime, alias), 60).healthy
        except HealthdeployError as exc:
            facts.host_errors[alias] = exc.message
        except Exception as exc:  # a broken host is a failed check, not a crash
            facts.host_errors[alias] = f"{type(exc).__name__}: {exc}"
    return facts


def _write_junit(junit: str, env: str, outcomes: list[cl.Outcome]) -> None:
    try:
        Path(junit).write_bytes(cl.to_junit(env, outcomes))
    except OSError as exc:
        raise UsageError(f"cannot write --junit {junit}: {exc.strerror or exc}", "give a writable file path") from None


def refused_checklist(env: str, exc: HealthdeployError, as_json: bool, junit: str | None, console: Console) -> None:
    """A checklist that cannot run (bad settings, unreadable checklist file) still writes its reports: each
    problem is a failed check, so CI shows what is wrong instead of a missing file."""
    problems = getattr(exc, "problems", None)
    outcomes = ([cl.Outcome(f"settings: {p.key}", "settings", "fail", p.message, p.hint) for p in problems]
                if problems else [cl.Outcome("checklist", "refused", "fail", exc.message, exc.hint or "")])
    if junit:
        _write_junit(junit, env, outcomes)
    if as_json:
        console.json({**cl.to_json(env, outcomes), "error": exc.to_json()})
        exc.json_reported = True


def checklist(runtime: Runtime, as_json: bool = False, junit: str | None = None, file: str | None = None) -> int:
    env = runtime.settings.env_name
    path = Path(file) if file else cl.checklist_path(env_dir(), env)
    try:
        items = cl.load_items(path)
    except HealthdeployError as exc:
        refused_checklist(env, exc, as_json, junit, runtime.console)
        raise
    outcomes = cl.evaluate(gather_checklist_facts(runtime, items), items)
    if junit:
        _write_junit(junit, env, outcomes)
    if as_json:
        runtime.console.json(cl.to_json(env, outcomes))
    else:
        runtime.console.table(["check", "status", "reason", "hint"],
                              [[o.name, o.status.upper(), o.reason, o.hint if o.status != "pass" else ""] for o in outcomes])
        counts = cl.to_json(env, outcomes)["counts"]
        runtime.console.result(f"{env}: {counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed "
                               f"({path.name})")
    return EXIT_OK if all(o.status != "fail" for o in outcomes) else ExitCode.UNHEALTHY


def release(runtime: Runtime, checklist_file: str | None = None) -> int:
    """The scripted release: checklist, backup (+ restore drill), deploy, health, checklist again.

    Stops at the first failed step; every run leaves one audit entry on the primary host.
    """
    from deploy.cli.backup import backup_and_drill
    from deploy.cli.deploy import deploy

    s = runtime.settings
    quiet = Runtime(s, Console(out=sys.stderr), runtime.connector)  # step tables go to stderr
    steps = [
        ("checklist", lambda: checklist(quiet, file=checklist_file)),
        ("backup", lambda: backup_and_drill(quiet)),
        ("deploy", lambda: deploy(quiet, [])),
        ("health", lambda: health(quiet, [])),
        ("checklist-after", lambda: checklist(quiet, file=checklist_file)),
    ]
    done = []
    failed = None
    for name, step in steps:
        started = time.monotonic()
        runtime.console.info(f"== release step: {name}")
        try:
            code = int(step() or 0)
            error = "" if code == 0 else f"exit status {code}"
        except HealthdeployError as exc:
            code, error = int(exc.exit_code), exc.message.splitlines()[0]
        done.append({"step": name, "result": "ok" if code == 0 else "failed", "exit": code, "error": error,
                     "seconds": round(time.monotonic() - started, 1)})
        if code:
            failed = name
            break
    with runtime.connect(s.primary) as host:
        Session(host, s, runtime.target(s.primary, host.address), runtime.console).audit(
            {"event": "release", "result": "failed" if failed else "ok", "failed_step": failed, "steps": done})
    runtime.console.table(["step", "result", "exit", "seconds", "error"],
                          [[d["step"], d["result"], d["exit"], d["seconds"], d["error"]] for d in done]
                          + [[n, "skipped", "", "", ""] for n, _ in steps[len(done):]])
    return done[-1]["exit"] if failed else EXIT_OK
