"""``DeployApply``: runs a ``DeployPlan``'s steps in order on one host, registering an undo action as each
step succeeds. The plan decided; this only acts (and resolves the plan's conditional steps once the images
are built). Rollback plans run here too (``apply_rollback``).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

from deploy.commands import docker as dk
from deploy.commands import files as fs
from deploy.commands import git as gitc
from deploy.commands import journal
from deploy.commands import rotate as rot
from deploy.commands.base import script
from deploy.core.errors import ExitCode, HealthdeployError, RemoteCommandError
from deploy.core.services import APP_PORTS, APP_SERVICES, GATEWAY, UPSTREAM_NAMES
from deploy.execute.gateway import Gateway
from deploy.execute.roll import RollFailure, RollReport, ServiceRoll
from deploy.execute import faults
from deploy.execute.executor import shielded
from deploy.execute.session import FILES, SERVICES, SETTINGS, Session, utc_now
from deploy.facts.images import image_ids, parse_image_ids
from deploy.facts.observe import Observed
from deploy.plan.deploy import DeployPlan, Desired
from deploy.plan.desired import Payload
from deploy.plan.rollback import RollbackPlan
from deploy.plan.steps import Applied, Step, StepKind
from deploy.stack import payload as pl
from deploy.stack.render import GATEWAY_DIR, image_prefix, sandbox_report

STATE_HISTORY = 50  # live-release history entries kept in shared/state.json

STAGE_SECRETS = r"""set -e
umask 077
d="$1/.versions"
mkdir -p "$d"
rm -rf "$d/.$2.partial"
mkdir -m 0700 "$d/.$2.partial"
tar -x -f - -C "$d/.$2.partial" --no-same-owner
rm -rf "$d/$2"
mv -T "$d/.$2.partial" "$d/$2"
"""

# Secrets installed by a healthdeploy without versions, kept as a version so an aborted deploy can put them back.
SNAPSHOT_SECRETS = r"""set -e
umask 077
d="$1/.versions/$2"
[ -d "$d" ] && exit 0
mkdir -p "$d.partial/env" "$d.partial/tls"
for f in "$1"/*.env; do [ -f "$f" ] && cp "$f" "$d.partial/env/"; done
for f in "$3"/tls/*.pem; do [ -f "$f" ] && cp "$f" "$d.partial/tls/"; done
mv -T "$d.partial" "$d"
"""

INSTALL_FILE = 'set -e; tmp=$(mktemp "$2.XXXXXX"); cp "$1" "$tmp"; chmod 0644 "$tmp"; mv -f "$tmp" "$2"'
# The undo of a new gateway config: the old one back, and the gateway reloaded if it runs ($3 container, $4 conf).
INSTALL_CONF_AND_RELOAD = (INSTALL_FILE + '; if docker inspect -f "{{.State.Running}}" "$3" 2>/dev/null | grep -q true; then '
                           'docker exec "$3" nginx -t -q -c "$4" && docker exec "$3" nginx -s reload -c "$4"; fi')


class RolledBack(HealthdeployError):
    exit_code = ExitCode.ROLLED_BACK


class StepFailed(HealthdeployError):
    """A step failed before anything was switched: the live release keeps serving."""


@dataclass
class ApplyReport:
    applied: Applied = field(default_factory=Applied)
    rolls: list[RollReport] = field(default_factory=list)
    migrated: bool = False
    uploaded_bytes: int = 0
    uploaded_files: int = 0
    shipped_bytes: int = 0  # image layers pulled from the shipping registry (BUILD_ON other than host)
    shipped_seconds: float = 0.0
    undo: list[tuple[str, str]] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step that ran (where time goes)


class DeployApply:
    """Runs one host's plan. ``run(steps)`` may be called in phases (the fleet migrates between them); the
    undo stack lives in the session across phases."""

    def __init__(self, session: Session, plan: DeployPlan, desired: Desired, payload: Payload, observed: Observed,
                 built=None):
        self.session = session
        self.built = built  # execute.build.OffHostBuild when the plan builds off the host
        self.plan = plan
        self.d = desired
        self.payload = payload
        self.o = observed
        self.s = session.s
        self.t = session.t
        self.gateway = Gateway(session)
        self.report = ApplyReport()
        self.release = plan.release
        self.previous = plan.previous
        self.new_images: dict[str, str | None] = {}
        self.prev_secrets = (observed.state.get("secrets") or "") if isinstance(observed.state, dict) else ""
        self.committed = False
        self.in_roll: dict[str, list[Step]] = {}  # steps to run inside a service's roll, before its switch
        self.retired: list[str] = []  # old containers the rolls stopped, removed when the deploy commits

    # -- helpers --------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        self.session.say(message)

    def run_cmd(self, command, **kw):
        return self.session.run(command, **kw)

    def compose_files(self, release: str) -> tuple[str, str, str]:
        d = self.t.release_dir(release)
        return self.t.project, f"{d}/compose.yaml", f"{d}/{pl.RELEASE_ENV}"

    def environment(self) -> dict[str, str]:
        """Label values Compose interpolates: the digests of the settings the containers get now (the release's
        release.env has the digests it was deployed with; secrets may have changed since)."""
        return {f"ENV_DIGEST_{s.upper().replace('-', '_')}": d for s, d in self.d.env_digests.items()}

    @property
    def rdir(self) -> str:
        return self.t.release_dir(self.release)

    def version_file(self, version: str, service: str) -> str:
        return f"{fs.stage_dir(self.t.env_dir, version)}/env/{service}.env"

    def container_of(self, service: str) -> str:
        running = [c for c in self.session.containers() if c.service == service and c.running]
        if not running:
            raise StepFailed(f"{self.t.alias}: {service} is not running", "`fab status` shows the stack")
        return running[0].name

    def condition_holds(self, step: Step) -> tuple[bool, str]:
        kind, _, service = step.condition.partition(":")
        if kind != "image-changed":
            return True, ""
        new = self.new_images.get(service)
        running = self.o.running(service)
        if new and running and all(c.image_id == new for c in running):
            return False, f"the {service} image did not change"
        return True, ""

    # -- the run --------------------------------------------------------------------------------------
    def run(self, steps: tuple[Step, ...] | list[Step]) -> ApplyReport:
        for step in steps:
            if step.phase.startswith("in-roll:"):
                self.in_roll.setdefault(step.phase[8:], []).append(step)
                continue
            if step.condition:
                holds, why = self.condition_holds(step)
                if not holds:
                    self.report.applied.skipped(step, why)
                    continue
            faults.point(f"before:{step.kind.value}", self.session.host)
            self._do(step)
            faults.point(f"after:{step.kind.value}", self.session.host)
        return self.report

    def _do(self, step: Step) -> None:
        """One step's action, its wall time kept (the deploy's JSON shows where the time goes), marked ran."""
        began = time.monotonic()
        getattr(self, "do_" + step.kind.value.replace("-", "_"))(step)
        self.report.step_seconds[step.key] = round(time.monotonic() - began, 2)
        self.report.applied.ran(step)

    def abort(self) -> list[tuple[str, str]]:
        """Undo what the applied steps registered (newest first, by phase)."""
        if len(self.session.undo):
            self.say("undoing this deploy's changes")
        outcomes = self.session.undo.run(self.session.warn)
        self.report.undo = outcomes
        return outcomes

    @property
    def gateway_name(self) -> str:
        return f"{self.t.project}-{GATEWAY}-1"  # Compose's name for the one gateway container

    def commit(self) -> None:
        """Nothing of this deploy is to be undone any more: the journal goes, and the old containers the rolls
        stopped (kept until now so an undo could start them again) are removed."""
        self.session.undo.discard()
        self.committed = True
        if self.retired:
            with shielded():
                try:
                    result = self.run_cmd(dk.remove_containers(tuple(self.retired)), check=False)
                    if not result.ok:
                        self.session.warn(f"removing the old containers failed: {result.err.strip()[:200]}")
                except HealthdeployError as exc:  # stopped and out of the gateway: the next deploy removes them
                    self.session.warn(f"removing the old containers failed: {exc.message}")
            self.retired = []

    # -- steps ----------------------------------------------------------------------------------------
    def do_new_release(self, step: Step) -> None:
        self.run_cmd(fs.mkdirs(self.t.releases, mode=pl.RELEASE_DIR_MODE))
        source = self.t.release_dir(self.previous) if self.previous else ""
        self.session.undo.push(f"remove release {self.release}", fs.remove_tree(self.rdir), FILES)
        self.run_cmd(fs.copy_release(source, self.rdir))
        self.say(f"release {self.release}: started from {self.previous or 'nothing'}")

    def do_export_source(self, step: Step) -> None:
        # Named after the URL without credentials (a new token is the same mirror). Mirrors were once named
        # after the whole URL, and their config holds the token: that one is removed.
        clean = pl.display_url(self.s.app_source)
        mirror = f"{self.t.shared}/git/{pl.sha256(clean.encode())[:16]}.git"
        legacy = f"{self.t.shared}/git/{pl.sha256(self.s.app_source.encode())[:16]}.git"
        self.run_cmd(gitc.git_fetch(self.s.app_source, mirror, self.d.git_commit, legacy if legacy != mirror else ""),
                     timeout=900)
        self.run_cmd(gitc.git_export(mirror, self.d.git_commit, f"{self.rdir}/src"), timeout=900)
        self.say(f"exported {pl.display_url(self.s.app_source)} at {self.d.git_commit[:12]} into the release")

    def do_send_files(self, step: Step) -> None:
        data = pl.tar_of(self.payload.files, step.items, pl.RELEASE_FILE_MODE)
        self.session.host.stream_from_file(fs.extract_tar(self.rdir), io.BytesIO(data))
        self.report.uploaded_bytes += len(data)
        self.report.uploaded_files += len(step.items)
        self.say(f"sent {len(step.items)} file(s), {len(data)} bytes")

    def do_remove_files(self, step: Step) -> None:
        self.run_cmd(fs.remove_paths(self.rdir, step.items))

    def do_write_release(self, step: Step) -> None:
        self.run_cmd(fs.write_file(f"{self.rdir}/{pl.RELEASE_ENV}", self.payload.release_env, "0640"))
        self.run_cmd(fs.write_file(f"{self.rdir}/{pl.MANIFEST}", pl.format_manifest(dict(self.d.files)), "0640"))

    def do_stage_secrets(self, step: Step) -> None:
        data = pl.tar_of(self.payload.secrets, tuple(self.payload.secrets), 0o600)
        command = script(STAGE_SECRETS, self.t.env_dir, self.d.secrets_version, description="stage secrets",
                         intent=("stage-secrets", self.d.secrets_version))
        version_dir = fs.stage_dir(self.t.env_dir, self.d.secrets_version)
        self.session.undo.push(f"remove staged secrets {self.d.secrets_version}", fs.remove_tree(version_dir), FILES)
        self.session.host.stream_from_file(command, io.BytesIO(data))
        self.report.uploaded_bytes += len(data)

    def do_validate(self, step: Step) -> None:
        project, compose_file, env_file = self.compose_files(self.release)
        self.run_cmd(dk.compose_config_check(project, compose_file, env_file))
        if GATEWAY in self.d.services:
            self.run_cmd(fs.mkdirs(f"{self.rdir}/gateway/upstreams", f"{self.rdir}/gateway/tls",
                                   mode=pl.RELEASE_DIR_MODE))
            self.run_cmd(fs.mkdirs(f"{self.t.gateway_dir}/upstreams"))
            self.gateway.ensure_upstream_files(list(self.o.containers), self.release)  # placeholders on a first deploy
            staged = fs.stage_dir(self.t.env_dir, self.d.secrets_version)
            self.run_cmd(fs.mkdirs(f"{staged}/tls", mode="0700"))
        if GATEWAY in self.d.services and "nginx" in step.items:
            self.run_cmd(dk.nginx_check_files(self.s.gateway_image, f"{self.rdir}/gateway",
                                              f"{self.t.gateway_dir}/upstreams", GATEWAY_DIR, f"{GATEWAY_DIR}/nginx.conf",
                                              tls_host=f"{staged}/tls"))
        for line in sandbox_report(self.s):
            self.say(line)

    def do_build(self, step: Step) -> None:
        if step.target != "host":
            # Built once for the whole deploy before any host changed (cli.deploy); here it is only checked.
            missing = [s for s in step.items if self.built is None or s not in self.built.images]
            if missing:
                raise StepFailed(f"{self.t.alias}: {', '.join(missing)} were not built on {step.target}",
                                 "this is a bug in healthdeploy; nothing was switched")
            return
        project, compose_file, env_file = self.compose_files(self.release)
        self.say(f"building images: {', '.join(step.items)}")
        log: list[str] = []
        faults.point("during:build", self.session.host, delay=1.0)
        try:
            self.run_cmd(dk.compose_build(project, compose_file, env_file, step.items), on_line=log.append)
        except RemoteCommandError as exc:
            raise StepFailed(f"{self.t.alias}: image build failed; the live release keeps serving",
                             "\n".join(log[-15:]) or exc.message) from None
        self._read_new_images(step.items)

    def do_ship(self, step: Step) -> None:
        tags = {s: self.d.image_ref(s, self.release) for s in step.items}
        # Registered first: a pull cut half-way may have tagged some; removing a tag this release added is safe
        # (the release is new, so nothing else uses it; docker keeps an image a container still runs).
        repositories = tuple(sorted({self.built.images[s].repository for s in step.items if s in self.built.images}))
        self.session.undo.push(f"remove the images shipped for {self.release}",
                               dk.unship_images(tuple(tags.values()), repositories), FILES)
        self.say(f"shipping {', '.join(step.items)} from {step.target} (only the layers this host lacks)")
        shipped = self.built.ship(self.session.host, step.items, tags, self.say)
        self.report.shipped_bytes += shipped.bytes
        self.report.shipped_seconds += shipped.seconds
        self.say(f"shipped {', '.join(step.items)}: {shipped.bytes:,} bytes in {shipped.seconds:.1f}s "
                 f"({shipped.pulled} pulled, {len(step.items) - shipped.pulled} already here)")
        self._read_new_images(step.items)

    def do_tag(self, step: Step) -> None:
        prefix = image_prefix(self.s, self.t)
        pairs = tuple((f"{prefix}/{s}:{self.previous}", f"{prefix}/{s}:{self.release}") for s in step.items)
        # Registered first, as for a ship: the new tags are this release's alone; the live image keeps its own.
        self.session.undo.push(f"remove the tags added for {self.release}",
                               dk.remove_images(tuple(new for _, new in pairs)), FILES)
        self.run_cmd(dk.tag_images(pairs))
        self._read_new_images(step.items)

    def _read_new_images(self, services) -> None:
        refs = tuple(self.d.image_ref(s, self.release) for s in services)
        ids = parse_image_ids(self.run_cmd(image_ids(refs)).text)
        for service, ref in zip(services, refs):
            self.new_images[service] = ids.get(ref)

    def do_rotate_prepare(self, step: Step) -> None:
        container = self.container_of(step.target)
        old_copy = self._snapshot_version()
        old_file, new = self.version_file(old_copy, step.target), self.version_file(self.d.secrets_version, step.target)
        self.session.undo.push("redis: accept only the old password again",
                               rot.redis_only_password(container, old_file, old_file), SETTINGS)
        self.run_cmd(rot.redis_add_password(container, old_file, new))

    def _snapshot_version(self) -> str:
        """The secrets version live now, staged as a version dir (older deploys installed secrets without one)."""
        version = self.prev_secrets if self.prev_secrets in self.o.secret_versions else "s-before-" + self.release.lower()
        if version not in self.o.secret_versions:
            self.run_cmd(script(SNAPSHOT_SECRETS, self.t.env_dir, version, self.t.gateway_dir,
                                description="keep the current secrets as a version", intent=("snapshot-secrets", version)))
        self.prev_secrets = version
        self.o = _with_version(self.o, version)
        return version

    def do_install_secrets(self, step: Step) -> None:
        had = bool(self.o.secrets)
        previous = self._snapshot_version() if had else ""
        if previous:
            self.session.undo.push(f"reinstall secrets {previous}",
                                   fs.install_secrets(self.t.env_dir, previous, self.t.gateway_dir), SETTINGS)
        self.run_cmd(fs.install_secrets(self.t.env_dir, step.target, self.t.gateway_dir))
        self.say(f"secrets {step.target} installed: {', '.join(step.items)}")

    def do_install_gateway_conf(self, step: Step) -> None:
        source = f"{self.rdir}/gateway/nginx.conf"
        target = f"{self.t.gateway_dir}/nginx.conf"
        self.run_cmd(fs.mkdirs(self.t.gateway_dir, f"{self.t.gateway_dir}/upstreams"))
        if self.previous and self.o.gateway_conf:
            old = f"{self.t.release_dir(self.previous)}/gateway/nginx.conf"
            self.session.undo.push("reinstall the previous gateway config",
                                   script(INSTALL_CONF_AND_RELOAD, old, target, self.gateway_name, f"{GATEWAY_DIR}/nginx.conf",
                                          description="reinstall the gateway config", intent=("install-conf", old, target)),
                                   SETTINGS)
        self.run_cmd(script(INSTALL_FILE, source, target, description="install gateway config",
                            intent=("install-conf", source, target)))

    def do_start(self, step: Step) -> None:
        project, compose_file, env_file = self.compose_files(self.release)
        if GATEWAY in step.items:
            self.run_cmd(fs.mkdirs(f"{self.t.gateway_dir}/upstreams", f"{self.t.gateway_dir}/tls"))
            self.gateway.ensure_upstream_files(self.session.containers(), self.release)
        self.say(f"starting {', '.join(step.items)} ({step.reason})")
        self.run_cmd(dk.compose_up(project, compose_file, env_file, step.items, self.s.start_timeout,
                                   self.environment()))

    def do_recreate(self, step: Step) -> None:
        project, compose_file, env_file = self.compose_files(self.release)
        if self.previous and self.previous != self.release:
            old = self.compose_files(self.previous)
            self.session.undo.push(f"recreate {step.target} as before",
                                   dk.compose_recreate(*old, step.target, self.s.start_timeout), SERVICES)
        self.say(f"recreating {step.target} ({step.reason})")
        self.run_cmd(dk.compose_recreate(project, compose_file, env_file, step.target, self.s.start_timeout,
                                         self.environment()))
        if step.target in APP_SERVICES or step.target == GATEWAY:
            self.gateway.refresh(self.release)

    def do_restart(self, step: Step) -> None:
        ids = tuple(c.id for c in self.o.running(step.target))
        self.run_cmd(dk.restart_containers(ids))

    def do_rotate(self, step: Step) -> None:
        container = self.container_of(step.target)
        setter = {"postgres": rot.postgres_set_password, "mongodb": rot.mongo_set_password}[step.target]
        old = self.prev_secrets
        if old:  # registered first: a command cut mid-way may have changed it (setting the old one again is harmless)
            self.session.undo.push(f"{step.target}: the old password back",
                                   setter(container, self.version_file(old, step.target)), SETTINGS)
        self.run_cmd(setter(container, self.version_file(self.d.secrets_version, step.target)))
        self.say(f"{step.target}: password changed on the running server")

    def do_reload_gateway(self, step: Step) -> None:
        gateway = self.gateway.container()
        if gateway is None:
            raise StepFailed(f"{self.t.alias}: the gateway is not running")
        self.gateway.reload(gateway)
        self.say(f"gateway reloaded ({step.reason})")

    def do_migrate(self, step: Step) -> None:
        project, compose_file, env_file = self.compose_files(self.release)
        self.say(f"migrating: {self.s.migrate_command}")
        log: list[str] = []
        name = f"{project}-migrate-{self.release.lower()}"
        try:
            self.run_cmd(dk.compose_run(project, compose_file, env_file, "backend", self.s.migrate_command,
                                        "database migration", name=name, environment=self.environment()),
                         on_line=log.append)
        except HealthdeployError as exc:
            raise StepFailed(f"{self.t.alias}: migration failed, nothing was switched: {exc.message}",
                             "\n".join(log[-10:])) from None
        self.report.migrated = True

    def do_remove_orphans(self, step: Step) -> None:
        self.run_cmd(dk.remove_containers(step.items))
        self.say(f"{step.target}: removed {', '.join(step.items)} ({step.reason})")

    def do_roll(self, step: Step) -> None:
        service = step.target
        listed = self.session.containers()
        old = [c for c in listed if c.service == service and c.running]
        pending = self.in_roll.pop(service, [])

        def before_switch() -> None:
            for inner in pending:
                self._do(inner)

        def started(new_ids: list[str]) -> None:
            # Journaled as soon as the new containers exist, before any switch: whatever happens from here on
            # (a failure, Ctrl-C, our process killed, the connection gone), the old containers come back.
            if old:
                self.session.undo.push(f"{service} back on its old containers", self.roll_back(service, old, new_ids),
                                       SERVICES)

        roll = ServiceRoll(self.session, self.gateway, service, self.release, self.compose_files(self.release),
                           self.environment(), old, before_switch=before_switch if pending else None, started=started,
                           listed=listed)
        report = roll.run()
        self.report.rolls.append(report)
        self.retired += report.retired

    def roll_back(self, service: str, old: list, new_ids: list[str]):
        return journal.roll_back(self.gateway_name, f"{self.t.gateway_dir}/upstreams/{service}.conf",
                                 UPSTREAM_NAMES[service], APP_PORTS[service], f"{GATEWAY_DIR}/nginx.conf",
                                 self.s.health_timeout, self.previous or self.release, tuple(c.id for c in old),
                                 tuple(new_ids))

    def do_repair_upstreams(self, step: Step) -> None:
        self.say(f"gateway upstreams out of date for {', '.join(step.items)}: repairing")
        self.gateway.refresh(self.release, step.items)

    def do_rotate_finish(self, step: Step) -> None:
        container = self.container_of(step.target)
        new = self.version_file(self.d.secrets_version, step.target)
        old = self.prev_secrets
        if old:
            self.session.undo.push("redis: accept the old password again",
                                   rot.redis_add_password(container, new, self.version_file(old, "redis")), SETTINGS)
        self.run_cmd(rot.redis_only_password(container, new, new))

    def do_switch(self, step: Step) -> None:
        if self.previous:
            previous = self.previous
            self.session.undo.push(f"current back to {previous}",
                                   fs.switch_symlink(self.t.current, f"releases/{previous}"), FILES)
        self.run_cmd(fs.switch_symlink(self.t.current, f"releases/{self.release}"))
        self.say(f"release {self.release} is live")

    def do_record(self, step: Step) -> None:
        write_state(self.session, self.o, step.target, self.d.secrets_version, "deploy")

    def do_prune(self, step: Step) -> None:
        releases = sorted(set(self.o.host.releases) | {self.release})
        keep = set(releases[-self.d.keep_releases:]) | {self.release}
        doomed = [r for r in releases if r not in keep]
        for release in doomed:
            self.run_cmd(fs.remove_tree(self.t.release_dir(release)), check=False)
        if doomed:
            prefix = image_prefix(self.s, self.t)
            refs = tuple(f"{prefix}/{s}:{r}" for r in doomed for s in self.d.app_services)
            self.run_cmd(dk.remove_images(refs), check=False)
            self.say(f"pruned {len(doomed)} old release(s)")
        wanted = {self.d.secrets_version, self.prev_secrets}
        wanted |= {e.get("secrets") for e in self.o.history if e.get("release") in keep}
        self.run_cmd(fs.prune_secret_versions(self.t.env_dir, tuple(sorted(v for v in wanted if v))), check=False)


def _with_version(observed: Observed, version: str) -> Observed:
    from dataclasses import replace

    return replace(observed, secret_versions=tuple(sorted(set(observed.secret_versions) | {version})))


def write_state(session: Session, observed: Observed, release: str, secrets: str, event: str) -> None:
    """shared/state.json: the live release, its secrets version, and the history of what was live (what
    `fab rollback` goes back along)."""
    history = [e for e in observed.history][-(STATE_HISTORY - 1):]
    history.append({"release": release, "secrets": secrets, "at": utc_now(), "event": event})
    state = {"live": release, "secrets": secrets, "history": history}
    session.run(fs.write_file(f"{session.t.shared}/state.json", (json.dumps(state, indent=1) + "\n").encode(), "0644")
                .tagged("state", release, secrets))


# -- rollback ---------------------------------------------------------------------------------------------
def apply_rollback(session: Session, plan: RollbackPlan, observed: Observed) -> tuple[Applied, list[RollReport]]:
    """Run a rollback plan; every step journals its undo first (the caller runs the journal on failure, the
    host's lock holder if we vanish); the old containers are removed only when everything went through."""
    t = session.t
    gateway = Gateway(session)
    gateway_name = f"{t.project}-{GATEWAY}-1"
    applied = Applied()
    reports: list[RollReport] = []
    retired: list[str] = []
    files = (t.project, f"{t.release_dir(plan.target)}/compose.yaml", f"{t.release_dir(plan.target)}/{pl.RELEASE_ENV}")
    environment = {f"ENV_DIGEST_{s.upper().replace('-', '_')}": d for s, d in plan.env_digests.items()}
    live_secrets = (observed.state.get("secrets") or "") if isinstance(observed.state, dict) else ""
    conf = f"{GATEWAY_DIR}/nginx.conf"
    for step in plan.steps:
        if step.kind is StepKind.INSTALL_SECRETS:
            if live_secrets:
                session.undo.push(f"reinstall secrets {live_secrets}",
                                  fs.install_secrets(t.env_dir, live_secrets, t.gateway_dir), SETTINGS)
            session.run(fs.install_secrets(t.env_dir, step.target, t.gateway_dir))
        elif step.kind is StepKind.INSTALL_GATEWAY_CONF:
            target = f"{t.gateway_dir}/nginx.conf"
            old = f"{t.release_dir(plan.previous)}/gateway/nginx.conf"
            session.undo.push("reinstall the gateway config",
                              script(INSTALL_CONF_AND_RELOAD, old, target, gateway_name, conf,
                                     description="reinstall the gateway config", intent=("install-conf", old, target)),
                              SETTINGS)
            source = f"{t.release_dir(plan.target)}/gateway/nginx.conf"
            session.run(script(INSTALL_FILE, source, target, description="install gateway config",
                               intent=("install-conf", source, target)))
        elif step.kind is StepKind.RELOAD_GATEWAY:
            gw = gateway.container()
            if gw:
                gateway.reload(gw)
        elif step.kind is StepKind.ROLL:
            service = step.target
            listed = session.containers()
            old = [c for c in listed if c.service == service and c.running]

            def started(new_ids, service=service, old=old):
                if old:
                    session.undo.push(f"{service} back on its old containers", journal.roll_back(
                        gateway_name, f"{t.gateway_dir}/upstreams/{service}.conf", UPSTREAM_NAMES[service],
                        APP_PORTS[service], conf, session.s.health_timeout, plan.previous, tuple(c.id for c in old),
                        tuple(new_ids)), SERVICES)

            report = ServiceRoll(session, gateway, service, plan.target, files, environment, old, started=started,
                                 listed=listed).run()
            reports.append(report)
            retired += report.retired
        elif step.kind is StepKind.SWITCH:
            session.undo.push(f"current back to {plan.previous}",
                              fs.switch_symlink(t.current, f"releases/{plan.previous}"), FILES)
            session.run(fs.switch_symlink(t.current, f"releases/{plan.target}"))
        elif step.kind is StepKind.RECORD:
            write_state(session, observed, plan.target, plan.secrets_version, "rollback")
        applied.ran(step)
    session.undo.discard()
    if retired:
        with shielded():
            session.run(dk.remove_containers(tuple(retired)), check=False)
    return applied, reports
