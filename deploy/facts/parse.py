"""Read-only facts: parsers of what the fact commands (``commands.*``, readonly=True) print."""

from __future__ import annotations

import json
from dataclasses import dataclass


def version_tuple(text: str) -> tuple[int, ...]:
    """'20.10.24+dfsg1' -> (20, 10, 24); 'v2.40.3' -> (2, 40, 3)."""
    parts = []
    for piece in text.strip().lstrip("v").split("+")[0].split("-")[0].split("."):
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


def parse_key_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class HostFacts:
    docker: str
    compose: str
    free_mb: int
    current: str
    releases: tuple[str, ...]
    has_bash: bool
    user: str

    @classmethod
    def parse(cls, text: str) -> "HostFacts":
        v = parse_key_values(text)
        try:
            free = int(v.get("free_mb") or 0)
        except ValueError:
            free = 0
        return cls(v.get("docker", ""), v.get("compose", ""), free, v.get("current", ""),
                   tuple(sorted((v.get("releases") or "").split())), bool(v.get("bash")), v.get("user", ""))


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    service: str
    state: str  # running, exited, ...
    health: str  # healthy, unhealthy, starting, or "" when the image has no health check
    image_id: str
    image_ref: str
    ip: str
    created: str
    restart_count: int
    oneoff: bool
    env_digest: str = ""
    started: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:12]


def parse_containers(text: str, project: str) -> list[Container]:
    """Parse ``docker inspect`` JSON of a project's containers (one-off `compose run` ones flagged)."""
    items = json.loads(text or "[]")
    containers = []
    for item in items:
        labels = item.get("Config", {}).get("Labels") or {}
        networks = (item.get("NetworkSettings") or {}).get("Networks") or {}
        network = networks.get(f"{project}_default") or next(iter(networks.values()), {})
        state = item.get("State") or {}
        containers.append(Container(
            id=item["Id"],
            name=item.get("Name", "").lstrip("/"),
            service=labels.get("com.docker.compose.service", ""),
            state=state.get("Status", ""),
            health=(state.get("Health") or {}).get("Status", ""),
            image_id=item.get("Image", ""),
            image_ref=item.get("Config", {}).get("Image", ""),
            ip=(network or {}).get("IPAddress", ""),
            created=item.get("Created", ""),
            restart_count=int(item.get("RestartCount") or 0),
            oneoff=labels.get("com.docker.compose.oneoff") == "True",
            env_digest=labels.get("healthdeploy.env-digest", ""),
            started=state.get("StartedAt", ""),
        ))
    return sorted(containers, key=lambda c: (c.service, c.created))


def stack_containers(host, project: str) -> list[Container]:
    """The project's containers on ``host`` (an executor), without one-off `compose run` containers."""
    from deploy.commands.docker import project_containers

    return [c for c in parse_containers(host.run(project_containers(project)).text, project) if not c.oneoff]


def parse_image_ids(text: str) -> dict[str, str | None]:
    ids = {}
    for line in text.splitlines():
        ref, _, image_id = line.partition(" ")
        if ref:
            ids[ref] = None if image_id.strip() in ("", "-") else image_id.strip()
    return ids


def parse_hashes(text: str) -> dict[str, str]:
    hashes = {}
    for line in text.splitlines():
        digest, _, path = line.partition(" ")
        path = path.strip().lstrip("*")
        if digest and path:
            hashes[path] = digest
    return hashes


@dataclass(frozen=True)
class LockState:
    state: str  # free, held, stale
    info: dict

    def describe(self) -> str:
        if self.state == "free":
            return "free"
        i = self.info
        who = f"{i.get('who', '?')} since {i.get('since', '?')} for release {i.get('release', '?')} (pid {i.get('pid', '?')} on {i.get('machine', '?')})"
        return f"{self.state}: {who}"


def parse_lock(text: str) -> LockState:
    first, _, rest = text.strip().partition("\n")
    try:
        info = json.loads(rest) if rest.strip() else {}
    except json.JSONDecodeError:
        info = {}
    return LockState(first.strip() or "free", info)


def parse_published_port(text: str) -> tuple[str, int] | None:
    """``docker port`` output -> the address to reach from the host itself (loopback preferred)."""
    best = None
    for line in text.splitlines():
        address, _, port = line.strip().rpartition(":")
        if not port.isdigit():
            continue
        address = address.strip("[]")
        if address in ("0.0.0.0", "127.0.0.1", ""):
            return "127.0.0.1", int(port)
        if address in ("::", "::1"):
            best = best or ("::1", int(port))
        else:
            best = best or (address, int(port))
    return best
