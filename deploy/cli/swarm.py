"""TARGET=swarm: the same tasks against one Docker Swarm stack. HOSTS are its manager nodes; the first one
listed runs the deploy (every one listed is locked); edge and data nodes are reached over SSH by their Swarm
hostname (an alias in SSH_CONFIG).

resolve -> observe (the manager and each edge node, read-only) -> plan (plan/swarm.py) -> lock -> observe
again -> plan -> apply (execute/swarm.py) -> render. A dry run is the plan, printed.
"""

from __future__ import annotations

import json
import sys
import time

from deploy.cli import Runtime
from deploy.core.errors import EXIT_OK, ExitCode, HealthdeployError, UsageError
from deploy.core.services import ALL_SERVICES, APP_PORTS, APP_SERVICES, GATEWAY, GATEWAY_PORT_OF, INFRA_PORTS
from deploy.execute.executor import shielded
from deploy.execute.fleet import HostOutcome, HostResult
from deploy.execute.readonly import ReadOnlyHost
from deploy.execute.session import Session
from deploy.execute.swarm import NodeLink, StackRolledBack, SwarmApply, node_facts, stack_file_names, write_state
from deploy.facts import swarm as sf
from deploy.plan.steps import StepKind
from deploy.plan.swarm import (SwarmObserved, SwarmPreflightError, plan_swarm, swarm_desired_for,
                               swarm_preflight_problems)
from deploy.stack import payload as pl
from deploy.stack import swarm as sw

# A restore's closing health check waits this long for the gateways to list the writers' new tasks (each
# gateway's sync resolves the tasks every 0.5 s; a deploy waits for the same in its verify step).
RESTORE_SETTLE_SECONDS = 30.0
SETTLE_INTERVAL = 1.0

# -- who is who ---------------------------------------------------------------------------------------------
def managers(runtime: Runtime, cli_hosts: list[str]) -> list[str]:
    s = runtime.settings
    hosts = cli_hosts or list(s.hosts)
    unknown = [h for h in hosts if h not in s.hosts]
    if unknown:
        raise UsageError(f"host(s) {', '.join(unknown)} are not in HOSTS of env '{s.env_name}' (the Swarm managers)",
                         f"add them to {s.source} or pick from {', '.join(s.hosts)}")
    return hosts


def connect_nodes(runtime: Runtime, readonly: bool = False) -> NodeLink:
    def connect(node: str):
        host = runtime.connect(node)
        return ReadOnlyHost(host) if readonly else host
    return NodeLink(connect)


def manager_session(runtime: Runtime, host) -> Session:
    return Session(host, runtime.settings, sw.swarm_target(runtime.settings, host.alias, host.address), runtime.console)


def observe(runtime: Runtime, session: Session, desired, nodes: NodeLink) -> SwarmObserved:
    """The manager and every edge node, read at the same time (one round trip each)."""
    from concurrent.futures import ThreadPoolExecutor

    s = runtime.settings

    def one(node: str) -> sf.NodeFacts:
        try:
            return node_facts(s, nodes(node), node)
        except HealthdeployError as exc:
            return sf.NodeFacts(node, reachable=False, error=exc.message.splitlines()[0])
    edges = list(desired.edge_nodes)
    with ThreadPoolExecutor(max_workers=max(1, len(edges))) as pool:
        futures = [pool.submit(one, node) for node in edges]
        text = session.run(sf.manager_observe(session.t.deploy_path, s.stack_name, tuple(desired.data_images))).text
        facts = {node: f.result() for node, f in zip(edges, futures)}
    return SwarmObserved(sf.parse_manager(text, s.stack_name), facts)


