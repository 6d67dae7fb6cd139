"""Swarm facts: what the manager knows (nodes, the stack's services and tasks, secrets, configs) and what an
edge or data node has (the gateway's files and container), each read in one round trip, next to its parser.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Mapping

from deploy.commands.base import Command, script
from deploy.facts.files import FILE_HASHES, parse_hashes
from deploy.facts.host import HOST_FACTS, HostFacts
from deploy.facts.lock import LOCK_STATE, LockState, parse_lock
from deploy.facts.observe import split_sections
from deploy.stack.swarm import ImageConfig

STACK_LABEL = "com.docker.stack.namespace"
SERVICE_NAME_LABEL = "com.docker.swarm.service.name"
TASK_LABEL = "com.docker.swarm.task.id"

# $1 deploy path, $2 stack, $3.. image references whose configs the stack file needs.
MANAGER_OBSERVE = ("host_facts() {\n" + HOST_FACTS + "\n}\n"
                   "file_hashes() {\n" + FILE_HASHES + "\n}\n" + LOCK_STATE + r"""
base="$1"; stack="$2"; shift 2
echo "=== host"; host_facts "$base"
echo "=== swarm"; docker info --format '{{json .Swarm}}' 2>/dev/null
echo "=== now"; date -u +%Y-%m-%dT%H:%M:%S.%NZ
echo "=== lock"; lock_state "$base/.lock"; cat "$base/.lock/info.json" 2>/dev/null; echo
current=$(readlink "$base/current" 2>/dev/null)
echo "=== live-files"; [ -n "$current" ] && ( file_hashes "$base/$current" )
echo "=== state"; cat "$base/shared/state.json" 2>/dev/null; echo
echo "=== nodes"; ids=$(docker node ls -q 2>/dev/null); [ -n "$ids" ] && docker node inspect $ids 2>/dev/null
echo "=== services"; ids=$(docker service ls -q --filter "label=com.docker.stack.namespace=$stack" 2>/dev/null)
[ -n "$ids" ] && docker service inspect $ids 2>/dev/null
echo "=== tasks"; ids=$(docker stack ps -q --no-trunc --filter desired-state=running "$stack" 2>/dev/null)
[ -n "$ids" ] && docker inspect $ids 2>/dev/null
echo "=== secrets"; docker secret ls --format '{{.Name}}' 2>/dev/null | grep -F "_" || true
echo "=== configs"; docker config ls --format '{{.Name}}' 2>/dev/null | grep -F "_" || true
echo "=== images"; [ $# -gt 0 ] && docker image inspect "$@" 2>/dev/null
exit 0
""")


def manager_observe(deploy_path: str, stack: str, images: tuple[str, ...] = ()) -> Command:
    return script(MANAGER_OBSERVE, deploy_path, stack, *images, description="observe the swarm", readonly=True,
                  intent=("swarm-observe", stack))


# $1 stack, $2 "nodes" or "", $3.. service names: those services and their tasks (what a wait polls), in
# as few docker calls as possible (a poll runs every second).
SERVICES_AND_TASKS = r"""stack="$1"; with_nodes="$2"; shift 2
names=""; for s in "$@"; do names="$names ${stack}_$s"; done
echo "=== now"; date -u +%Y-%m-%dT%H:%M:%S.%NZ
echo "=== services"; docker service inspect $names 2>/dev/null
echo "=== tasks"; ids=$(docker service ps -q --no-trunc $names 2>/dev/null)
[ -n "$ids" ] && docker inspect $ids 2>/dev/null
echo "=== nodes"; if [ -n "$with_nodes" ]; then ids=$(docker node ls -q 2>/dev/null); [ -n "$ids" ] && docker node inspect $ids 2>/dev/null; fi
exit 0
"""


def services_and_tasks(stack: str, services: tuple[str, ...], nodes: bool = False) -> Command:
    return script(SERVICES_AND_TASKS, stack, "nodes" if nodes else "", *services, description="read services and tasks",
                  readonly=True, intent=("swarm-tasks", stack, *services))


# On an edge node: $1 deploy path, $2 stack, $3.. URLs probed from inside its gateway. Its upstream files,
# its gateway container and the answers, in one round trip (what a deploy's verification repeats).
GATEWAY_CHECK = r"""base="$1"; stack="$2"; shift 2
echo "=== upstreams"; for f in "$base"/shared/gateway/upstreams/*.conf; do [ -f "$f" ] || continue
  echo "--- $(basename "$f" .conf)"; grep -E '^\s*server ' "$f"; done
echo "=== containers"; docker ps --no-trunc --filter "label=com.docker.swarm.service.name=${stack}_gateway" \
  --format '{{.ID}} {{.Names}} {{.Label "com.docker.swarm.service.name"}} {{.Label "com.docker.swarm.task.id"}} {{.State}}'
c=$(docker ps -q --filter "label=com.docker.swarm.service.name=${stack}_gateway" | head -n 1)
echo "=== probes"; [ -n "$c" ] && docker exec "$c" sh -c "$HTTP_GETS" sh 3 "$@"
exit 0
"""


def gateway_check(deploy_path: str, stack: str, urls: tuple[str, ...]) -> Command:
    from deploy.commands.docker import HTTP_GETS

    return script("HTTP_GETS=" + _sh_quote(HTTP_GETS) + "\n" + GATEWAY_CHECK, deploy_path, stack, *urls,
                  description="check the gateway", readonly=True, intent=("gateway-check", stack))


def _sh_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# On an edge or data node: $1 deploy path, $2 stack. The gateway's files, and the containers of the
# stack's tasks running on this node's engine.
NODE_OBSERVE = ("file_hashes() {\n" + FILE_HASHES + "\n}\n" + r"""
base="$1"; stack="$2"
echo "=== host"; echo "docker=$(docker version --format '{{.Server.Version}}' 2>/dev/null)"
echo "=== gateway-files"; ( file_hashes "$base/shared/gateway" nginx.conf tls/cert.pem tls/key.pem )
echo "=== upstreams"; for f in "$base"/shared/gateway/upstreams/*.conf; do [ -f "$f" ] || continue
  echo "--- $(basename "$f" .conf)"; grep -E '^\s*server ' "$f"; done
echo "=== containers"; docker ps --no-trunc --filter "label=com.docker.stack.namespace=$stack" \
  --format '{{.ID}} {{.Names}} {{.Label "com.docker.swarm.service.name"}} {{.Label "com.docker.swarm.task.id"}} {{.State}}'
echo "=== gwbridge"; docker network inspect docker_gwbridge --format '{{range $id, $c := .Containers}}{{$id}} {{$c.IPv4Address}}{{println}}{{end}}' 2>/dev/null
exit 0
""")


def node_observe(deploy_path: str, stack: str) -> Command:
    return script(NODE_OBSERVE, deploy_path, stack, description="observe the node", readonly=True,
                  intent=("node-observe", stack))


# On a node: $1 stack. The containers of the stack's tasks on this node's engine (NODE_OBSERVE's section alone:
# a restore looks its containers up again before each use, a rescheduled task has another name).
TASK_CONTAINERS = r"""docker ps --no-trunc --filter "label=com.docker.stack.namespace=$1" \
  --format '{{.ID}} {{.Names}} {{.Label "com.docker.swarm.service.name"}} {{.Label "com.docker.swarm.task.id"}} {{.State}}'
"""


def task_containers(stack: str) -> Command:
    return script(TASK_CONTAINERS, stack, description="list the stack's task containers", readonly=True,
                  intent=("task-containers", stack))


# -- parsed facts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwarmInfo:
    state: str = ""  # active, inactive, pending, error, locked
    node_id: str = ""
    manager: bool = False  # ControlAvailable: this engine is a manager
    cluster: str = ""
    error: str = ""

    @classmethod
    def parse(cls, text: str) -> "SwarmInfo":
        try:
            data = json.loads(text.strip() or "{}")
        except ValueError:
            return cls()
        return cls(state=data.get("LocalNodeState", ""), node_id=data.get("NodeID", ""),
                   manager=bool(data.get("ControlAvailable")), cluster=(data.get("Cluster") or {}).get("ID", ""),
                   error=data.get("Error", ""))


@dataclass(frozen=True)
class Node:
    id: str
    hostname: str
    role: str  # manager | worker
    state: str  # ready | down | unknown
    availability: str  # active | pause | drain
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    leader: bool = False

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.availability == "active"


def parse_nodes(text: str) -> list[Node]:
    nodes = []
    for item in _json_list(text):
        spec, status = item.get("Spec") or {}, item.get("Status") or {}
        nodes.append(Node(
            id=item.get("ID", ""), hostname=(item.get("Description") or {}).get("Hostname", ""),
            role=spec.get("Role", ""), state=status.get("State", ""), availability=spec.get("Availability", ""),
            address=status.get("Addr", ""), labels=dict(spec.get("Labels") or {}),
            leader=bool((item.get("ManagerStatus") or {}).get("Leader"))))
    return sorted(nodes, key=lambda n: n.hostname)


@dataclass(frozen=True)
class UpdateStatus:
    state: str = ""  # updating, paused, completed, rollback_started, rollback_paused, rollback_completed
    started: str = ""
    completed: str = ""
    message: str = ""


@dataclass(frozen=True)
class Service:
    id: str
    name: str  # <stack>_<service>
    service: str  # the stack's own name of it (backend, postgres, ...)
    labels: Mapping[str, str]
    image: str
    args: tuple[str, ...]
    mode: str  # replicated | global | replicated-job
    replicas: int
    update: UpdateStatus
    has_previous: bool
    created: str = ""
    updated: str = ""

    @property
    def definition(self) -> str:
        return self.labels.get("healthdeploy.definition", "")

    @property
    def release(self) -> str:
        return self.labels.get("healthdeploy.release", "")

    @property
    def updating(self) -> bool:
        return self.update.state in ("updating", "rollback_started")


def parse_services(text: str, stack: str) -> list[Service]:
    services = []
    for item in _json_list(text):
        spec = item.get("Spec") or {}
        labels = dict(spec.get("Labels") or {})
        name = spec.get("Name", "")
        container = ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {})
        mode = spec.get("Mode") or {}
        kind = next(iter(mode), "replicated")
        replicas = int(((mode.get("Replicated") or {}).get("Replicas")) or 0) if kind == "Replicated" else 0
        update = item.get("UpdateStatus") or {}
        services.append(Service(
            id=item.get("ID", ""), name=name, service=name[len(stack) + 1:] if name.startswith(stack + "_") else name,
            labels=labels, image=container.get("Image", ""), args=tuple(container.get("Args") or ()),
            mode=kind.lower().replace("replicatedjob", "replicated-job"), replicas=replicas,
            update=UpdateStatus(update.get("State", ""), update.get("StartedAt", ""), update.get("CompletedAt", ""),
                                update.get("Message", "")),
            has_previous=bool(item.get("PreviousSpec")), created=item.get("CreatedAt", ""),
            updated=item.get("UpdatedAt", "")))
    return sorted(services, key=lambda s: s.name)


@dataclass(frozen=True)
class Task:
    id: str
    service_id: str
    slot: int
    node_id: str
    desired: str  # running | shutdown | ready | complete
    state: str  # new ... running, complete, shutdown, failed, rejected, orphaned
    error: str
    message: str
    timestamp: str
    addresses: tuple[str, ...]  # on the stack's overlay network, without prefix length
    container_id: str
    definition: str  # healthdeploy.definition of its container spec
    image: str
    exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.state == "running" and self.desired == "running"

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "rejected")


def parse_tasks(text: str, network: str = "") -> list[Task]:
    tasks = []
    for item in _json_list(text):
        status = item.get("Status") or {}
        spec = ((item.get("Spec") or {}).get("ContainerSpec") or {})
        addresses = []
        for attachment in item.get("NetworksAttachments") or []:
            net = ((attachment.get("Network") or {}).get("Spec") or {}).get("Name", "")
            if network and net != network:
                continue
            if not network and net == "ingress":
                continue
            addresses += [a.split("/")[0] for a in attachment.get("Addresses") or []]
        container = status.get("ContainerStatus") or {}
        tasks.append(Task(
            id=item.get("ID", ""), service_id=item.get("ServiceID", ""), slot=int(item.get("Slot") or 0),
            node_id=item.get("NodeID", ""), desired=item.get("DesiredState", ""), state=status.get("State", ""),
            error=status.get("Err", ""), message=status.get("Message", ""), timestamp=status.get("Timestamp", ""),
            addresses=tuple(addresses), container_id=container.get("ContainerID", ""),
            definition=(spec.get("Labels") or {}).get("healthdeploy.definition", ""), image=spec.get("Image", ""),
            exit_code=container.get("ExitCode")))
    return sorted(tasks, key=lambda t: (t.service_id, t.slot, t.timestamp))


def parse_image_configs(text: str) -> dict[str, ImageConfig]:
    """ref -> ImageConfig, for every reference (tag or digest) an inspected image is known by."""
    out = {}
    for item in _json_list(text):
        config = ImageConfig.of(item.get("Config") or {})
        for ref in list(item.get("RepoTags") or []) + list(item.get("RepoDigests") or []):
            out[ref] = config
        out[item.get("Id", "")] = config
    return out


def parse_time(text: str) -> _dt.datetime | None:
    """Docker's RFC 3339 times with nanoseconds (Python parses microseconds)."""
    if not text or text.startswith("0001-"):
        return None
    text = text.strip().replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        value = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class ManagerFacts:
    host: HostFacts = field(default_factory=HostFacts)
    swarm: SwarmInfo = field(default_factory=SwarmInfo)
    now: str = ""
    lock: LockState = field(default_factory=lambda: LockState("free", {}))
    live_files: Mapping[str, str] = field(default_factory=dict)
    state: Mapping = field(default_factory=dict)
    nodes: tuple[Node, ...] = ()
    services: tuple[Service, ...] = ()
    tasks: tuple[Task, ...] = ()
    secrets: frozenset[str] = frozenset()
    configs: frozenset[str] = frozenset()
    image_configs: Mapping[str, ImageConfig] = field(default_factory=dict)

    @property
    def current(self) -> str:
        return self.host.current

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.service == name), None)

    def tasks_of(self, name: str) -> list[Task]:
        service = self.service(name)
        return [t for t in self.tasks if service and t.service_id == service.id]

    def node(self, hostname: str) -> Node | None:
        """The node of that hostname (a ready one first: a node that left and joined again is listed twice)."""
        found = [n for n in self.nodes if n.hostname == hostname]
        return next((n for n in found if n.state == "ready"), found[0] if found else None)

    def node_by_id(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)


def parse_manager(text: str, stack: str) -> ManagerFacts:
    s = split_sections(text)
    try:
        state = json.loads(s.get("state", "").strip() or "{}")
    except ValueError:
        state = {}
    return ManagerFacts(
        host=HostFacts.parse(s.get("host", "")), swarm=SwarmInfo.parse(s.get("swarm", "")), now=s.get("now", "").strip(),
        lock=parse_lock(s.get("lock", "")), live_files=parse_hashes(s.get("live-files", "")),
        state=state if isinstance(state, dict) else {},
        nodes=tuple(parse_nodes(s.get("nodes", ""))), services=tuple(parse_services(s.get("services", ""), stack)),
        tasks=tuple(parse_tasks(s.get("tasks", ""), f"{stack}_default")),
        secrets=frozenset(x.strip() for x in s.get("secrets", "").split() if x.strip().startswith(stack + "_")),
        configs=frozenset(x.strip() for x in s.get("configs", "").split() if x.strip().startswith(stack + "_")),
        image_configs=parse_image_configs(s.get("images", "")))


@dataclass(frozen=True)
class TaskContainer:
    id: str
    name: str
    service: str  # <stack>_<service>
    task_id: str
    state: str


@dataclass(frozen=True)
class NodeFacts:
    """An edge or data node as seen over SSH."""

    node: str
    reachable: bool = True
    error: str = ""
    docker: str = ""
    gateway_files: Mapping[str, str] = field(default_factory=dict)  # nginx.conf, tls/*.pem -> sha256
    upstreams: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # service -> "ip:port" primaries
    backups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    containers: tuple[TaskContainer, ...] = ()
    gwbridge: Mapping[str, str] = field(default_factory=dict)  # container id -> address on docker_gwbridge

    def container_of(self, stack_service: str) -> TaskContainer | None:
        return next((c for c in self.containers if c.service == stack_service and c.state == "running"), None)


def parse_task_containers(text: str) -> list[TaskContainer]:
    containers = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5:
            containers.append(TaskContainer(parts[0], parts[1], parts[2], parts[3], parts[4]))
    return containers


def parse_node(node: str, text: str) -> NodeFacts:
    s = split_sections(text)
    upstreams: dict[str, list[str]] = {}
    backups: dict[str, list[str]] = {}
    current = None
    for line in s.get("upstreams", "").splitlines():
        if line.startswith("--- "):
            current = line[4:].strip()
            upstreams[current], backups[current] = [], []
        elif current and line.strip().startswith("server "):
            words = line.split()
            address = words[1].rstrip(";")
            if address.startswith("127.0.0.1:"):
                continue
            (backups if "backup;" in words or "backup" in words else upstreams)[current].append(address)
    containers = parse_task_containers(s.get("containers", ""))
    gwbridge = {}
    for line in s.get("gwbridge", "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            gwbridge[parts[0]] = parts[1].split("/")[0]
    docker = next((l.split("=", 1)[1] for l in s.get("host", "").splitlines() if l.startswith("docker=")), "")
    return NodeFacts(node=node, docker=docker, gateway_files=parse_hashes(s.get("gateway-files", "")),
                     upstreams={k: tuple(sorted(v)) for k, v in upstreams.items()},
                     backups={k: tuple(sorted(v)) for k, v in backups.items()},
                     containers=tuple(containers), gwbridge=gwbridge)


def parse_gateway_check(node: str, text: str) -> tuple[NodeFacts, str]:
    """(the node's upstreams and gateway container, the probes' "ok URL" / "fail URL" lines)."""
    return parse_node(node, text), split_sections(text).get("probes", "")


def parse_tasks_poll(text: str, stack: str) -> tuple[str, list[Service], list[Task], list[Node]]:
    s = split_sections(text)
    return (s.get("now", "").strip(), parse_services(s.get("services", ""), stack),
            parse_tasks(s.get("tasks", ""), f"{stack}_default"), parse_nodes(s.get("nodes", "")))


def parse_job(text: str) -> Task | None:
    tasks = parse_tasks(text)
    return tasks[-1] if tasks else None


def _json_list(text: str) -> list[dict]:
    text = (text or "").strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        # Several JSON arrays one after another (separate inspect calls): join them.
        data = []
        decoder = json.JSONDecoder()
        index = 0
        while index < len(text):
            while index < len(text) and text[index].isspace():
                index += 1
            if index >= len(text):
                break
            try:
                chunk, index = decoder.raw_decode(text, index)
            except ValueError:
                break
            data += chunk if isinstance(chunk, list) else [chunk]
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
