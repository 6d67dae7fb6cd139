"""``plan_deploy(desired, observed) -> DeployPlan``: pure. The one place that decides what a deploy does.

``Desired`` is computed locally from settings and source (hashes only: no bytes, no secrets); ``Observed``
is read from the host under its lock (``facts.observe``). The plan compares the desired stack with what
runs, not only files with files, so a deploy also converges: a stopped service is started, an unhealthy
container replaced, a stale upstream repaired, containers left by an interrupted deploy removed.

The dry run prints this plan; ``execute.apply`` runs it, step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from deploy.core.errors import HealthdeployError, ExitCode
from deploy.core.services import APP_SERVICES, GATEWAY, ROLL_ORDER, Role
from deploy.facts.host import version_tuple
from deploy.facts.observe import Observed
from deploy.plan.steps import Step, StepKind
from deploy.stack import payload as pl

MIN_DOCKER = (20, 10)
MIN_COMPOSE = (2, 24)  # env_file entries with `required:`

# How each data service takes a changed credential (see docs/plan.md):
# rotate: changed in place while it runs; dual: accepts old and new during the rolls, then only the new;
# recreate: reads it at start only, so it is recreated (a short outage of that service), then clients roll.
ROTATION = {"postgres": "rotate", "redis": "dual", "mongodb": "rotate", "minio": "recreate", "emqx": "recreate",
            "influxdb": "recreate"}
# Data services whose release settings (not secrets) matter only when the data volume is first created.
INIT_ONLY_SETTINGS = ("postgres", "mongodb")


class PreflightError(HealthdeployError):
    exit_code = ExitCode.PREFLIGHT


@dataclass(frozen=True)
class Desired:
    """What the host should run, from settings and source, as hashes (computed locally, before connecting)."""

    host: str
    role: Role
    services: tuple[str, ...]  # every service on this host
    release: str  # the id a new release gets
    files: Mapping[str, str]  # release payload: path -> sha256 (not MANIFEST, not release.env)
    secrets: Mapping[str, str]  # secret files: env/<svc>.env, tls/*.pem -> sha256
    secrets_version: str
    env_digests: Mapping[str, str]  # application service -> digest of its whole environment
    definitions: Mapping[str, str]  # service -> digest of its compose definition
    image_inputs: Mapping[str, str]  # application service -> digest of the files its image is built from
    image_prefix: str
    variant: str = "production"
    git_commit: str = ""
    migrate_here: bool = False  # this host runs the deploy's migrations
    min_free_mb: int = 0
    keep_releases: int = 5
    build_on: str = "host"  # where images are built: "host", "operator" or a build host's alias (BUILD_ON)

    @property
    def app_services(self) -> tuple[str, ...]:
        return tuple(s for s in self.services if s in APP_SERVICES)

    @property
    def infra(self) -> tuple[str, ...]:
        return tuple(s for s in self.services if s not in APP_SERVICES and s != GATEWAY)

    def image_ref(self, service: str, release: str) -> str:
        return f"{self.image_prefix}/{service}:{release}"


@dataclass(frozen=True)
class DeployPlan:
    host: str
    action: str  # unchanged | converge | deploy
    release: str  # the release that is live when the plan has run
    previous: str  # the release live before
    steps: tuple[Step, ...] = ()
    notes: tuple[str, ...] = ()  # what the plan leaves alone, and why
    files: tuple[tuple[str, str], ...] = ()  # (path, "new" | "changed") of the files sent
    lock: str = "free"

    def has(self, kind: StepKind, target: str | None = None) -> bool:
        return any(s.kind is kind and (target is None or s.target == target) for s in self.steps)

    def step(self, kind: StepKind, target: str | None = None) -> Step | None:
        return next((s for s in self.steps if s.kind is kind and (target is None or s.target == target)), None)

    @property
    def rolls(self) -> tuple[str, ...]:
        return tuple(s.target for s in self.steps if s.kind is StepKind.ROLL)

    @property
    def builds(self) -> tuple[str, ...]:
        step = self.step(StepKind.BUILD)
        return step.items if step else ()

    @property
    def builds_off_host(self) -> tuple[str, tuple[str, ...]]:
        """(where, services) of a build that runs off this host, or ("", ())."""
        step = self.step(StepKind.BUILD)
        return (step.target, step.items) if step and step.target != "host" else ("", ())

    @property
    def migrates(self) -> bool:
        return self.has(StepKind.MIGRATE)

    @property
    def new_release(self) -> bool:
        return self.has(StepKind.NEW_RELEASE)

    def to_json(self) -> dict:
        return {"host": self.host, "action": self.action, "release": self.release, "previous": self.previous,
                "lock": self.lock, "steps": [s.to_json() for s in self.steps], "notes": list(self.notes)}


# -- preflight ------------------------------------------------------------------------------------
def preflight_problems(observed: Observed, min_free_mb: int, deploy_path: str) -> list[str]:
    facts = observed.host
    problems = []
    if not facts.docker:
        problems.append("Docker is not installed or not running (docker version failed)")
    elif version_tuple(facts.docker) < MIN_DOCKER:
        problems.append(f"Docker {facts.docker} is older than {'.'.join(map(str, MIN_DOCKER))}")
    if not facts.compose:
        problems.append("Docker Compose v2 is missing (docker compose version failed)")
    elif version_tuple(facts.compose) < MIN_COMPOSE:
        problems.append(f"Compose {facts.compose} is older than {'.'.join(map(str, MIN_COMPOSE))}")
    if not facts.has_bash:
        problems.append("bash is missing (needed for checksummed streams)")
    if facts.free_mb < min_free_mb:
        problems.append(f"only {facts.free_mb} MB free under {deploy_path}, MIN_FREE_DISK_MB is {min_free_mb}")
    stack = swarm_release_of(observed.live_files, observed.release_env)
    if stack is not None:
        # Taken as this environment's live release, every later step would act on another environment's files.
        problems.append(f"{deploy_path} holds a TARGET=swarm release (stack {stack or '?'}), not one of a Compose "
                        "deploy: give this environment a DEPLOY_PATH of its own")
    return problems


def swarm_release_of(live_files, release_env) -> str | None:
    """The stack whose release is live under a deploy path ("" if unnamed), or None for a Compose release."""
    if release_env.get("STACK") is not None:
        return release_env["STACK"]
    return "" if any(name in live_files for name in pl.SWARM_STACK_FILES) else None


def compose_release_in(live_files) -> bool:
    """True when the live release under a deploy path is a Compose deploy's (a compose file, no stack file)."""
    return "compose.yaml" in live_files and not any(name in live_files for name in pl.SWARM_STACK_FILES)