# -- deploy -------------------------------------------------------------------------------------------------
def deploy(runtime: Runtime, cli_hosts: list[str], dry_run: bool = False, break_lock: bool = False,
           as_json: bool = False) -> int:
    from deploy.cli.deploy import resolve_source

    s = runtime.settings
    hosts = managers(runtime, cli_hosts)
    outcome = HostOutcome(hosts[0], role="manager")
    started = time.monotonic()
    source, commit = resolve_source(runtime, hosts[:1])
    release = pl.new_release_id(pl.manifest_of(source))
    runtime.console.info(f"deploy {s.env_name} release {release} to Swarm stack {s.stack_name} via {hosts[0]}"
                         + (" (dry run: nothing will change)" if dry_run else ""))
    nodes = connect_nodes(runtime, readonly=dry_run)
    others: list = []
    apply = None
    try:
        with runtime.connect(hosts[0]) as host:
            session = manager_session(runtime, host)
            desired, payload = swarm_desired_for(s, session.t, source, release, commit)
            ro = manager_session(runtime, ReadOnlyHost(host))
            observed = observe(runtime, ro, desired, nodes)
            problems = swarm_preflight_problems(desired, observed)
            plan = plan_swarm(desired, observed)
            outcome.previous = plan.previous
            if dry_run:
                print_plan(runtime, plan, problems)
                outcome.result = HostResult.PLANNED.value if plan.action != "unchanged" else HostResult.UNCHANGED.value
                outcome.release, outcome.services = plan.release, list(plan.changes)
                outcome.steps = [st.to_json() for st in plan.steps]
                if problems:
                    outcome.result, outcome.message = HostResult.REFUSED.value, "; ".join(problems)
                summary(runtime, outcome, {}, as_json, plan)
                return EXIT_OK
            if problems:
                outcome.result = HostResult.REFUSED.value
                raise SwarmPreflightError("; ".join(problems), "fix the swarm, nothing was changed")
            if plan.action == "unchanged":
                session.say(f"nothing to do: release {plan.release} runs with the same definitions")
                outcome.result, outcome.release = HostResult.UNCHANGED.value, plan.release
                summary(runtime, outcome, {}, as_json, plan)
                return EXIT_OK
            held = session.acquire("deploy", release, break_lock)
            try:
                for alias in hosts[1:]:  # every manager listed is locked: no second deploy through another one
                    other = manager_session(runtime, runtime.connect(alias))
                    others.append((other, other.acquire("deploy", release, break_lock)))
                observed = observe(runtime, session, desired, nodes)  # again, under the lock
                problems = swarm_preflight_problems(desired, observed)
                if problems:
                    outcome.result = HostResult.REFUSED.value
                    raise SwarmPreflightError("; ".join(problems), "fix the swarm, nothing was changed")
                plan = plan_swarm(desired, observed)
                session.say(f"preflight ok: docker {observed.manager.host.docker}, swarm manager, "
                            f"{len(observed.manager.nodes)} node(s), live release {plan.previous or '(none)'}")
                session.say(f"plan: {plan.action} ({len(plan.steps)} step(s))")
                session.audit({"event": "lock", "operation": "deploy", "release": plan.release})
                apply = SwarmApply(session, plan, desired, payload, observed, nodes)
                try:
                    apply.run(plan.steps)
                    apply.commit()
                except BaseException as exc:
                    with shielded():
                        apply.abort()
                    raise _failure(session, outcome, plan, apply, exc) from None
                outcome.result = (HostResult.DEPLOYED if plan.action == "deploy" else HostResult.CONVERGED).value
                outcome.release = plan.release
                outcome.services = list(plan.changes)
                outcome.migrated = apply.report.migrated
                outcome.uploaded_bytes, outcome.uploaded_files = apply.report.uploaded_bytes, apply.report.uploaded_files
                outcome.steps = [{"step": k, "outcome": v} for k, v in apply.report.applied.done]
                outcome.seconds = round(time.monotonic() - started, 1)
                session.audit({"event": "deploy", "release": plan.release, "previous": plan.previous,
                               "result": outcome.result, "services": outcome.services, "migrated": outcome.migrated,
                               "target": "swarm", "duration_s": outcome.seconds})
            finally:
                with shielded():
                    for other, other_held in others:
                        other.release(other_held, "deploy", release)
                        other.host.close()
                    session.release(held, "deploy", release)
        summary(runtime, outcome, apply.report.services if apply else {}, as_json, plan)
        return EXIT_OK
    except HealthdeployError as exc:
        if outcome.result == HostResult.PENDING.value:
            outcome.fail(exc)
        outcome.seconds = round(time.monotonic() - started, 1)
        summary(runtime, outcome, apply.report.services if apply else {}, as_json, None)
        raise
    finally:
        nodes.close()


def _failure(session: Session, outcome: HostOutcome, plan, apply: SwarmApply, exc: BaseException) -> BaseException:
    outcome.undo = [list(u) for u in apply.report.undo]
    error: BaseException = exc
    if isinstance(exc, KeyboardInterrupt):
        outcome.result, outcome.message = HostResult.INTERRUPTED.value, "interrupted: this deploy's changes were undone"
    elif isinstance(exc, StackRolledBack):
        outcome.result = HostResult.ROLLED_BACK.value
        outcome.message = f"{exc.service}: {exc.reason}"
        error = StackRolledBack(
            f"{session.alias}: {exc.service} failed: {exc.reason}; the stack was rolled back, release "
            f"{plan.previous or '(none)'} keeps serving"
            + (f"\n--- last log lines of {exc.service} ---\n{exc.logs}" if exc.logs else ""), exc.service, exc.reason)
    elif isinstance(exc, HealthdeployError):
        outcome.result = HostResult.FAILED.value
        outcome.message = exc.message.splitlines()[0]
    else:
        outcome.result, outcome.message = HostResult.FAILED.value, f"{type(exc).__name__}: {exc}"
    try:
        session.audit({"event": "deploy", "release": plan.release, "previous": plan.previous, "result": outcome.result,
                       "reason": outcome.message, "undo": outcome.undo, "target": "swarm"})
    except HealthdeployError:
        pass
    return error


def print_plan(runtime: Runtime, plan, problems: list[str]) -> None:
    say = lambda line: runtime.console.phase(plan.host, line)  # noqa: E731
    say(f"plan: {plan.action}" + (f" release {plan.release}" if plan.action == "deploy" else "")
        + f" of stack {plan.stack} (live: {plan.previous or 'none'}; lock: {plan.lock})")
    for path, how in plan.files:
        say(f"would send {path} ({how})")
    build = plan.step(StepKind.BUILD)
    if build:
        say(f"would rebuild: {', '.join(build.items)}")
    for service, why in plan.changes.items():
        say(f"would {'create' if why == 'created' else 'update'} {service} ({why})")
    for step in plan.steps:
        if step.kind is not StepKind.SEND_FILES:
            say(f"would {step.describe()}")
    for note in plan.notes:
        say(f"note: {note}")
    if not plan.steps:
        say("nothing to do: every service runs its definition, every node has its labels and gateway files")
    for problem in problems:
        say(f"preflight would refuse: {problem}")


