"""``plan_rollback``: pure. Back to an earlier release without a rebuild.

What the target release ran with is compared with what runs: its images, its settings (the release half
of each env file) and its service definitions. Secrets stay the current ones unless ``with_secrets`` is
asked for (secrets are versioned apart from releases, so a key rotated after a leak stays rotated). Without
``--to``, the target is the release that was live before the current one, from the host's own history
(not the newest older directory: a deploy that rolled back by itself never became live).
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.core.errors import HealthdeployError, UsageError
from deploy.core.services import GATEWAY, ROLL_ORDER
from deploy.facts.observe import Observed
from deploy.plan.deploy import PreflightError, swarm_release_of
from deploy.plan.steps import Step, StepKind
from deploy.stack.render import env_digest


@dataclass(frozen=True)
class RollbackPlan:
    host: str
    target: str
    previous: str
    steps: tuple[Step, ...]
    secrets_version: str  # the secrets version live after the rollback
    env_digests: dict  # application service -> digest its containers get
    notes: tuple[str, ...] = ()

    @property
    def rolls(self) -> tuple[str, ...]:
        return tuple(s.target for s in self.steps if s.kind is StepKind.ROLL)

    def to_json(self) -> dict:
        return {"host": self.host, "action": "rollback", "release": self.target, "previous": self.previous,
                "steps": [s.to_json() for s in self.steps], "notes": list(self.notes)}


def previous_live(observed: Observed) -> str | None:
    """The release that was live before the current one, by the host's history (newest first)."""
    current = observed.current
    seen_current = False
    for entry in reversed(observed.history):
        release = entry.get("release")
        if release == current and not seen_current:
            seen_current = True
            continue
        if seen_current and release and release != current and release in observed.host.releases:
            return release
    return None


def choose_target(observed: Observed, to: str | None, alias: str) -> str:
    releases = observed.host.releases
    if to:
        if to not in releases:
            raise UsageError(f"{alias}: no release {to}",
                             f"pick one of: {', '.join(releases)}" if releases else "this host has no release yet")
        return to
    target = previous_live(observed)
    if target is None:  # no history (releases made before it was kept): the newest older release
        older = [r for r in releases if r < observed.current] if observed.current else list(releases)
        target = older[-1] if older else None
    if target is None:
        raise HealthdeployError(f"{alias}: no earlier release to roll back to", "see `fab releases`")
    return target


def secrets_version_of(observed: Observed, release: str) -> str:
    """The secrets version ``release`` last ran with (history), else the one it was deployed with."""
    for entry in reversed(observed.history):
        if entry.get("release") == release and entry.get("secrets"):
            return entry["secrets"]
    meta = observed.releases_meta.get(release)
    return meta.secrets_version if meta else ""


def plan_rollback(observed: Observed, alias: str, app_services: tuple[str, ...], image_prefix: str,
                  to: str | None = None, with_secrets: bool = False) -> RollbackPlan:
    o = observed
    live_stack = swarm_release_of(o.live_files, o.release_env) if o.current else None
    if live_stack is not None:  # switching `current` away would take the path from another environment's stack
        raise PreflightError(f"{alias}: the live release {o.current} is a TARGET=swarm release (stack {live_stack or '?'}), "
                             "not one of a Compose deploy", "give this environment a DEPLOY_PATH of its own; "
                             "nothing was changed")
    target = choose_target(o, to, alias)
    meta = o.releases_meta.get(target)
    if meta is None:
        raise HealthdeployError(f"{alias}: release {target} has no release.env", "deploy that source again instead")
    if meta.values.get("STACK") is not None:
        raise UsageError(f"{alias}: release {target} is a TARGET=swarm release (stack {meta.values['STACK']})",
                         "name a release of this environment with --to (`fab releases`)")
    steps: list[Step] = []
    notes: list[str] = []
    live_version = o.state.get("secrets", "") if isinstance(o.state, dict) else ""
    version = live_version
    if with_secrets:
        wanted = secrets_version_of(o, target)
        if not wanted or wanted not in o.secret_versions:
            raise HealthdeployError(f"{alias}: the secrets {target} ran with are no longer kept",
                                    "roll back without --with-secrets (the current secrets stay)")
        if wanted != live_version:
            steps.append(Step(StepKind.INSTALL_SECRETS, wanted, f"--with-secrets: the secrets {target} ran with"))
            version = wanted
    elif live_version and secrets_version_of(o, target) not in ("", live_version):
        notes.append(f"the current secrets ({live_version}) stay; --with-secrets would restore those of {target}")

    def secret_half(service: str) -> str:
        if version != live_version or not o.secrets.get(f"env/{service}.env"):
            return o.secret_version_files.get(f"{version}/env/{service}.env", "")
        return o.secrets.get(f"env/{service}.env", "")

    missing = [s for s in app_services if not o.images.get(f"{image_prefix}/{s}:{target}")]
    if missing:
        raise HealthdeployError(f"{alias}: images of release {target} are gone: "
                                f"{', '.join(f'{image_prefix}/{s}:{target}' for s in missing)}",
                                "deploy that source again instead")
    target_conf = meta.hashes.get("gateway/nginx.conf", "")
    if GATEWAY in (c.service for c in o.containers) and target_conf and target_conf != o.gateway_conf:
        steps.append(Step(StepKind.INSTALL_GATEWAY_CONF, target, "the gateway config of the target release"))
        steps.append(Step(StepKind.RELOAD_GATEWAY, GATEWAY, "config changed"))
    digests = {}
    for service in ROLL_ORDER:
        if service not in app_services:
            continue
        image = o.images[f"{image_prefix}/{service}:{target}"]
        digests[service] = env_digest(meta.hashes.get(f"env/{service}.env", ""), secret_half(service))
        running = o.running(service)
        reasons = []
        if not running:
            reasons.append("not running")
        if any(c.image_id != image for c in running):
            reasons.append("image differs")
        if any(c.env_digest != digests[service] for c in running):
            reasons.append("env differs")
        definition = meta.definition(service)
        if definition and any(c.definition and c.definition != definition for c in running):
            reasons.append("definition differs")
        if reasons:
            steps.append(Step(StepKind.ROLL, service, ", ".join(reasons)))
    if target != o.current:
        steps.append(Step(StepKind.SWITCH, target, f"from {o.current}"))
    steps.append(Step(StepKind.RECORD, target, "live release and secrets version"))
    if not any(s.kind in (StepKind.ROLL, StepKind.INSTALL_SECRETS, StepKind.INSTALL_GATEWAY_CONF) for s in steps):
        notes.append(f"{target} runs the same images and settings as {o.current}: only `current` moves")
    return RollbackPlan(alias, target, o.current, tuple(steps), version, digests, tuple(notes))