# -- the planner ----------------------------------------------------------------------------------
def live_manifest(observed: Observed, desired: Desired) -> dict[str, str]:
    """The files of the live release as they are on disk (a file edited on the host is drift, replaced by
    the next deploy). A git source's exported tree is represented by its SOURCE file."""
    git_tree = pl.SOURCE_FILE in desired.files
    return {path: digest for path, digest in observed.live_files.items()
            if path not in (pl.MANIFEST, pl.RELEASE_ENV)
            and not (git_tree and path.startswith("src/") and path not in desired.files)}


@dataclass
class _Builder:
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: StepKind, target: str = "", reason: str = "", items=(), condition: str = "",
            phase: str = "") -> None:
        self.steps.append(Step(kind, target, reason, tuple(items), condition, phase))


def plan_deploy(desired: Desired, observed: Observed) -> DeployPlan:
    d, o = desired, observed
    b = _Builder()
    current = o.current
    live = live_manifest(o, d) if current else {}
    change = pl.diff(dict(d.files), live)
    new_release = not current or not change.empty
    release = d.release if new_release else current

    # -- files of the release ---------------------------------------------------------------------
    files: list[tuple[str, str]] = []
    if new_release:
        b.add(StepKind.NEW_RELEASE, release, f"copy of {current}" if current else "first release")
        sent = list(change.changed)
        source_changed = pl.SOURCE_FILE in change.changed
        if source_changed and d.git_commit:
            b.add(StepKind.EXPORT_SOURCE, d.git_commit[:12], "the git commit changed")
            # The export replaces src/: rendered build files under src/ must be sent again.
            sent = sorted(set(sent) | {p for p in d.files if p.startswith("src/")})
        files = [(p, "changed" if p in live else "new") for p in sent]
        if sent:
            b.add(StepKind.SEND_FILES, "", f"{len(sent)} file(s)", sent)
        if change.removed:
            b.add(StepKind.REMOVE_FILES, "", "not in this release", change.removed)
        b.add(StepKind.WRITE_RELEASE, release, "release.env and MANIFEST")

    # -- secrets ----------------------------------------------------------------------------------
    secrets_changed = tuple(sorted(n for n, h in d.secrets.items() if o.secrets.get(n) != h))
    tls_changed = any(n.startswith("tls/") for n in secrets_changed) or (
        any(n.startswith("tls/") for n in o.secrets) and not any(n.startswith("tls/") for n in d.secrets))
    if secrets_changed and d.secrets_version not in o.secret_versions:
        b.add(StepKind.STAGE_SECRETS, d.secrets_version, "secrets changed", secrets_changed)
    if new_release or tls_changed:
        if gateway_config_as_live(d, o, change, tls_changed):
            # nginx -t of the new files costs a throwaway container; these files already passed it and serve.
            b.add(StepKind.VALIDATE, release, "compose config before anything live changes; no nginx -t: the "
                  "gateway's files, certificates and image are the live release's", ("compose",))
        else:
            b.add(StepKind.VALIDATE, release, "compose config and nginx -t before anything live changes",
                  ("compose", "nginx") if GATEWAY in d.services else ("compose",))

    # -- images -----------------------------------------------------------------------------------
    build: list[str] = []
    tag: list[str] = []
    target_image: dict[str, str | None] = {}  # service -> image id after this plan (None: known after the build)
    live_inputs = pl.image_inputs(live, d.app_services, d.variant) if current else {}
    for service in d.app_services:
        live_image = o.images.get(d.image_ref(service, current)) if current else None
        if new_release:
            if not live_image:
                build.append(service)
                target_image[service] = None
            elif live_inputs.get(service) != d.image_inputs.get(service):
                build.append(service)
                target_image[service] = None
            else:
                tag.append(service)
                target_image[service] = live_image
        elif not live_image:
            build.append(service)
            target_image[service] = None
        else:
            target_image[service] = live_image
    if build:
        reason = "first release" if not current else "source changed"
        if d.build_on == "host":
            b.add(StepKind.BUILD, "host", reason, build)
        else:
            # Built once per deploy off the host (before any host changes), then shipped into each host.
            b.add(StepKind.BUILD, d.build_on, f"{reason}; once for every host of this deploy", build)
            b.add(StepKind.SHIP, d.build_on, "only the layers this host lacks, compressed, over SSH", build)
    if tag:
        b.add(StepKind.TAG, release, "source unchanged: the live image gets the release's tag", tag)

    # -- credentials the data services must take ------------------------------------------------------
    rotations: dict[str, str] = {}
    for service in d.infra:
        name = f"env/{service}.env"
        if name in secrets_changed and o.secrets.get(name) and o.running(service):
            rotations[service] = ROTATION.get(service, "recreate")
    for service, how in rotations.items():
        if how == "dual":
            b.add(StepKind.ROTATE_PREPARE, service, "accept the new password beside the old one during the rolls")

    if secrets_changed:
        b.add(StepKind.INSTALL_SECRETS, d.secrets_version, "secrets changed", secrets_changed)
    gateway_here = GATEWAY in d.services
    conf_changed = gateway_here and "gateway/nginx.conf" in d.files and o.gateway_conf != d.files["gateway/nginx.conf"]
    if conf_changed:
        b.add(StepKind.INSTALL_GATEWAY_CONF, "", "gateway config changed" if o.gateway_conf else "first gateway config")

    # -- data services and the gateway --------------------------------------------------------------
    release_env_changed = {p.split("/")[1][:-4] for p in change.changed if p.startswith("env/") and current}
    starts: list[tuple[str, str]] = []
    for service in (*d.infra, *((GATEWAY,) if gateway_here else ())):
        containers = o.of(service)
        running = o.running(service)
        wanted = d.definitions.get(service, "")
        if not running:
            starts.append((service, "not running" if containers else "first start"))
            continue
        labelled = [c.definition for c in running if c.definition]
        if labelled and any(x != wanted for x in labelled):
            b.add(StepKind.RECREATE, service, "definition changed")
        elif rotations.get(service) == "recreate":
            b.add(StepKind.RECREATE, service, "credentials changed: the server reads them at start")
        elif service in release_env_changed and service not in INIT_ONLY_SETTINGS:
            b.add(StepKind.RECREATE, service, "settings changed")
        elif any(c.health == "unhealthy" for c in running):
            b.add(StepKind.RESTART, service, "unhealthy")
        elif service in release_env_changed:
            b.notes.append(f"{service}: its settings changed, but they apply only when its data volume is created")
        if rotations.get(service) == "rotate":
            b.add(StepKind.ROTATE, service, "password changed: set on the running server")
    if starts:  # one compose call starts them all in parallel
        reasons = sorted({r for _, r in starts})
        b.add(StepKind.START, "", "; ".join(reasons), [s for s, _ in starts])
    if gateway_here and o.running(GATEWAY) and not b_has(b, StepKind.RECREATE, GATEWAY):
        if conf_changed and o.gateway_conf:
            b.add(StepKind.RELOAD_GATEWAY, GATEWAY, "config changed")
        elif tls_changed:
            b.add(StepKind.RELOAD_GATEWAY, GATEWAY, "certificate changed")

    # -- migrations and rolls --------------------------------------------------------------------------
    rolls: list[tuple[str, str, str]] = []  # (service, reason, condition)
    orphans: dict[str, list[str]] = {}
    repair: list[str] = []
    for service in ROLL_ORDER:
        if service not in d.app_services:
            continue
        running = o.running(service)
        listed = o.upstreams.get(service)
        healthy_ips = {c.ip for c in running if c.ip}
        reasons = []
        condition = ""
        if not running:
            reasons.append("not running")
        else:
            if any(c.health == "unhealthy" for c in running):
                reasons.append("unhealthy")
            if any(c.env_digest != d.env_digests.get(service) for c in running):
                reasons.append("env changed")
            if any(c.definition and c.definition != d.definitions.get(service) for c in running):
                reasons.append("definition changed")
            wanted_image = target_image.get(service)
            if wanted_image is None:
                if not reasons:
                    condition = f"image-changed:{service}"
                reasons.append("source changed" if current and o.images.get(d.image_ref(service, current))
                               else "image rebuilt")
            elif any(c.image_id != wanted_image for c in running):
                reasons.append("image differs from the release")
            # Containers left by an interrupted deploy: running, but not in the gateway beside ones that are.
            if listed and listed <= healthy_ips and len(running) > len(listed):
                orphans[service] = [c.name for c in running if c.ip not in listed]
            elif listed is not None and listed != healthy_ips and not reasons:
                repair.append(service)
            elif listed is None and not reasons:
                repair.append(service)
        stopped = [c.name for c in o.of(service) if not c.running]
        if stopped:
            orphans.setdefault(service, []).extend(stopped)
        if reasons:
            rolls.append((service, ", ".join(reasons), condition))
    for service, names in orphans.items():
        b.add(StepKind.REMOVE_ORPHANS, service, "left by an interrupted deploy (not in the gateway)", names)
    # Migrations come with a new backend image (they ship in it); settings alone never migrate.
    if d.migrate_here and "backend" in build:
        b.add(StepKind.MIGRATE, "backend", "new backend image" if current else "first release",
              condition="image-changed:backend" if current and o.running("backend") else "")
    # A password changed in place (PostgreSQL has one per role) is changed inside the roll of its client: after
    # the new containers are healthy, just before the gateway switches to them, so the old containers open no new
    # connection with the old password for more than a moment (their open connections stay authenticated).
    rolled = {service for service, _, _ in rolls}
    if "backend" in rolled:
        moved = [s for s in b.steps if s.kind is StepKind.ROTATE]
        b.steps = [s for s in b.steps if s.kind is not StepKind.ROTATE]
    else:
        moved = []
    for service, reason, condition in rolls:
        if service == "backend":
            for step in moved:
                b.add(step.kind, step.target, step.reason, step.items, phase="in-roll:backend")
        b.add(StepKind.ROLL, service, reason, condition=condition)
    if repair:
        b.add(StepKind.REPAIR_UPSTREAMS, "", "the gateway lists addresses that are not the running containers'", repair)
    for service, how in rotations.items():
        if how == "dual":
            b.add(StepKind.ROTATE_FINISH, service, "the old password is refused from now on",
                  phase="" if d.role is Role.BOTH else "after-apps")

    # -- the release goes live -------------------------------------------------------------------------
    if new_release:
        b.add(StepKind.SWITCH, release, f"from {current}" if current else "first release")
    if new_release or secrets_changed:
        b.add(StepKind.RECORD, release, "live release and secrets version")
    if new_release and current:
        b.add(StepKind.PRUNE, "", f"keep {d.keep_releases} release(s)")

    steps = tuple(b.steps)
    action = "deploy" if new_release else ("converge" if steps else "unchanged")
    return DeployPlan(d.host, action, release, current, steps, tuple(b.notes), tuple(files), o.lock.state)


def gateway_config_as_live(d: Desired, o: Observed, change, tls_changed: bool) -> bool:
    """True when the gateway would run exactly what serves now: same files under gateway/ (none changed or
    removed since the live release), same certificates, and a running gateway of the same definition (image,
    mounts, ports)."""
    if GATEWAY not in d.services or not o.current or tls_changed:
        return False
    if any(p.startswith("gateway/") for p in (*change.changed, *change.removed)):
        return False
    running = o.running(GATEWAY)
    wanted = d.definitions.get(GATEWAY, "")
    return bool(running) and bool(wanted) and all(c.definition == wanted for c in running)


def b_has(b: _Builder, kind: StepKind, target: str) -> bool:
    return any(s.kind is kind and s.target == target for s in b.steps)