def summary(runtime: Runtime, outcome: HostOutcome, services: dict, as_json: bool, plan) -> None:
    rows = [vars(r) for r in services.values()]
    if as_json:
        runtime.console.json({"hosts": [outcome.__dict__], "target": "swarm", "stack": runtime.settings.stack_name,
                              "services": rows, "changes": dict(plan.changes) if plan else {}})
        return
    runtime.console.table(["manager", "result", "release", "previous", "services", "migrated", "seconds", "message"],
                          [[outcome.host, outcome.result, outcome.release, outcome.previous,
                            ",".join(outcome.services) or "-", "yes" if outcome.migrated else "no", outcome.seconds,
                            outcome.message]])
    if rows:
        runtime.console.table(["service", "action", "tasks", "seconds", "message"],
                              [[r["service"], r["action"], r["tasks"], r["seconds"], r["message"]] for r in rows])


# -- rollback -----------------------------------------------------------------------------------------------
def rollback(runtime: Runtime, cli_hosts: list[str], to: str | None, break_lock: bool = False,
             as_json: bool = False, with_secrets: bool = False, dry_run: bool = False) -> int:
    """The previous (or a named) release's stack file deployed again: no build; the current secrets unless
    --with-secrets (then those that release ran with, which prune keeps for every kept release)."""
    from deploy.commands import files as fs
    from deploy.facts.files import read_file

    s = runtime.settings
    hosts = managers(runtime, cli_hosts)
    outcome = HostOutcome(hosts[0], role="manager")
    started = time.monotonic()
    with runtime.connect(hosts[0]) as host:
        session = manager_session(runtime, host)
        m = sf.parse_manager(session.run(sf.manager_observe(session.t.deploy_path, s.stack_name)).text, s.stack_name)
        history = [e.get("release") for e in (m.state.get("history") or []) if isinstance(e, dict)]
        current = m.current
        if to:
            target = to
        else:
            earlier = [r for r in reversed(history) if r and r != current and r in m.host.releases]
            target = earlier[0] if earlier else next((r for r in reversed(m.host.releases) if r < current), "")
        if not target or target not in m.host.releases:
            raise UsageError(f"no release {target or 'before ' + (current or 'none')} on {hosts[0]}",
                             f"kept: {', '.join(m.host.releases) or 'none'} (`fab releases`)")
        if target == current:
            raise UsageError(f"{target} is already live", "name another release with --to")
        text = session.run(read_file(f"{session.t.release_dir(target)}/{sw.STACK_FILE}")).text
        if not text.strip():
            raise UsageError(f"release {target} has no stack file", "it was not deployed to Swarm")
        live_text = session.run(read_file(f"{session.t.release_dir(current)}/{sw.STACK_FILE}")).text if current else ""
        if current and not live_text.strip():  # a Compose deploy's release is live under this path, not this stack's
            raise SwarmPreflightError(f"{hosts[0]}: the live release {current} under {session.t.deploy_path} has no stack "
                                 "file: it is a TARGET=compose release", "give this environment a DEPLOY_PATH of its "
                                 "own; nothing was changed")
        new_text = text if with_secrets or not live_text else keep_live_secrets(text, live_text)
        outcome.previous, outcome.release = current, target
        runtime.console.info(f"rollback of stack {s.stack_name} from {current} to {target}"
                             + (" with that release's secrets" if with_secrets else " with the current secrets")
                             + (" (dry run)" if dry_run else ""))
        changed = _definitions_changing(new_text, m)
        if dry_run:
            for service, why in changed.items():
                session.say(f"would update {service} ({why})")
            session.say(f"would switch current to {target}")
            outcome.result, outcome.services = HostResult.PLANNED.value, list(changed)
            summary(runtime, outcome, {}, as_json, None)
            return EXIT_OK
        with session.locked("rollback", target, break_lock):
            path = f"{session.t.release_dir(target)}/{sw.STACK_FILE}"
            session.run(fs.write_file(f"{path}.rollback", new_text.encode()))
            from deploy.commands import swarm as sc

            nodes = connect_nodes(runtime)
            try:
                plan = _RollbackPlan(hosts[0], s.stack_name, target, current, changed)
                apply = SwarmApply(session, plan, _rollback_desired(s, new_text, session.alias), None,
                                   SwarmObserved(m), nodes)
                apply.started_at = apply._manager_now()
                from deploy.execute.swarm import docker_config_dir

                config = docker_config_dir(s, session.t)
                session.undo.push("the stack as before the rollback",
                                  sc.stack_back(s.stack_name, f"{session.t.release_dir(current)}/{sw.STACK_FILE}",
                                                config, (), tuple(changed)), 1)
                try:
                    if config:
                        session.run(sc.registry_login(s.registry, s.registry_user,
                                                      s.registry_password.reveal().encode(), config))
                    session.run(sc.stack_deploy(s.stack_name, f"{path}.rollback", config))
                    apply.wait_converged(list(changed), definitions=_labels_of(new_text))
                    apply.rebalance([x for x in changed if x in APP_SERVICES])
                    apply.do_verify(_step_verify(s))
                    session.run(fs.switch_symlink(session.t.current, f"releases/{target}"))
                    session.undo.discard()
                    if config:
                        session.run(sc.registry_logout(s.registry, config), check=False)
                except BaseException as exc:
                    with shielded():
                        session.undo.run(session.warn)
                    reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                    session.audit({"event": "rollback", "release": target, "previous": current, "result": "failed",
                                   "reason": reason, "target": "swarm"})
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    raise StackRolledBack(f"{hosts[0]}: rollback to {target} failed: {reason}; the stack runs "
                                          f"{current} again") from None
            finally:
                nodes.close()
            write_state(session, m, target, "rollback")
            outcome.result, outcome.services = HostResult.ROLLED_BACK_TO.value, list(changed)
            outcome.seconds = round(time.monotonic() - started, 1)
            session.audit({"event": "rollback", "release": target, "previous": current, "result": "ok",
                           "services": outcome.services, "with_secrets": with_secrets, "target": "swarm"})
            session.say(f"release {target} is live again")
    summary(runtime, outcome, apply.report.services, as_json, None)
    return EXIT_OK


