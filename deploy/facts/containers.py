"""Container facts: one ``docker inspect`` of every container of a Compose project, parsed."""

from __future__ import annotations

import json
from dataclasses import dataclass

from deploy.commands.base import Command, script

PROJECT_CONTAINERS = (
    'ids=$(docker ps -aq --filter "label=com.docker.compose.project=$1"); '
    'if [ -n "$ids" ]; then docker inspect $ids; else echo "[]"; fi'
)


def project_containers(project: str) -> Command:
    """JSON array of ``docker inspect`` for every container of the project (one round trip)."""
    return script(PROJECT_CONTAINERS, project, description="list containers", readonly=True, intent=("containers",))


def inspect_named(names: tuple[str, ...]) -> Command:
    """JSON array of ``docker inspect`` for the named (or id'd) containers that exist (one CLI call, no listing:
    a roll's wait for its new containers asks about them alone, not the whole project, twice a second)."""
    return script('docker inspect "$@" 2>/dev/null || true', *names, description="inspect containers", readonly=True,
                  intent=("inspect", *names))


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
    definition: str = ""  # healthdeploy.definition label: digest of the service's compose definition
    release: str = ""  # RELEASE_ID in its environment
    nano_cpus: int = 0
    memory: int = 0
    # The image's own health check as Docker runs it (Config.Healthcheck, the image's merged with the service's):
    # healthdeploy runs the same test itself while it waits on a container (deploy/execute/health_now.py).
    health_test: tuple[str, ...] = ()
    health_timeout_s: float = 0.0
    health_start_period_s: float = 0.0
    health_retries: int = 0

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def healthy(self) -> bool:
        return self.running and self.health in ("healthy", "")


def parse_containers(text: str, project: str) -> list[Container]:
    """Parse ``docker inspect`` JSON of a project's containers (one-off `compose run` ones flagged)."""
    items = json.loads(text or "[]")
    containers = []
    for item in items:
        config = item.get("Config") or {}
        labels = config.get("Labels") or {}
        networks = (item.get("NetworkSettings") or {}).get("Networks") or {}
        network = networks.get(f"{project}_default") or next(iter(networks.values()), {})
        state = item.get("State") or {}
        env = dict(e.split("=", 1) for e in (config.get("Env") or []) if "=" in e)
        host_config = item.get("HostConfig") or {}
        check = config.get("Healthcheck") or {}
        containers.append(Container(
            id=item["Id"],
            name=item.get("Name", "").lstrip("/"),
            service=labels.get("com.docker.compose.service", ""),
            state=state.get("Status", ""),
            health=(state.get("Health") or {}).get("Status", ""),
            image_id=item.get("Image", ""),
            image_ref=config.get("Image", ""),
            ip=(network or {}).get("IPAddress", ""),
            created=item.get("Created", ""),
            restart_count=int(item.get("RestartCount") or 0),
            oneoff=labels.get("com.docker.compose.oneoff") == "True",
            env_digest=labels.get("healthdeploy.env-digest", ""),
            started=state.get("StartedAt", ""),
            definition=labels.get("healthdeploy.definition", ""),
            release=env.get("RELEASE_ID", ""),
            nano_cpus=int(host_config.get("NanoCpus") or 0),
            memory=int(host_config.get("Memory") or 0),
            health_test=tuple(check.get("Test") or ()),
            health_timeout_s=int(check.get("Timeout") or 0) / 1e9,
            health_start_period_s=int(check.get("StartPeriod") or 0) / 1e9,
            health_retries=int(check.get("Retries") or 0),
        ))
    return sorted(containers, key=lambda c: (c.service, c.created))


def stack_only(containers: list[Container]) -> list[Container]:
    """Without one-off `compose run` containers (migrations)."""
    return [c for c in containers if not c.oneoff]
