"""``plan_swarm(desired, observed) -> SwarmPlan``: pure. What a deploy to a Swarm stack does, and why.

``SwarmDesired`` comes from settings and source (hashes and names, no secret); ``SwarmObserved`` from the
manager (nodes, the stack's services and tasks, secrets, configs, its release directory) and from every
edge node over SSH (the gateway's files). Each service's definition digest (deploy/stack/swarm.py) decides
whether it is updated; the plan never touches a service whose digest matches, so an application change
never restarts the data layer.

Order (each step waits for what it started before the next begins):
node labels -> release files on the manager -> secrets and configs (new names only) -> build once + push
(by digest) -> gateway files on each edge node -> data layer (stop-first, waited for) -> migration as a
one-off task on the stack's network -> the stack (stateless services start-first; Swarm's update_config
rolls a failing service back, healthdeploy then the whole stack) -> verify through every gateway ->
`current` -> record -> prune.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from deploy.core.errors import ExitCode, HealthdeployError
from deploy.core.services import APP_SERVICES, GATEWAY
from deploy.facts.host import version_tuple
from deploy.facts.swarm import ManagerFacts, NodeFacts
from deploy.plan.deploy import compose_release_in
from deploy.plan.steps import Step, StepKind
from deploy.stack import payload as pl

MIN_DOCKER = (20, 10)  # replicated jobs (the migration) need API 1.41
LABEL_PREFIX = "healthdeploy."
ROLE_LABELS = {"data": "healthdeploy.data", "app": "healthdeploy.app", "edge": "healthdeploy.edge"}
STACK_FILES = pl.SWARM_STACK_FILES  # written at apply time (image digests): not change detection


class SwarmPreflightError(HealthdeployError):
    exit_code = ExitCode.PREFLIGHT


@dataclass(frozen=True)
class SwarmDesired:
    env: str
    stack: str
    manager: str
    release: str
    files: Mapping[str, str]  # the release payload on the manager: path -> sha256
    services: tuple[str, ...]
    definitions: Mapping[str, str]  # service -> digest of its Swarm definition
    image_inputs: Mapping[str, str]  # application service -> digest of what its image is built from
    secrets: Mapping[str, str]  # service -> Swarm secret name of its secret half
    configs: tuple[str, ...]  # healthdeploy's configs (task entrypoint, gateway sync)
    node_roles: Mapping[str, frozenset[str]]
    gateway_files: Mapping[str, str]  # what each edge node's gateway directory holds: nginx.conf, tls/*.pem
    data_images: tuple[str, ...] = ()  # images the stack file needs the entrypoint and command of
    migrate: bool = True
    registry_login: bool = False
    git_commit: str = ""
    min_free_mb: int = 0
    keep_releases: int = 5

    @property
    def apps(self) -> tuple[str, ...]:
        return tuple(s for s in self.services if s in APP_SERVICES)

    @property
    def infra(self) -> tuple[str, ...]:
        return tuple(s for s in self.services if s not in APP_SERVICES and s != GATEWAY)

    @property
    def data_node(self) -> str:
        return next((n for n, r in self.node_roles.items() if "data" in r), "")

    @property
    def edge_nodes(self) -> tuple[str, ...]:
        return tuple(n for n, r in self.node_roles.items() if "edge" in r)

    @property
    def app_nodes(self) -> tuple[str, ...]:
        return tuple(n for n, r in self.node_roles.items() if "app" in r)


@dataclass(frozen=True)
class SwarmObserved:
    manager: ManagerFacts
    nodes: Mapping[str, NodeFacts] = field(default_factory=dict)  # edge (and data) nodes over SSH


@dataclass(frozen=True)
class SwarmPlan:
    host: str  # the manager
    stack: str
    action: str  # unchanged | deploy
    release: str
    previous: str
    steps: tuple[Step, ...] = ()
    notes: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    lock: str = "free"
    changes: Mapping[str, str] = field(default_factory=dict)  # service -> why it is created or updated

    def has(self, kind: StepKind, target: str | None = None) -> bool:
        return any(s.kind is kind and (target is None or s.target == target) for s in self.steps)

    def step(self, kind: StepKind, target: str | None = None) -> Step | None:
        return next((s for s in self.steps if s.kind is kind and (target is None or s.target == target)), None)

    @property
    def builds(self) -> tuple[str, ...]:
        step = self.step(StepKind.BUILD)
        return step.items if step else ()

    @property
    def migrates(self) -> bool:
        return self.has(StepKind.MIGRATE)

    @property
    def rolls(self) -> tuple[str, ...]:
        return tuple(self.changes)

    def to_json(self) -> dict:
        return {"host": self.host, "stack": self.stack, "action": self.action, "release": self.release,
                "previous": self.previous, "lock": self.lock, "steps": [s.to_json() for s in self.steps],
                "changes": dict(self.changes), "notes": list(self.notes)}


# -- preflight ------------------------------------------------------------------------------------------
def swarm_preflight_problems(desired: SwarmDesired, observed: SwarmObserved) -> list[str]:
    """What makes a deploy unsafe to start; read-only facts only, before any lock or change."""
    m = observed.manager
    problems = []
    if not m.host.docker:
        problems.append(f"{desired.manager}: Docker is not installed or not running")
    elif version_tuple(m.host.docker) < MIN_DOCKER:
        problems.append(f"{desired.manager}: Docker {m.host.docker} is older than {'.'.join(map(str, MIN_DOCKER))}")
    if m.swarm.state != "active":
        problems.append(f"{desired.manager} is not in a swarm (Swarm: {m.swarm.state or 'unknown'})")
    elif not m.swarm.manager:
        problems.append(f"{desired.manager} is not a Swarm manager (HOSTS must name manager nodes)")
    if not m.host.has_bash:
        problems.append(f"{desired.manager}: bash is missing (needed for checksummed streams)")
    if m.host.free_mb < desired.min_free_mb:
        problems.append(f"{desired.manager}: only {m.host.free_mb} MB free, MIN_FREE_DISK_MB is {desired.min_free_mb}")
    if compose_release_in(m.live_files):
        # A Compose deploy's release under the same path: its project and volumes are not this stack's.
        problems.append(f"{desired.manager}: its DEPLOY_PATH holds a TARGET=compose release, not one of this stack: "
                        "give this environment a DEPLOY_PATH of its own")
    if m.swarm.manager:
        for name, roles in desired.node_roles.items():
            node = m.node(name)
            if node is None:
                problems.append(f"SWARM_NODES names {name}, which is not a node of this swarm "
                                f"(nodes: {', '.join(n.hostname for n in m.nodes) or 'none'})")
            elif not node.ready and ("data" in roles or "edge" in roles):
                problems.append(f"{name} ({'+'.join(sorted(roles))}) is {node.state}/{node.availability}: "
                                "its services cannot run there")
        if desired.app_nodes and not any((m.node(n) and m.node(n).ready) for n in desired.app_nodes):
            problems.append(f"no app node is ready ({', '.join(desired.app_nodes)})")
        problems += moved_data(desired, m)
    for name in desired.edge_nodes:
        facts = observed.nodes.get(name)
        if facts is None or not facts.reachable:
            problems.append(f"edge node {name} is not reachable over SSH"
                            + (f" ({facts.error})" if facts is not None and facts.error else "")
                            + ": its gateway's files cannot be written")
    return problems


def moved_data(desired: SwarmDesired, m: ManagerFacts) -> list[str]:
    """A stateful task running on another node than the data node: its volume is there, not on the new one.
    healthdeploy never moves data between nodes (an empty database would start on the new one)."""
    problems = []
    for service in desired.infra:
        for task in m.tasks_of(service):
            node = m.node_by_id(task.node_id)
            if task.running and node is not None and node.hostname != desired.data_node:
                problems.append(f"{service} runs on {node.hostname}, but SWARM_NODES makes {desired.data_node or 'no node'} "
                                f"the data node: its data is on {node.hostname}; back it up, restore it onto the new "
                                "data node after a deploy there (docs/swarm.md), or keep the data node")
    return problems


# -- the planner ----------------------------------------------------------------------------------------
def label_changes(desired: SwarmDesired, m: ManagerFacts) -> list[tuple[str, str, dict[str, str], tuple[str, ...]]]:
    """(hostname, node id, labels to add, labels to remove) for each node whose healthdeploy labels differ. A
    down entry of a hostname that also has a ready one (a node that left and joined again) is left alone."""
    out = []
    ready = {n.hostname for n in m.nodes if n.state == "ready"}
    for node in m.nodes:
        if node.state != "ready" and node.hostname in ready:
            continue
        roles = desired.node_roles.get(node.hostname, frozenset())
        wanted = {ROLE_LABELS[r]: "true" for r in roles}
        have = {k: v for k, v in node.labels.items() if k in ROLE_LABELS.values()}
        add = {k: v for k, v in wanted.items() if have.get(k) != v}
        remove = tuple(sorted(k for k in have if k not in wanted))
        if add or remove:
            out.append((node.hostname, node.id, add, remove))
    return out


def service_changes(desired: SwarmDesired, m: ManagerFacts, build: tuple[str, ...]) -> dict[str, str]:
    """service -> why it is created or updated (only those whose definition differs)."""
    changes = {}
    for service in desired.services:
        live = m.service(service)
        if live is None:
            changes[service] = "created"
        elif live.definition != desired.definitions.get(service):
            changes[service] = "source changed" if service in build else "definition changed"
        elif live.update.state in ("paused", "rollback_paused"):
            changes[service] = f"its last update is {live.update.state.replace('_', ' ')}"
    return changes


def plan_swarm(desired: SwarmDesired, observed: SwarmObserved) -> SwarmPlan:
    d, m = desired, observed.manager
    steps: list[Step] = []
    notes: list[str] = []

    def add(kind: StepKind, target: str = "", reason: str = "", items=(), condition: str = "") -> None:
        steps.append(Step(kind, target, reason, tuple(items), condition))

    current = m.current
    live_files = {p: h for p, h in m.live_files.items() if p not in (pl.MANIFEST, pl.RELEASE_ENV, *STACK_FILES)}
    change = pl.diff(dict(d.files), live_files) if current else pl.diff(dict(d.files), {})

    # -- images: built once (on the manager) where what they are built from changed ------------------------
    build = []
    for service in d.apps:
        live = m.service(service)
        inputs = live.labels.get("healthdeploy.image-inputs", "") if live else ""
        if live is None or inputs != d.image_inputs.get(service) or "@sha256:" not in live.image:
            build.append(service)
    build_t = tuple(build)
    changes = service_changes(d, m, build_t)
    labels = label_changes(d, m)
    missing_secrets = tuple(sorted(n for n in d.secrets.values() if n not in m.secrets))
    missing_configs = tuple(sorted(n for n in d.configs if n not in m.configs))
    edge_updates = {}
    for node in d.edge_nodes:
        facts = observed.nodes.get(node)
        have = dict(facts.gateway_files) if facts is not None else {}
        differ = sorted(p for p, h in d.gateway_files.items() if have.get(p) != h)
        stale = sorted(p for p in have if p.startswith("tls/") and p not in d.gateway_files)
        if differ or stale:
            edge_updates[node] = ("first gateway config" if "nginx.conf" not in have else
                                  ", ".join(differ + [f"{p} (removed)" for p in stale]) + " changed")
    pulls = tuple(sorted(r for r in d.data_images if r not in m.image_configs))

    crowded = crowded_services(d, m)
    if not (changes or labels or missing_secrets or missing_configs or edge_updates or not change.empty
            or not current):
        notes += convergence_notes(d, m)
        if crowded:  # after a node came back, Swarm leaves the tasks where they were rescheduled
            add(StepKind.REBALANCE, "", "one node's failure would take all of their tasks",
                [f"{s}: {n}" for s, n in crowded.items()])
            add(StepKind.VERIFY, d.stack, "every edge gateway lists the healthy tasks and answers", d.edge_nodes)
            return SwarmPlan(d.manager, d.stack, "converge", current, current, tuple(steps), tuple(notes), (),
                             m.lock.state, {})
        return SwarmPlan(d.manager, d.stack, "unchanged", current, current, (), tuple(notes), (), m.lock.state, {})

    release = d.release
    # -- node labels -------------------------------------------------------------------------------------
    if labels:
        add(StepKind.LABEL_NODES, "", "SWARM_NODES", [
            f"{n}: " + " ".join([f"+{k.removeprefix(LABEL_PREFIX)}" for k in sorted(a)] +
                                [f"-{k.removeprefix(LABEL_PREFIX)}" for k in r]) for n, _, a, r in labels])
    # -- the release on the manager -----------------------------------------------------------------------
    add(StepKind.NEW_RELEASE, release, f"copy of {current}" if current else "first release")
    sent = list(change.changed)
    if pl.SOURCE_FILE in change.changed and d.git_commit:
        add(StepKind.EXPORT_SOURCE, d.git_commit[:12], "the git commit changed")
        sent = sorted(set(sent) | {p for p in d.files if p.startswith("src/")})
    files = tuple((p, "changed" if p in live_files else "new") for p in sent)
    if sent:
        add(StepKind.SEND_FILES, "", f"{len(sent)} file(s)", sent)
    if current and change.removed:
        add(StepKind.REMOVE_FILES, "", "not in this release", change.removed)
    add(StepKind.WRITE_RELEASE, release, "MANIFEST and release.env")
    # -- Swarm objects named by their content -------------------------------------------------------------
    if missing_secrets:
        rotated = [s for s, n in d.secrets.items() if n in missing_secrets and any(
            x.startswith(f"{d.stack}_{s}-env.") for x in m.secrets)]
        add(StepKind.CREATE_SECRETS, "", ("rotated: " + ", ".join(rotated)) if rotated else "new secret halves",
            missing_secrets)
    if missing_configs:
        add(StepKind.CREATE_CONFIGS, "", "healthdeploy's task entrypoint and gateway sync", missing_configs)
    # -- images ---------------------------------------------------------------------------------------------
    if d.registry_login and (build_t or changes):
        add(StepKind.REGISTRY_LOGIN, "", "push and pull with REGISTRY_USER (password on stdin)")
    if build_t:
        add(StepKind.BUILD, release, "first release" if not current else "source changed", build_t)
    if pulls:
        add(StepKind.PULL, "", "to read their entrypoint and command", pulls)
    add(StepKind.VALIDATE, release, "docker stack config of the rendered stack file")
    # -- gateway files on each edge node --------------------------------------------------------------------
    for node, why in edge_updates.items():
        add(StepKind.INSTALL_GATEWAY_CONF, node, why)
    # -- data layer, migration, stack -----------------------------------------------------------------------
    data_changes = {s: r for s, r in changes.items() if s in d.infra}
    if data_changes:
        add(StepKind.DEPLOY_DATA, d.stack, "stop-first, pinned to " + d.data_node,
            [f"{s}: {r}" for s, r in data_changes.items()])
    if d.migrate and "backend" in build_t:
        add(StepKind.MIGRATE, "backend", "new backend image" if current else "first release")
    rest = {s: r for s, r in changes.items() if s not in d.infra}
    if rest or not current:
        add(StepKind.DEPLOY_STACK, d.stack, "start-first, rolled back as a whole on a failure",
            [f"{s}: {r}" for s, r in rest.items()])
    elif changes:
        notes.append("only the data layer changes")
    add(StepKind.VERIFY, d.stack, "every edge gateway lists the healthy tasks and answers", d.edge_nodes)
    add(StepKind.SWITCH, release, f"from {current}" if current else "first release")
    add(StepKind.RECORD, release, "live release")
    add(StepKind.PRUNE, "", f"keep {d.keep_releases} release(s); secrets and configs no kept release names")
    unchanged_data = [s for s in d.infra if s not in changes]
    if unchanged_data and rest:
        notes.append(f"not touched: {', '.join(unchanged_data)} (definition unchanged)")
    notes += convergence_notes(d, m)
    return SwarmPlan(d.manager, d.stack, "deploy", release, current, tuple(steps), tuple(notes), files,
                     m.lock.state, changes)


def crowded_services(d: SwarmDesired, m: ManagerFacts) -> dict[str, str]:
    """Stateless services whose running tasks sit on fewer app nodes than they could (service -> where)."""
    ready = {n.id for n in m.nodes if n.ready and n.labels.get(ROLE_LABELS["app"]) == "true"}
    out = {}
    for service in d.apps:
        live = m.service(service)
        if live is None or live.mode != "replicated" or live.replicas < 2:
            continue
        running = [t for t in m.tasks_of(service) if t.running]
        hosting = {t.node_id for t in running}
        if len(running) >= live.replicas and len(hosting) < min(live.replicas, len(ready)):
            names = sorted({(m.node_by_id(t.node_id).hostname if m.node_by_id(t.node_id) else t.node_id) for t in running})
            out[service] = f"{len(running)} task(s) on {', '.join(names)}"
    return out


def convergence_notes(d: SwarmDesired, m: ManagerFacts) -> list[str]:
    """What runs degraded (Swarm reconciles it itself; a deploy does not hide it)."""
    notes = []
    for service in d.services:
        live = m.service(service)
        if live is None:
            continue
        running = [t for t in m.tasks_of(service) if t.running]
        if live.mode == "replicated" and len(running) < live.replicas:
            notes.append(f"{service}: {len(running)}/{live.replicas} task(s) running")
    return notes


# -- desired, from settings and source (locally, before connecting) -------------------------------------------
@dataclass(frozen=True)
class SwarmPayload:
    files: dict[str, bytes]  # the release's files on the manager
    secrets: dict[str, bytes]  # Swarm secret name -> its content (a service's secret half)
    secret_services: dict[str, str]  # Swarm secret name -> service
    configs: dict[str, bytes]  # Swarm config name -> content
    gateway_files: dict[str, bytes]  # nginx.conf, tls/*.pem for each edge node
    release_env: bytes


def swarm_desired_for(settings, target, source_files: dict[str, bytes], release: str, git_commit: str = ""):
    from deploy.stack import swarm as sw

    files = sw.release_files(settings, target, source_files)
    manifest = pl.manifest_of(files)
    services = sw.stack_services(settings)
    apps = tuple(s for s in services if s in APP_SERVICES)
    inputs = pl.image_inputs(manifest, apps, settings.stack_variant)
    halves = sw.secret_halves(settings, target)
    names = sw.secret_names(settings, target)
    gateway = sw.gateway_files(settings)
    data_images = tuple(sorted({getattr(settings, f"{s.replace('-', '_')}_image") for s in services
                                if s not in APP_SERVICES and s != GATEWAY}))
    desired = SwarmDesired(
        env=settings.env_name, stack=settings.stack_name, manager=target.alias, release=release, files=manifest,
        services=services, definitions=sw.stack_definitions(settings, target, inputs), image_inputs=inputs,
        secrets=names, configs=tuple(sorted(sw.config_names(settings).values())), node_roles=settings.swarm_roles(),
        gateway_files={p: pl.sha256(d) for p, d in gateway.items()}, data_images=data_images,
        migrate=bool(settings.migrate_command) and "backend" in apps, registry_login=bool(settings.registry_user),
        git_commit=git_commit, min_free_mb=settings.min_free_disk_mb, keep_releases=settings.keep_releases)
    payload = SwarmPayload(
        files=files, secrets={names[s]: data for s, data in halves.items()},
        secret_services={names[s]: s for s in halves}, configs=sw.config_contents(settings), gateway_files=gateway,
        release_env=(f"RELEASE_ID={release}\nSTACK={settings.stack_name}\n").encode())
    return desired, payload