class _RollbackPlan:
    def __init__(self, host, stack, release, previous, changes):
        self.host, self.stack, self.release, self.previous, self.changes = host, stack, release, previous, changes


def _rollback_desired(settings, text: str, manager: str):
    from deploy.plan.swarm import SwarmDesired

    return SwarmDesired(env=settings.env_name, stack=settings.stack_name, manager=manager, release="", files={},
                        services=sw.stack_services(settings), definitions=_labels_of(text), image_inputs={}, secrets={},
                        configs=(), node_roles=settings.swarm_roles(), gateway_files={})


def _step_verify(settings):
    from deploy.plan.steps import Step

    edges = tuple(n for n, r in settings.swarm_roles().items() if "edge" in r)
    return Step(StepKind.VERIFY, settings.stack_name, "", edges)


def _labels_of(text: str) -> dict[str, str]:
    import yaml

    data = yaml.safe_load(text) or {}
    out = {}
    for name, spec in (data.get("services") or {}).items():
        out[name] = ((spec.get("labels") or {}).get("healthdeploy.definition", ""))
    return out


def _definitions_changing(text: str, m: sf.ManagerFacts) -> dict[str, str]:
    changes = {}
    for service, digest in _labels_of(text).items():
        live = m.service(service)
        if live is None:
            changes[service] = "created"
        elif live.definition != digest:
            changes[service] = "back to the release's definition"
    return changes


def keep_live_secrets(text: str, live_text: str) -> str:
    """The target release's stack file with the secrets of the live one (a key rotated after a leak stays
    rotated): only the external names of its top-level secrets change."""
    import yaml

    data = yaml.safe_load(text)
    live = stack_file_names(live_text)["secrets"]
    for key, spec in (data.get("secrets") or {}).items():
        if key in live and live[key]:
            spec["name"] = live[key]
    return "# Rolled back by healthdeploy with the secrets live at the time.\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False)


