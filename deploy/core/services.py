"""The service topology of the stack, defined once: which services exist, what each listens on, what a
host of each role runs, the order they roll in and what they depend on.

Everything else (settings, rendering, planning, backups, health) asks this module.
"""

from __future__ import annotations

import enum

APP_SERVICES = ("backend", "ai-service", "frontend-web", "frontend-patient")
INFRA_SERVICES = ("postgres", "redis", "influxdb", "mongodb", "qdrant", "emqx", "minio")
GATEWAY = "gateway"
ALL_SERVICES = APP_SERVICES + INFRA_SERVICES + (GATEWAY,)
BACKUPABLE = ("postgres", "influxdb", "mongodb", "minio", "redis", "qdrant")  # what `inv backup` can take
RESTORABLE = ("postgres", "influxdb", "mongodb", "minio")
# Services that write to the data stores: stopped while a restore switches the data under them.
WRITERS = ("backend", "ai-service")

# Resource limits from the report's resource table (cpus, memory); gateway and unlisted ones are modest.
DEFAULT_LIMITS = {
    "backend": ("0.5", "512m"), "ai-service": ("1.0", "1g"), "frontend-web": ("0.1", "64m"),
    "frontend-patient": ("0.1", "64m"), "postgres": ("0.5", "512m"), "redis": ("0.2", "128m"),
    "influxdb": ("0.3", "256m"), "mongodb": ("0.5", "512m"), "qdrant": ("0.5", "512m"),
    "emqx": ("0.5", "512m"), "minio": ("0.5", "512m"), "gateway": ("0.5", "128m"),
}

# Port each application listens on inside its container, and its gateway upstream name.
APP_PORTS = {"backend": 5000, "ai-service": 8001, "frontend-web": 80, "frontend-patient": 80}
UPSTREAM_NAMES = {s: s.replace("-", "_") for s in APP_SERVICES}
# The host port of the gateway site that serves each application (the report's port table).
GATEWAY_PORT_OF = {"frontend-web": 3000, "frontend-patient": 3001, "backend": 5000, "ai-service": 8001}
GATEWAY_PORTS = (3000, 3001, 5000, 8001)
# Roll order: what others depend on goes first.
ROLL_ORDER = ("backend", "ai-service", "frontend-web", "frontend-patient")
INFRA_PORTS = {"postgres": (5432,), "redis": (6379,), "influxdb": (8086,), "mongodb": (27017,),
               "qdrant": (6333,), "emqx": (1883, 18083), "minio": (9000, 9001)}
# What each application service needs of the infrastructure (compose depends_on, when on the same host).
APP_DEPENDS = {
    "backend": ("postgres", "redis", "influxdb", "mongodb", "qdrant", "emqx", "minio"),
    "ai-service": ("qdrant",),
    "frontend-web": ("backend",),
    "frontend-patient": ("backend",),
}


class Role(str, enum.Enum):
    """What a host runs. ``both`` is a single host with the whole stack (and every cell in cells mode)."""

    DATA = "data"
    APP = "app"
    BOTH = "both"

    @property
    def runs_app(self) -> bool:
        return self in (Role.APP, Role.BOTH)

    @property
    def runs_data(self) -> bool:
        return self in (Role.DATA, Role.BOTH)


def services_of(role: Role, enabled_infra: tuple[str, ...]) -> tuple[str, ...]:
    """The services a host of ``role`` runs, in ALL_SERVICES order."""
    wanted: list[str] = []
    if role.runs_app:
        wanted += [*APP_SERVICES, GATEWAY]
    if role.runs_data:
        wanted += list(enabled_infra)
    return tuple(s for s in ALL_SERVICES if s in wanted)


def env_key(service: str) -> str:
    """``ai-service`` -> ``AI_SERVICE`` (settings keys and env variable names)."""
    return service.upper().replace("-", "_")
