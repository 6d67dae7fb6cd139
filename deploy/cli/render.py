"""Renderers: one per result type, rows for the console or JSON for release scripts."""

from __future__ import annotations

from deploy.core.console import Console
from deploy.execute.fleet import HostOutcome
from deploy.plan.deploy import DeployPlan
from deploy.plan.steps import StepKind


def summary(console: Console, outcomes: list[HostOutcome], as_json: bool, error=None, build: dict | None = None) -> None:
    """The per-host table, or with --json the document release scripts read; a refusal or failure adds its
    ``error`` (message, hint, exit_code, problems) so the document says why (docs/exit-codes.md)."""
    if as_json:
        document = {"hosts": [o.__dict__ for o in outcomes], **({"build": build} if build else {})}
        if error is not None:
            document["error"] = error.to_json()
            error.json_reported = True  # cli.entry prints no second document
        console.json(document)
        return
    if build:
        console.info(f"built on {build['where']} once: {', '.join(build['services'])} in {build['build_seconds']}s, "
                     f"pushed in {build['push_seconds']}s ({build['layers_pushed']} new layer(s))")
    console.table(["host", "role", "result", "release", "previous", "services", "migrated", "sent", "seconds", "message"],
                  [[o.host, o.role, o.result, o.release, o.previous, ",".join(o.services) or "-",
                    "yes" if o.migrated else "no", _sent(o), o.seconds, o.message]
                   for o in outcomes])


def _sent(o: HostOutcome) -> str:
    text = f"{o.uploaded_files} files/{o.uploaded_bytes} B"
    return text + (f" + images {o.shipped_bytes} B" if o.shipped_bytes else "")


def plan_lines(plan) -> list[str]:
    """The plan as the dry run prints it: every step with its reason, in the order apply runs them."""
    lines = []
    if isinstance(plan, DeployPlan):
        lines.append(f"plan: {plan.action}" + (f" release {plan.release}" if plan.action == "deploy" else "")
                     + f" (live: {plan.previous or 'none'}; lock: {plan.lock})")
        for path, how in plan.files:
            lines.append(f"would send {path} ({how})")
        build = plan.step(StepKind.BUILD)
        if build:
            where = "on this host" if build.target == "host" else f"on {build.target}, then shipped to this host"
            lines.append(f"would rebuild: {', '.join(build.items)} ({where})")
    else:
        lines.append(f"plan: rollback to {plan.target} (live: {plan.previous})")
    for step in plan.steps:
        if step.kind is StepKind.SEND_FILES:
            continue
        lines.append(f"would {step.describe()}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    if isinstance(plan, DeployPlan) and not plan.steps:
        lines.append("nothing to do: the live release runs with the same files, settings and containers")
    return lines


def print_plan(console: Console, plan, problems: list[str]) -> None:
    for line in plan_lines(plan):
        console.phase(plan.host, line)
    for problem in problems:
        console.phase(plan.host, f"preflight would refuse: {problem}")