# -- health and status --------------------------------------------------------------------------------------
def stack_health(runtime: Runtime, cli_hosts: list[str], timeout: float = 60) -> dict:
    """Every node, service and task of the stack, with checks (pure verdicts over facts read now)."""
    s = runtime.settings
    hosts = managers(runtime, cli_hosts)
    roles = s.swarm_roles()
    checks: list[dict] = []

    def check(name: str, status: str, detail: str, service: str = "", where: str = "") -> None:
        checks.append({"host": where or hosts[0], "name": name, "status": status, "detail": detail, "service": service})

    with runtime.connect(hosts[0]) as host:
        session = manager_session(runtime, host)
        m = sf.parse_manager(session.run(sf.manager_observe(session.t.deploy_path, s.stack_name)).text, s.stack_name)
        if not m.swarm.manager:
            check("swarm", "fail", f"{hosts[0]} is not a Swarm manager ({m.swarm.state or 'no swarm'})")
        nodes = []
        for node in m.nodes:
            wanted = sorted(roles.get(node.hostname, ()))
            have = sorted(k.split(".", 1)[1] for k, v in node.labels.items() if k.startswith("healthdeploy.") and v == "true")
            nodes.append({"node": node.hostname, "id": node.id, "role": node.role, "state": node.state,
                          "availability": node.availability, "address": node.address, "leader": node.leader,
                          "labels": have, "roles": wanted})
            if node.hostname in roles:
                status = "pass" if node.ready else ("fail" if ({"data", "edge"} & set(wanted)) else "warn")
                check(f"node.{node.hostname}", status, f"{node.state}/{node.availability}, roles {'+'.join(wanted)}",
                      where=node.hostname)
                if have != wanted:
                    check(f"node.{node.hostname}.labels", "fail", f"labels {'+'.join(have) or 'none'}, SWARM_NODES says "
                          f"{'+'.join(wanted)}", where=node.hostname)
        for name in roles:
            if m.node(name) is None:
                check(f"node.{name}", "fail", "not a node of this swarm", where=name)
        services, tasks = [], []
        for service in sw.stack_services(s):
            live = m.service(service)
            if live is None:
                check(f"{service}.service", "fail", "no such service in the stack", service)
                continue
            mine = m.tasks_of(service)
            running = [t for t in mine if t.running]
            expected = live.replicas if live.mode == "replicated" else len(
                [n for n in m.nodes if n.ready and n.labels.get("healthdeploy.edge") == "true"])
            definitions = sorted({t.definition for t in running})
            services.append({"service": service, "name": live.name, "mode": live.mode, "replicas": expected,
                             "running": len(running), "image": live.image, "release": live.release,
                             "definition": live.definition, "update": live.update.state or "-",
                             "update_message": live.update.message})
            for t in mine:
                if t.desired == "running" or t.state in ("failed", "rejected"):
                    node = m.node_by_id(t.node_id)
                    tasks.append({"service": service, "task": t.id, "slot": t.slot, "node": node.hostname if node else "",
                                  "desired": t.desired, "state": t.state, "error": t.error, "addresses": list(t.addresses),
                                  "since": t.timestamp, "definition": t.definition})
            status = "pass"
            detail = f"{len(running)}/{expected} task(s) running ({live.image.rsplit('/', 1)[-1][:60]})"
            if len(running) < expected:
                status = "fail" if not running else "warn"
            if live.update.state in ("paused", "rollback_paused", "rollback_started", "updating"):
                status = "warn" if status == "pass" else status
                detail += f"; update {live.update.state}"
            if len(definitions) > 1 or (definitions and definitions[0] != live.definition and live.definition):
                status = "warn" if status == "pass" else status
                detail += "; tasks of several definitions run"
            check(f"{service}.service", status, detail, service)
        release = m.current
        # Each edge node: its gateway, its upstream files against the running tasks, answers through each port.
        edges = [n for n, r in roles.items() if "edge" in r]
        link = connect_nodes(runtime, readonly=True)
        try:
            for node in edges:
                try:
                    facts = node_facts(s, link(node), node)
                except HealthdeployError as exc:
                    check(f"gateway.{node}", "fail", f"not reachable over SSH: {exc.message.splitlines()[0]}", GATEWAY, node)
                    continue
                gateway = facts.container_of(f"{s.stack_name}_{GATEWAY}")
                if gateway is None:
                    check(f"gateway.{node}", "fail", "no gateway container runs", GATEWAY, node)
                    continue
                check(f"gateway.{node}", "pass", f"{gateway.name} runs", GATEWAY, node)
                for service in APP_SERVICES:
                    live = m.service(service)
                    expected = sorted(f"{a}:{APP_PORTS[service]}" for t in m.tasks_of(service) if t.running
                                      for a in t.addresses)
                    listed = sorted(facts.upstreams.get(service, ()))
                    check(f"{service}.upstream.{node}", "pass" if listed == expected and listed else "fail",
                          f"lists {', '.join(listed) or 'nothing'}" + ("" if listed == expected else
                                                                      f"; running: {', '.join(expected) or 'none'}"),
                          service, node)
                targets = [("http", f"{svc}.http.gateway.{node}", f"http://127.0.0.1:{GATEWAY_PORT_OF[svc]}/health")
                           for svc in APP_SERVICES]
                for t in m.tasks:
                    service = next((x.service for x in m.services if x.id == t.service_id), "")
                    if service in APP_SERVICES and t.running:
                        for a in t.addresses:
                            targets.append(("http", f"{service}.http.direct.{t.slot}.{node}",
                                            f"http://{a}:{APP_PORTS[service]}/health"))
                for service in s.enabled_infra:
                    targets.append(("tcp", f"{service}.tcp.{node}", f"{service}:{INFRA_PORTS[service][0]}"))
                from deploy.commands import probe
                from deploy.plan import health as hl

                output = link(node).run(probe.probes_in(gateway.name, targets), check=False).text
                for c in hl.probe_checks(node, targets, output):
                    check(c.name, c.status, c.detail, c.service, node)
        finally:
            link.close()
    healthy = all(c["status"] != "fail" for c in checks)
    return {"schema": 1, "env": s.env_name, "target": "swarm", "stack": s.stack_name, "healthy": healthy,
            "release": release, "manager": hosts[0], "nodes": nodes, "services": services, "tasks": tasks,
            "checks": checks,
            "hosts": [{"host": hosts[0], "role": "manager", "healthy": healthy, "release": release, "error": "",
                       "checks": checks}]}


def health(runtime: Runtime, cli_hosts: list[str], as_json: bool = False, timeout: float = 60,
           settle: float = 0) -> int:
    """The stack's checks, once; with ``settle``, read again every second until healthy or ``settle`` seconds
    have passed (after a restore's scale-back the tasks run before every gateway's sync has listed them)."""
    from deploy.execute.fleet import run_with_deadline

    deadline = time.monotonic() + settle
    while True:
        report = run_with_deadline(lambda: stack_health(runtime, cli_hosts, timeout), timeout * 2)
        if report["healthy"] or time.monotonic() >= deadline:
            break
        time.sleep(SETTLE_INTERVAL)
    if as_json:
        runtime.console.json(report)
    else:
        runtime.console.table(["where", "check", "status", "detail"],
                              [[c["host"], c["name"], c["status"].upper(), c["detail"]] for c in report["checks"]])
        runtime.console.result(f"{report['env']}: {'healthy' if report['healthy'] else 'UNHEALTHY'} "
                               f"(stack {report['stack']}, release {report['release'] or '-'})")
    return EXIT_OK if report["healthy"] else ExitCode.UNHEALTHY


