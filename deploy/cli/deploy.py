"""`fab deploy` and `fab rollback`: resolve -> connect every host -> lock -> observe -> plan -> apply -> render.

A dry run is the same plan, printed: it observes with an executor that refuses anything but facts and never
reaches ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy.cli import Runtime, choose_hosts
from deploy.cli.render import print_plan, summary
from deploy.commands.git import git_resolve
from deploy.core.errors import EXIT_OK, HealthdeployError, RemoteCommandError
from deploy.core.services import Role
from deploy.execute.apply import DeployApply, RolledBack, apply_rollback
from deploy.execute.build import OffHostBuild
from deploy.execute.executor import Interrupted, shielded
from deploy.execute.fleet import FleetStopped, HostOutcome, HostResult, batches, in_parallel
from deploy.execute.local import LocalHost
from deploy.execute.readonly import ReadOnlyHost
from deploy.execute.roll import RollFailure
from deploy.execute.session import Session
from deploy.facts.lock import unheld_since
from deploy.facts.observe import Observed
from deploy.plan.deploy import DeployPlan, Desired, PreflightError, plan_deploy, preflight_problems
from deploy.plan.desired import Payload, desired_for
from deploy.plan.rollback import plan_rollback
from deploy.plan.steps import StepKind
from deploy.stack import payload as pl
from deploy.stack.render import app_services_on, image_prefix


@dataclass
class HostJob:
    """One host of a deploy: its session, what it should run, what runs, the plan, the apply."""

    alias: str
    outcome: HostOutcome
    session: Session | None = None
    desired: Desired | None = None
    payload: Payload | None = None
    observed: Observed | None = None
    plan: DeployPlan | None = None
    apply: DeployApply | None = None
    held: object = None
    steps_done: int = 0
    switched: bool = False
    extra: dict = field(default_factory=dict)

    def close(self) -> None:
        if self.session is not None:
            self.session.host.close()


def resolve_source(runtime: Runtime, hosts: list[str]) -> tuple[dict[str, bytes], str]:
    s = runtime.settings
    if s.app_source and pl.is_git(s.app_source):
        # Resolved once, on the primary host, so every host deploys the same commit (`git ls-remote` reads only).
        with runtime.connect(s.primary if s.primary in hosts else hosts[0]) as primary:
            try:
                out = primary.run(git_resolve(s.app_source, s.app_ref), timeout=300).text.split()
            except RemoteCommandError as exc:  # its text is redacted and names the URL without credentials
                raise HealthdeployError(f"{primary.alias}: {exc.stderr_tail.splitlines()[-1] if exc.stderr_tail else exc.message}",
                                        "check APP_SOURCE (URL and token) and APP_REF") from None
        if not out or len(out[0]) < 40:
            raise HealthdeployError(f"cannot resolve {s.app_ref} in {pl.display_url(s.app_source)}",
                                    "check APP_SOURCE and APP_REF")
        runtime.console.info(f"source: {pl.display_url(s.app_source)} {s.app_ref} = {out[0]}")
        return pl.git_source_files(s.app_source, out[0]), out[0]
    return (pl.collect_source(s.app_source, s.deploy_allow) if s.app_source else {}), ""


def _connect_all(runtime: Runtime, jobs: list[HostJob]) -> None:
    errors: list = []

    def connect(job: HostJob) -> None:
        host = runtime.connect(job.alias)
        job.session = Session(host, runtime.settings, runtime.target(job.alias, host.address), runtime.console)

    in_parallel(jobs, connect, errors)
    if errors:
        for job, exc in errors:
            if job is not None:
                job.outcome.fail(exc)
        raise errors[0][1]


def deploy(runtime: Runtime, cli_hosts: list[str], dry_run: bool = False, break_lock: bool = False,
           as_json: bool = False) -> int:
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.deploy(runtime, cli_hosts, dry_run=dry_run, break_lock=break_lock, as_json=as_json)
    hosts = choose_hosts(s, cli_hosts)
    jobs = [HostJob(a, HostOutcome(a, role=s.role_of(a).value)) for a in hosts]
    try:
        source, commit = resolve_source(runtime, hosts)
        release = pl.new_release_id(pl.manifest_of(source))
        runtime.console.info(f"deploy {s.env_name} release {release} to {', '.join(hosts)}"
                             + (" (dry run: nothing will change)" if dry_run else ""))
        # Every host is reached and checked before any is changed.
        _connect_all(runtime, jobs)
        for job in jobs:
            migrate_here = s.role_of(job.alias).runs_app and (s.topology == "cells" or job.alias == s.primary)
            job.desired, job.payload = desired_for(s, job.session.t, source, release, migrate_here, commit)
        if dry_run:
            return _dry_run(runtime, jobs, as_json)
        return _deploy(runtime, jobs, break_lock, as_json)
    except FleetStopped as stopped:
        summary(runtime.console, stopped.outcomes, as_json, error=stopped)
        raise
    except HealthdeployError as exc:
        for job in jobs:
            if job.outcome.result == HostResult.PENDING.value:
                job.outcome.result = HostResult.SKIPPED.value if job.outcome.message == "" else job.outcome.result
        summary(runtime.console, [j.outcome for j in jobs], as_json, error=exc)
        raise exc
    finally:
        for job in jobs:
            job.close()


def _observe_and_plan(job: HostJob, readonly: bool = False) -> None:
    session = job.session
    if readonly:
        session = Session(ReadOnlyHost(session.host), session.s, session.t, session.console)
    job.observed = session.observe()
    job.plan = plan_deploy(job.desired, job.observed)


def _first_failure(errors: list, count: int) -> tuple:
    """(index, exception) of the first failing host in ``HOSTS`` order; an interrupt (index None) comes last."""
    return min(errors, key=lambda e: count if e[0] is None else e[0])


def _observe_and_plan_all(jobs: list[HostJob], readonly: bool = False) -> None:
    """``_observe_and_plan`` on every host at once (each its own connection: the facts of 4 hosts took 4x one
    host's, serially); a failure is raised for the first failing host in ``HOSTS`` order, once all ended."""
    errors: list = []
    in_parallel(list(range(len(jobs))), lambda i: _observe_and_plan(jobs[i], readonly=readonly), errors)
    if errors:
        raise _first_failure(errors, len(jobs))[1]


def _dry_run(runtime: Runtime, jobs: list[HostJob], as_json: bool) -> int:
    _observe_and_plan_all(jobs, readonly=True)
    for job in jobs:
        problems = preflight_problems(job.observed, job.desired.min_free_mb, job.session.t.deploy_path)
        print_plan(runtime.console, job.plan, problems)
        o = job.outcome
        o.result = HostResult.PLANNED.value if job.plan.action != "unchanged" else HostResult.UNCHANGED.value
        o.previous, o.release = job.plan.previous, job.plan.release
        o.services = list(job.plan.rolls)
        o.migrated = False
        o.steps = [st.to_json() for st in job.plan.steps]
        if problems:
            o.result, o.message = HostResult.REFUSED.value, "; ".join(problems)
    where, services, _ = _off_host(jobs)
    if where:  # the build side is checked too (read-only), so the dry run shows what the deploy would refuse
        try:
            _build_side(runtime, where).close()
            runtime.console.phase(where, f"would build {', '.join(services)} here once, for every host")
        except HealthdeployError as exc:
            runtime.console.phase(where, f"preflight would refuse: {exc.message}")
    summary(runtime.console, [j.outcome for j in jobs], as_json)
    return EXIT_OK


def _lock_all(jobs: list[HostJob], release: str, break_lock: bool) -> None:
    """Every host's lock, taken at once (each is a try-lock: none waits, so no order is needed against a
    deadlock); if any is refused, the ones taken are released and the first refused host in order is named."""
    errors: list = []

    def take(index: int) -> None:
        jobs[index].held = jobs[index].session.acquire("deploy", release, break_lock)

    in_parallel(list(range(len(jobs))), take, errors)
    if not errors:
        return
    with shielded():
        for job in jobs:
            if job.held is not None:
                job.session.release(job.held, "deploy", release)
                job.held = None
    index, exc = _first_failure(errors, len(jobs))
    if index is not None:
        jobs[index].outcome.fail(exc)
    raise exc


def _unlock_all(jobs: list[HostJob]) -> None:
    def release(index: int) -> None:
        job = jobs[index]
        if job.held is not None:
            job.session.release(job.held, "deploy", job.plan.release if job.plan else "")
            job.held = None

    in_parallel(list(range(len(jobs))), release, [])  # release never raises (shielded, errors swallowed)


def _off_host(jobs: list[HostJob]) -> tuple[str, tuple[str, ...], HostJob | None]:
    """(where, services, the job whose release files it builds from) of the deploy's build off the hosts: every
    service some host's plan builds, built once; ("", (), None) when every host builds its own (BUILD_ON=host)."""
    where, services, source = "", [], None
    for job in jobs:
        there, items = job.plan.builds_off_host if job.plan else ("", ())
        if there:
            where, source = there, source or job
            services += [s for s in items if s not in services]
    order = {s: i for i, s in enumerate(source.desired.app_services)} if source else {}
    return where, tuple(sorted(services, key=lambda s: order.get(s, 99))), source


def _build_side(runtime: Runtime, where: str) -> OffHostBuild:
    """The build side, checked (registry binary, Docker and Compose there) before any host is locked."""
    builder = LocalHost(runtime.settings.secrets) if where == "operator" else runtime.connect(where)
    built = OffHostBuild(runtime.settings, runtime.console, where, builder)
    try:
        facts = built.preflight()
    except BaseException:
        built.close()
        raise
    runtime.console.phase(where, f"build side ok: docker {facts.docker}, compose {facts.compose}")
    return built


def _build_once(runtime: Runtime, jobs: list[HostJob], built: OffHostBuild | None) -> OffHostBuild | None:
    """Under every host's lock, before any host changes: the one build of this deploy, pushed to the registry."""
    where, services, source = _off_host(jobs)
    if not services:
        return built
    if built is None or built.where != where:  # the plans under the lock differ from the preflight's
        built = _build_side(runtime, where)
    try:
        built.build(source.payload, source.desired.release, services, source.session.t.project)
    except BaseException as exc:
        reason = exc.message.splitlines()[0] if isinstance(exc, HealthdeployError) else "interrupted during the build"
        for job in jobs:
            job.outcome.result, job.outcome.message = HostResult.SKIPPED.value, f"{reason}"
        raise
    return built


def _deploy(runtime: Runtime, jobs: list[HostJob], break_lock: bool, as_json: bool) -> int:
    release = jobs[0].desired.release
    # Preflight every host (read-only) before any is locked or changed.
    _observe_and_plan_all(jobs, readonly=True)
    for job in jobs:
        problems = preflight_problems(job.observed, job.desired.min_free_mb, job.session.t.deploy_path)
        if problems:
            job.outcome.result = HostResult.REFUSED.value
            raise PreflightError(f"{job.alias}: " + "; ".join(problems), "fix the host, nothing was changed")
    if all(job.plan.action == "unchanged" for job in jobs):
        # Nothing to change anywhere: no lock is taken (a deploy running meanwhile is left alone).
        for job in jobs:
            job.outcome.previous = job.plan.previous
            job.apply = DeployApply(job.session, job.plan, job.desired, job.payload, job.observed)
            _finish(job)
        summary(runtime.console, [j.outcome for j in jobs], as_json)
        return EXIT_OK
    where, _, _ = _off_host(jobs)
    built = _build_side(runtime, where) if where else None  # checked before any lock, like the hosts
    sides = [built] if built is not None else []  # closed at the end (the registry stops, a build host disconnects)
    try:
        return _deploy_locked(runtime, jobs, release, break_lock, as_json, sides)
    finally:
        for side in sides:
            side.close()


def _deploy_locked(runtime: Runtime, jobs: list[HostJob], release: str, break_lock: bool, as_json: bool,
                   sides: list[OffHostBuild]) -> int:
    built = sides[0] if sides else None
    _lock_all(jobs, release, break_lock)
    try:
        # What the plan sees is what it changes: a host is observed again under the lock, unless the lock proves
        # that no operation held it since the read-only observation (that second look cost a third of a second
        # of the host's CPU: docker and compose started again).
        _observe_and_plan_all([j for j in jobs if not unheld_since(j.observed, j.held.previous_holder)])
        for job in jobs:
            problems = preflight_problems(job.observed, job.desired.min_free_mb, job.session.t.deploy_path)
            if problems:
                job.outcome.result = HostResult.REFUSED.value
                raise PreflightError(f"{job.alias}: " + "; ".join(problems), "fix the host, nothing was changed")
            job.session.say(f"preflight ok: docker {job.observed.host.docker}, compose {job.observed.host.compose}, "
                            f"{job.observed.host.free_mb} MB free, live release {job.observed.current or '(none)'}")
            job.outcome.previous = job.plan.previous
            job.session.say(f"plan: {job.plan.action} ({len(job.plan.steps)} step(s))")
        changing = [j for j in jobs if j.plan.action != "unchanged"]
        in_parallel(changing, lambda j: j.session.audit({"event": "lock", "operation": "deploy",
                                                         "release": j.plan.release}), [])
        # A build off the hosts runs once, here: it fails before any host changed.
        built = _build_once(runtime, jobs, built)
        if built is not None and built not in sides:
            sides.append(built)
        for job in jobs:
            job.apply = DeployApply(job.session, job.plan, job.desired, job.payload, job.observed, built)
        data = [j for j in jobs if j.session.t.role is Role.DATA]
        apps = [j for j in jobs if j.session.t.role is not Role.DATA]
        size = runtime.settings.batch_size
        # Data hosts first. Their changes are committed at once: the application hosts depend on them, and a
        # later application failure must not take them away from hosts that already switched. The first batch's
        # preparation (release files, images: nothing that reaches a data service) runs beside them; its
        # migration and rolls wait for them, and a data host's failure undoes that preparation.
        app_batches = batches(apps, size)
        first_preparation = [(j, _split(j)[0], False, False) for j in (app_batches[0] if app_batches else [])]
        data_parts = [(j, _steps(j, before_apps=True), True, False) for j in data]
        if data_parts or first_preparation:
            _run_parts(data_parts + first_preparation)
        for number, batch in enumerate(app_batches):
            # Prepared in parallel, migrated once, then rolled: no host switches before the migration.
            if number:
                _run_phase(batch, lambda j: _split(j)[0], commit=False, final=False)
            _run_phase(batch, lambda j: _split(j)[1], commit=False, final=False)
            _run_phase(batch, lambda j: _split(j)[2], commit=True, final=True)
        for job in data:
            _run_phase([job], lambda j: _steps(j, before_apps=False), commit=True, final=True)
    except BaseException as exc:
        with shielded():
            for job in jobs:
                if job.apply is not None and not job.apply.committed and len(job.session.undo):
                    job.apply.abort()
                if job.outcome.result == HostResult.PENDING.value:
                    job.outcome.result = HostResult.SKIPPED.value
                    job.outcome.message = job.outcome.message or "an earlier host failed"
            _unlock_all(jobs)
        raise FleetStopped([j.outcome for j in jobs], exc) from None
    _unlock_all(jobs)
    if built is not None and built.report is not None:
        try:
            built.prune(runtime.settings.keep_releases)
        except HealthdeployError as exc:
            runtime.console.warn(f"{built.where}: old build images were not pruned: {exc.message}")
    summary(runtime.console, [j.outcome for j in jobs], as_json, build=_build_summary(built))
    return EXIT_OK


def _build_summary(built: OffHostBuild | None) -> dict | None:
    if built is None or built.report is None:
        return None
    r = built.report
    return {"where": r.where, "services": list(r.services), "build_seconds": round(r.build_seconds, 1),
            "push_seconds": round(r.push_seconds, 1), "layers_pushed": r.layers_pushed,
            "layers_present": r.layers_present, "from_build_host_bytes": r.from_build_host,
            "images": {s: {"id": i.image_id, "digest": i.digest} for s, i in built.images.items()}}


def _steps(job: HostJob, before_apps: bool):
    return [s for s in job.plan.steps if (s.phase == "after-apps") != before_apps]


def _split(job: HostJob):
    """(preparation, migration, the rest) of an application host's plan."""
    steps = list(job.plan.steps)
    cut = next((i for i, s in enumerate(steps) if s.kind in (StepKind.MIGRATE, StepKind.ROLL, StepKind.SWITCH)),
               len(steps))
    before, rest = steps[:cut], steps[cut:]
    migrate = [s for s in rest if s.kind is StepKind.MIGRATE]
    return before, migrate, [s for s in rest if s.kind is not StepKind.MIGRATE]


def _run_phase(batch: list[HostJob], steps_of, commit: bool, final: bool) -> None:
    """Run a phase on every host of a batch; on any failure every host of the batch that has not committed
    undoes its changes, and the first failure stops the deploy."""
    _run_parts([(job, steps_of(job), commit, final) for job in batch])


def _run_parts(parts: list[tuple[HostJob, list, bool, bool]]) -> None:
    """``(host, steps, commit, final)`` for each host, all at once; on any failure every one of these hosts that
    has not committed undoes its changes, and the first failure stops the deploy."""
    errors: list = []
    todo = {id(job): (steps, commit, final) for job, steps, commit, final in parts}
    batch = [job for job, _, _, _ in parts]

    def work(job: HostJob) -> None:
        steps, commit, final = todo[id(job)]
        if steps:
            job.apply.run(steps)
        if commit:
            job.apply.commit()
        if final:
            _finish(job)

    in_parallel(batch, work, errors)
    if not errors:
        return
    first = next((exc for j, exc in errors if j is not None), errors[0][1])
    first_job = next((j for j, _ in errors if j is not None), None)
    raised = None
    with shielded():
        for job in batch:
            failed_here = next((exc for j, exc in errors if j is job), None)
            if job.apply is not None and not job.apply.committed:
                job.apply.abort()
                if failed_here is None and first_job is not None and not isinstance(first, KeyboardInterrupt):
                    _record_failure(job, first, undone_for=first_job.alias)  # it did nothing wrong itself
                    continue
                error = _record_failure(job, failed_here or first)
                raised = raised or (error if failed_here is not None else None)
    raise raised or first


def _finish(job: HostJob) -> None:
    """The host's plan ran to its end: audit and fill its outcome."""
    apply, plan, o = job.apply, job.plan, job.outcome
    o.release = plan.release
    o.services = [r.service for r in apply.report.rolls]
    o.migrated = apply.report.migrated
    o.uploaded_bytes, o.uploaded_files = apply.report.uploaded_bytes, apply.report.uploaded_files
    o.shipped_bytes, o.shipped_seconds = apply.report.shipped_bytes, round(apply.report.shipped_seconds, 2)
    seconds = apply.report.step_seconds
    o.steps = [{"step": key, "outcome": outcome, **({"seconds": seconds[key]} if key in seconds else {})}
               for key, outcome in apply.report.applied.done]
    o.closed_at_drain_limit = sum(r.closed_at_limit for r in apply.report.rolls)
    o.result = {"deploy": HostResult.DEPLOYED, "converge": HostResult.CONVERGED,
                "unchanged": HostResult.UNCHANGED}[plan.action].value
    if plan.action == "unchanged":
        job.session.say(f"nothing to do: release {plan.release} is live with the same files and settings")
        return
    if plan.has(StepKind.REPAIR_UPSTREAMS) and plan.action == "converge":
        o.message = "gateway upstreams repaired"
    job.session.audit({"event": "deploy", "release": plan.release, "previous": plan.previous, "result": o.result,
                       "services": o.services, "migrated": o.migrated, "steps": [k for k, _ in apply.report.applied.done]})


def _record_failure(job: HostJob, exc: BaseException, undone_for: str = "") -> BaseException:
    """Fill the failed host's outcome and audit it; return the error to report (a failed roll becomes the
    documented "rolled back" error with the new containers' last log lines). ``undone_for``: the host that
    failed, when this one's unfinished changes were undone only because of it."""
    o, plan = job.outcome, job.plan
    o.undo = [list(u) for u in (job.apply.report.undo if job.apply else [])]
    error: BaseException = exc
    if undone_for:
        o.result, o.message = HostResult.SKIPPED.value, f"undone: {undone_for} failed"
    elif isinstance(exc, KeyboardInterrupt):
        o.result, o.message = HostResult.INTERRUPTED.value, "interrupted: this host's changes were undone"
    elif isinstance(exc, RollFailure):
        o.result = HostResult.ROLLED_BACK.value
        o.message = f"{exc.service}: {exc.reason}"
        error = RolledBack(f"{job.alias}: {exc.service} failed: {exc.reason}; release {plan.previous or '(none)'} keeps "
                           f"serving" + (f"\n--- last log lines of {exc.service} ---\n{exc.logs}" if exc.logs else ""))
    elif isinstance(exc, HealthdeployError):
        o.result = RESULT_FOR(exc)
        o.message = exc.message.splitlines()[0]
    else:
        o.result, o.message = HostResult.FAILED.value, f"{type(exc).__name__}: {exc}"
    try:
        job.session.audit({"event": "deploy", "release": plan.release if plan else "", "result": o.result,
                           "previous": plan.previous if plan else "", "reason": o.message, "undo": o.undo})
    except HealthdeployError:
        pass
    return error


def RESULT_FOR(exc: HealthdeployError) -> str:
    from deploy.execute.fleet import RESULT_OF_EXIT

    return RESULT_OF_EXIT.get(exc.exit_code, HostResult.FAILED).value


# -- rollback -------------------------------------------------------------------------------------------
def rollback(runtime: Runtime, cli_hosts: list[str], to: str | None, break_lock: bool = False,
             as_json: bool = False, with_secrets: bool = False, dry_run: bool = False) -> int:
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.rollback(runtime, cli_hosts, to, break_lock=break_lock, as_json=as_json,
                              with_secrets=with_secrets, dry_run=dry_run)
    hosts = [h for h in choose_hosts(s, cli_hosts) if s.role_of(h).runs_app]
    outcomes = [HostOutcome(h, role=s.role_of(h).value) for h in hosts]
    try:
        for outcome in outcomes:
            with runtime.connect(outcome.host) as host:
                session = Session(host, s, runtime.target(outcome.host, host.address), runtime.console)
                if dry_run:
                    observed = Session(ReadOnlyHost(host), s, session.t, runtime.console).observe()
                    plan = plan_rollback(observed, outcome.host, app_services_on(s, session.t),
                                         image_prefix(s, session.t), to, with_secrets)
                    print_plan(runtime.console, plan, [])
                    outcome.result, outcome.release, outcome.previous = HostResult.PLANNED.value, plan.target, plan.previous
                    outcome.steps = [st.to_json() for st in plan.steps]
                    continue
                # Refused before the lock is taken (nothing written, not even the audit log): an unknown --to,
                # or no earlier release.
                observed = Session(ReadOnlyHost(host), s, session.t, runtime.console).observe()
                try:
                    plan_rollback(observed, outcome.host, app_services_on(s, session.t), image_prefix(s, session.t),
                                  to, with_secrets)
                except HealthdeployError as exc:
                    outcome.fail(exc)
                    raise
                _rollback_host(runtime, session, outcome, to, break_lock, with_secrets)
    except HealthdeployError as exc:
        for o in outcomes:
            if o.result == HostResult.PENDING.value:
                o.result, o.message = HostResult.SKIPPED.value, "an earlier host failed"
        stopped = FleetStopped(outcomes, exc)
        if as_json:
            summary(runtime.console, outcomes, as_json, error=stopped)
        raise stopped from None
    finally:
        pass
    summary(runtime.console, outcomes, as_json)
    return EXIT_OK


def _rollback_host(runtime: Runtime, session: Session, outcome: HostOutcome, to: str | None, break_lock: bool,
                   with_secrets: bool) -> None:
    s = runtime.settings
    with session.locked("rollback", to or "", break_lock):
        observed = session.observe()
        plan = plan_rollback(observed, outcome.host, app_services_on(s, session.t), image_prefix(s, session.t), to,
                             with_secrets)
        outcome.previous = plan.previous
        for note in plan.notes:
            session.say(note)
        try:
            applied, reports = apply_rollback(session, plan, observed)
        except BaseException as exc:
            session.undo.run(session.warn)
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            outcome.result, outcome.message = HostResult.ROLLED_BACK.value, reason
            session.audit({"event": "rollback", "release": plan.target, "previous": plan.previous, "result": "failed",
                           "reason": reason})
            if isinstance(exc, (KeyboardInterrupt, Interrupted)):
                raise
            raise RolledBack(f"{outcome.host}: rollback to {plan.target} failed: {reason}; every service is back "
                             f"on {plan.previous}") from None
        outcome.result, outcome.release = HostResult.ROLLED_BACK_TO.value, plan.target
        outcome.services = [r.service for r in reports]
        outcome.steps = [{"step": k, "outcome": v} for k, v in applied.done]
        session.audit({"event": "rollback", "release": plan.target, "previous": plan.previous, "result": "ok",
                       "services": outcome.services, "with_secrets": with_secrets})
        session.say(f"release {plan.target} is live again")