def status(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    s = runtime.settings
    hosts = managers(runtime, cli_hosts)
    with runtime.connect(hosts[0]) as host:
        session = manager_session(runtime, host)
        m = sf.parse_manager(session.run(sf.manager_observe(session.t.deploy_path, s.stack_name)).text, s.stack_name)
    rows = []
    for service in sw.stack_services(s):
        live = m.service(service)
        for t in (m.tasks_of(service) if live else []):
            if t.desired != "running":
                continue
            node = m.node_by_id(t.node_id)
            rows.append({"service": service, "task": f"{live.name}.{t.slot or (node.id if node else '')}",
                         "node": node.hostname if node else "", "state": t.state, "since": t.timestamp,
                         "release": live.release or m.current, "image": t.image.rsplit("/", 1)[-1],
                         "addresses": list(t.addresses), "update": live.update.state or "-"})
        if live is None:
            rows.append({"service": service, "task": "-", "node": "-", "state": "missing", "since": "",
                         "release": "", "image": "", "addresses": [], "update": "-"})
    if as_json:
        runtime.console.json({"stack": s.stack_name, "release": m.current, "services": rows,
                              "nodes": [vars(n) for n in m.nodes]})
    else:
        runtime.console.table(["service", "task", "node", "state", "release", "update", "image"],
                              [[r["service"], r["task"], r["node"], r["state"], r["release"], r["update"], r["image"][:40]]
                               for r in rows])
    return EXIT_OK


def logs(runtime: Runtime, cli_hosts: list[str], service: str, tail: int = 100, follow: bool = False) -> int:
    from deploy.commands import swarm as sc

    s = runtime.settings
    if service not in ALL_SERVICES or service not in sw.stack_services(s):
        raise UsageError(f"unknown service {service!r}", f"one of {', '.join(sw.stack_services(s))}")
    hosts = managers(runtime, cli_hosts)
    with runtime.connect(hosts[0]) as host:
        host.run(sc.service_logs(f"{s.stack_name}_{service}", tail=tail, follow=follow, timestamps=True),
                 timeout=10 ** 9 if follow else None,
                 on_line=lambda line: runtime.console.result(f"[{service}] {line}"))
    return EXIT_OK


def running_task_container(runtime: Runtime, m: sf.ManagerFacts, service: str) -> tuple[str, str]:
    """(node hostname, container id) of a running task of ``service``."""
    for t in m.tasks_of(service):
        if t.running and t.container_id:
            node = m.node_by_id(t.node_id)
            if node is not None:
                return node.hostname, t.container_id
    raise HealthdeployError(f"no running task of {service}", "see `fab status`")


def exec_in_service(runtime: Runtime, cli_hosts: list[str], service: str, words: list[str]) -> int:
    from deploy.commands import swarm as sc

    s = runtime.settings
    if not words:
        raise UsageError("no command given", "fab --env ENV exec SERVICE -- COMMAND [ARGS...]")
    if service not in sw.stack_services(s):
        raise UsageError(f"unknown service {service!r}", f"one of {', '.join(sw.stack_services(s))}")
    hosts = managers(runtime, cli_hosts)
    with runtime.connect(hosts[0]) as host:
        session = manager_session(runtime, host)
        m = sf.parse_manager(session.run(sf.manager_observe(session.t.deploy_path, s.stack_name)).text, s.stack_name)
    node, container = running_task_container(runtime, m, service)
    with runtime.connect(node) as host:
        result = host.run(sc.exec_words(container, words), check=False,
                          on_line=lambda line: runtime.console.result(f"[{node}] {line}"))
    if result.exit_status:
        print(f"{node}: the command exited with status {result.exit_status}", file=sys.stderr)
        return min(255, ExitCode.REMOTE_BASE + result.exit_status)
    return EXIT_OK


def releases(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    from deploy.facts.host import HostFacts, host_facts

    s = runtime.settings
    rows = []
    for alias in managers(runtime, cli_hosts)[:1]:
        with runtime.connect(alias) as host:
            facts = HostFacts.parse(host.run(host_facts(sw.node_deploy_path(s, alias))).text)
        rows += [{"host": alias, "release": r, "live": r == facts.current} for r in facts.releases]
    if as_json:
        runtime.console.json({"releases": rows})
    else:
        runtime.console.table(["host", "release", "live"], [[r["host"], r["release"], "*" if r["live"] else ""] for r in rows])
    return EXIT_OK


# -- where the data is: backups, restores, drills -----------------------------------------------------------
class SwarmPlacement:
    """The data node's engine as backup/run.py and the restore see a host: the stack's task containers by
    service (read again at every use: a rescheduled task has another name), the live release (from the
    manager), and the application's writers scaled to 0 and back through the manager (a stopped task's
    container would only be replaced by Swarm)."""

    def __init__(self, runtime: Runtime, manager_host, data_host):
        self.runtime, self.manager, self.host = runtime, manager_host, data_host
        self.session = manager_session(runtime, manager_host)

    def _running(self) -> dict[str, str]:
        """service -> the name of its running task container on the data node."""
        stack = self.runtime.settings.stack_name
        names: dict[str, str] = {}
        for c in sf.parse_task_containers(self.host.run(sf.task_containers(stack)).text):
            if c.state == "running" and c.service.startswith(stack + "_"):
                names.setdefault(c.service[len(stack) + 1:], c.name)
        return names

    def running_container(self, service: str) -> str | None:
        return self._running().get(service)

    def container(self, service: str) -> str:
        return self.containers((service,))[service]

    def containers(self, services) -> dict[str, str]:
        running = self._running()
        missing = [x for x in services if x not in running]
        if missing:
            raise HealthdeployError(f"{self.host.alias}: no running task of {', '.join(missing)} on the data node",
                                    "`fab status` shows where the stack's tasks run")
        return {x: running[x] for x in services}

    def release(self) -> str:
        from deploy.facts.host import current_release

        return self.manager.run(current_release(self.session.t.deploy_path)).text.strip()

    def writer_replicas(self, writers: tuple[str, ...]) -> dict[str, int]:
        """service -> replica count of each writer that has tasks: what it is scaled back to."""
        s = self.runtime.settings
        _, services, _, _ = sf.parse_tasks_poll(self.manager.run(sf.services_and_tasks(s.stack_name, writers)).text,
                                                s.stack_name)
        return {x.service: x.replicas for x in services if x.service in writers and x.replicas}

    def scale_down(self, replicas: dict[str, int]) -> None:
        from deploy.commands import swarm as sc

        s = self.runtime.settings
        self.runtime.console.phase(self.host.alias, f"scaling the application's writers to 0 ({', '.join(replicas)})")
        self.manager.run(sc.scale_writers(s.stack_name, {x: 0 for x in replicas}, "scale the writers to 0"))
        self._wait(lambda counts: not any(counts.values()), replicas, "the writers stopped",
                   lambda task: task.state == "running")

    def scale_back(self, replicas: dict[str, int]) -> None:
        """Idempotent: the restore's undo and its end both run it."""
        from deploy.commands import swarm as sc

        s = self.runtime.settings
        self.manager.run(sc.scale_writers(s.stack_name, replicas, "scale the writers back"))
        # A task with a health check is "running" only once healthy: this is the writers' health.
        self._wait(lambda counts: all(counts.get(x, 0) >= n for x, n in replicas.items()), replicas,
                   "the writers running again", lambda task: task.running)
        self.runtime.console.phase(self.host.alias, "application writers running again (the gateways follow them)")

    def _wait(self, done, replicas: dict[str, int], what: str, counted) -> None:
        """Until ``done`` holds for service -> number of its tasks that are ``counted``."""
        from deploy.execute.wait import wait_for

        s = self.runtime.settings
        services = tuple(sorted(replicas))

        def check():
            _, found, tasks, _ = sf.parse_tasks_poll(self.manager.run(sf.services_and_tasks(s.stack_name, services)).text,
                                                     s.stack_name)
            ids = {x.id: x.service for x in found}
            counts = {x: 0 for x in services}
            for t in tasks:
                if counted(t) and t.service_id in ids:
                    counts[ids[t.service_id]] = counts.get(ids[t.service_id], 0) + 1
            return True if done(counts) else None
        wait_for(check, float(s.health_timeout) + 60, what, interval=1.0, hint="`fab status` shows the tasks")


def data_node(runtime: Runtime) -> str:
    return sw.data_node_of(runtime.settings)


def run_backup(runtime: Runtime, services, as_json: bool = False, kind: str = "backup") -> int:
    from deploy.backup import run as bk
    from deploy.cli.backup import BACKUP_ROOT

    s = runtime.settings
    node = data_node(runtime)
    with runtime.connect(s.hosts[0]) as manager, runtime.connect(node) as host:
        session = manager_session(runtime, manager)
        with session.locked("backup"):
            placement = SwarmPlacement(runtime, manager, host)
            path = bk.backup(s, host, runtime.console, BACKUP_ROOT, services, role="data", kind=kind,
                             placement=placement)
            session.audit({"event": "backup", "set": path.name, "result": "ok", "node": node, "target": "swarm"})
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        runtime.console.json({"set": str(path), "manifest": manifest})
    else:
        runtime.console.table(["host", "file", "service", "bytes", "sha256", "seconds"],
                              [[manifest["host"], a["file"], a["service"], a["bytes"], a["sha256"][:16], a["seconds"]]
                               for a in manifest["artifacts"]])
        runtime.console.result(f"backup set {path}")
    return EXIT_OK


def run_restore(runtime: Runtime, set_name: str, services, yes: bool = False, safety_backup: bool = True,
                break_lock: bool = False, other_host: bool = False, dry_run: bool = False, yes_really: bool = False,
                as_json: bool = False) -> int:
    """The Compose restore (backup/restore.py: beside the live data, all switched at once, undone on any
    failure) on the data node's task containers; the writers scaled to 0 and back through the manager. The
    manager's lock is held, as for a deploy, and the data node's (its guard's undo waits in it)."""
    import contextlib

    from deploy.backup import run as bk
    from deploy.backup.restore import SwarmRestore, recover_journals
    from deploy.cli.backup import BACKUP_ROOT, _check_env, _confirm, plan_for, run_and_report

    s = runtime.settings
    console = runtime.console
    path = bk.resolve_set(BACKUP_ROOT, s.env_name, set_name)
    signer = bk.check_origin(s, path, console)  # signature first, as for Compose
    manifest = bk.check_set(path)
    _check_env(s, path, manifest, "restore")
    services = bk.restore_services(s, manifest, services)
    node, manager = data_node(runtime), s.hosts[0]
    origin = manifest.get("host")
    if origin and origin != node and not other_host:
        raise UsageError(f"{path.name} was taken on {origin}, not on the data node {node}",
                         "restore it onto its own host, or pass --other-host to restore it here on purpose")
    if not safety_backup and s.env_kind == "production" and not yes_really and not dry_run:
        _confirm(s, f"Restore {path.name} on {s.env_name} WITHOUT a safety backup of the live data?",
                 f"--no-safety-backup on production '{s.env_name}' needs its own confirmation", "--yes-really")
    plan = plan_for(runtime, path, manifest, services, node, safety_backup, signer, app_hosts=[manager])
    read = bk.prove_readable(s, path, manifest, services)  # every artifact decrypted to its end before the host is touched
    if dry_run:
        if as_json:
            console.json({"plan": plan.record(), "content_bytes_read": read, "target": "swarm"})
        else:
            for line in plan.lines():
                console.result(line)
            console.result(f"dry run: every artifact read ({read} bytes of content); nothing was changed")
        return EXIT_OK
    if s.env_kind == "production" and not yes:
        _confirm(s, f"Restore {path.name} over the live data of {s.env_name} on {node}?",
                 f"restoring {path.name} over production data of '{s.env_name}' needs confirmation", "--yes")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        manager_host = stack.enter_context(runtime.connect(manager))
        session = manager_session(runtime, manager_host)
        stack.enter_context(session.locked("restore", path.name, break_lock))
        sessions = {manager: session}
        if node == manager:
            data = session  # one host, one guard: the stores' undo runs before the writers' scale-back
        else:
            host = stack.enter_context(runtime.connect(node))
            data = Session(host, s, sw.swarm_target(s, node, host.address), console)
            stack.enter_context(data.locked("restore", path.name, break_lock))
            sessions[node] = data
        host = data.host
        placement = SwarmPlacement(runtime, manager_host, host)
        bk.check_resources(s, host, manifest, services, drill=False)
        recovered = recover_journals(s, data, console, plan.stamp, container_of=placement.running_container)
        if data is not session:  # the manager's journal holds only the writers' scale-back (no object store)
            recovered += recover_journals(s, session, console, plan.stamp, container_of=lambda service: None)
        restore = SwarmRestore(
            s, plan, path, manifest, data, session, placement, console, BACKUP_ROOT,
            take_backup=lambda: bk.backup(s, host, console, BACKUP_ROOT, services, role="data", kind="safety",
                                          placement=placement),
            verify_set=lambda p: bk.verify(s, host, console, p, bk.check_set(p)))
        run_and_report(runtime, restore, sessions, path, services, signer, started, recovered, as_json,
                       extra={"target": "swarm"})
    # The application must be healthy again with the restored data, once the gateways follow the new tasks.
    return health(runtime, [], settle=RESTORE_SETTLE_SECONDS)


def run_verify(runtime: Runtime, set_name: str, as_json: bool = False) -> int:
    from deploy.backup import run as bk
    from deploy.cli.backup import BACKUP_ROOT

    s = runtime.settings
    path = bk.resolve_set(BACKUP_ROOT, s.env_name, set_name)
    manifest = bk.check_set(path)
    with runtime.connect(data_node(runtime)) as host:
        report = bk.verify(s, host, runtime.console, path, manifest)
    if as_json:
        runtime.console.json(report)
    else:
        for check in report["checks"]:
            runtime.console.result(f"{check['service']}: {check['result']}"
                                   + (f" ({check['reason']})" if check.get("reason") else "")
                                   + "".join(f"\n  {m}" for m in check.get("mismatches", [])))
        runtime.console.result(f"{path.name}: {report['result']} (verify.json written)")
    return EXIT_OK if report["result"] == "ok" else ExitCode.INTEGRITY


def backup_and_drill(runtime: Runtime) -> int:
    from deploy.backup import run as bk
    from deploy.cli.backup import BACKUP_ROOT

    run_backup(runtime, None)
    path = bk.resolve_set(BACKUP_ROOT, runtime.settings.env_name, "latest")
    return run_verify(runtime, path.name)


# -- the checklist's facts ----------------------------------------------------------------------------------
def gather_checklist_facts(runtime: Runtime, items, facts):
    """The facts the checklist's remote checks read: every node of SWARM_NODES and the manager (disk, Docker),
    the services' log drivers, the stack's health; the stack has one release (the manager's `current`)."""
    import dataclasses

    from deploy.facts.host import HostFacts, host_facts
    from deploy.facts.observe import split_sections
    from deploy.plan import checklist as cl

    s = runtime.settings
    if not any(item.kind in cl.REMOTE_KINDS for item in items):
        return facts
    manager = s.hosts[0]
    try:
        with runtime.connect(manager) as host:
            text = host.run(sf.manager_observe(sw.node_deploy_path(s, manager), s.stack_name)).text
        m = sf.parse_manager(text, s.stack_name)
        facts.hosts[manager] = m.host
        configs = {}
        for item in sf._json_list(split_sections(text).get("services", "")):
            spec = item.get("Spec") or {}
            driver = (spec.get("TaskTemplate") or {}).get("LogDriver") or {}
            configs[spec.get("Name", "")] = {"Type": driver.get("Name", "json-file"), "Config": driver.get("Options") or {}}
        facts.log_configs[manager] = configs
    except HealthdeployError as exc:
        facts.host_errors[manager] = exc.message.splitlines()[0]
        return facts
    for alias in s.swarm_roles():
        if alias == manager:
            continue
        try:
            with runtime.connect(alias) as host:
                node = HostFacts.parse(host.run(host_facts(sw.node_deploy_path(s, alias))).text)
            facts.hosts[alias] = dataclasses.replace(node, current=m.current)
        except HealthdeployError as exc:
            facts.host_errors[alias] = exc.message.splitlines()[0]
    if any(item.kind == "services_healthy" for item in items):
        try:
            facts.healthy[s.stack_name] = stack_health(runtime, [])["healthy"]
        except HealthdeployError as exc:
            facts.host_errors[s.stack_name] = exc.message.splitlines()[0]
    return facts
