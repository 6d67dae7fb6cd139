"""Per-environment settings: ``env/<name>.env`` -> one frozen, typed ``Settings`` object.

Files are read with python-dotenv (``dotenv_values``), never into ``os.environ``. Every problem is
collected and reported together, each naming its key and a hint, before anything connects anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from deploy.core.errors import Problem, SettingsError, UsageError
from deploy.core.secret import Secret

PROJECT_ROOT = Path(os.environ.get("HEALTHDEPLOY_HOME") or Path(__file__).resolve().parents[2])

# Values shipped in the deployment report's examples: refused for production secrets.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "redis123", "admin123", "postgres", "password", "123456", "minioadmin", "minio123",
        "emqx123", "public", "mongo123", "influx123", "admin", "secret", "changeme", "change-me",
        "your-secret-key", "your_jwt_secret", "your-jwt-secret", "jwt_secret", "my-super-secret-auth-token",
        "your_deepseek_api_key", "sk-xxx", "health123", "sandbox",
    }
)

from deploy.core.services import (ALL_SERVICES, APP_SERVICES, BACKUPABLE, DEFAULT_LIMITS, INFRA_SERVICES,  # noqa: F401
                                  Role, env_key as _env_key)


@dataclass(frozen=True)
class Key:
    """One documented setting. ``kind``: str, int, float, bool, list, secret, choice, path."""

    name: str
    kind: str = "str"
    default: Any = None
    doc: str = ""
    choices: tuple[str, ...] = ()
    required: bool = False
    # Secrets required (and refused when equal to a report default) in production.
    production_secret: bool = False
    # The service that needs the key; when that service is disabled the key is not required.
    service: str | None = None

    @property
    def attr(self) -> str:
        return self.name.lower()


SCHEMA: tuple[Key, ...] = (
    # -- where and how to connect -----------------------------------------------------------------
    Key("ENV_KIND", "choice", "production", "production | staging | sandbox. Production refuses missing or example secrets.",
        choices=("production", "staging", "sandbox")),
    Key("HOSTS", "list", None, "Comma-separated SSH host aliases (resolved through SSH_CONFIG).", required=True),
    Key("PRIMARY_HOST", "str", "", "Host that runs migrations once per deploy (default: the first application host)."),
    Key("BATCH_SIZE", "int", 1, "How many application hosts a deploy updates at a time."),
    Key("TOPOLOGY", "choice", "shared", "shared: one data layer (data hosts) for every application host; cells: every host "
        "keeps its own data (one clinic per host): migrations, backups and restores then act on every host.",
        choices=("shared", "cells")),
    Key("ROLES", "list", (), "Role of each host with TOPOLOGY=shared and several hosts: host=data, host=app or host=both "
        "(e.g. db1=data,web1=app,web2=app). A single host runs everything (both)."),
    Key("DATA_ADDRESS", "str", "", "Private address the application hosts reach the data host on (default: its SSH "
        "HostName). The data host publishes its databases on this address only; it must not be a public address."),
    Key("SSH_CONFIG", "path", "~/.ssh/config", "OpenSSH client config honoured for HostName, Port, User, IdentityFile."),
    Key("SSH_KNOWN_HOSTS", "path", "~/.ssh/known_hosts", "known_hosts used for strict host key checking."),
    Key("SSH_CONNECT_TIMEOUT", "int", 10, "Seconds to wait for the SSH connection."),
    # -- target: Compose per host, or one Docker Swarm stack ------------------------------------------
    Key("TARGET", "choice", "compose", "compose: one Compose project per host of HOSTS; swarm: one Docker Swarm stack, "
        "HOSTS being its manager nodes (see docs/swarm.md).", choices=("compose", "swarm")),
    Key("SWARM_NODES", "list", (), "TARGET=swarm: every Swarm node healthdeploy places services on, by hostname, with its "
        "roles joined by +: data (the stateful services, exactly one node), app (stateless services), edge (the gateway, "
        "publishing its ports in host mode), e.g. node1=data,node2=app+edge,node3=app+edge. healthdeploy sets these as "
        "node labels (healthdeploy.data/app/edge=true) and checks them. Data and edge nodes are reached over SSH by that "
        "name (an alias in SSH_CONFIG)."),
    Key("SWARM_STACK", "str", "healthdeploy-{env}", "TARGET=swarm: the stack name ({env} expanded)."),
    Key("SWARM_SUBNET", "str", "", "TARGET=swarm: the subnet of the stack's overlay network (an explicit private range "
        "that no node uses, never Docker's default pool), e.g. 10.252.0.0/24."),
    Key("SWARM_REPLICAS", "int", 2, "TARGET=swarm: tasks of each stateless service (spread over the app nodes)."),
    Key("SWARM_PARALLELISM", "int", 1, "TARGET=swarm: tasks of a stateless service replaced at a time (each new one "
        "starts before its old one stops, so more is faster and still drops nothing, at the cost of that many extra "
        "tasks during the update)."),
    Key("SWARM_MONITOR", "float", 10.0, "TARGET=swarm: seconds Swarm watches each updated task before it counts the update "
        "as good (update_config.monitor); a task failing meanwhile rolls the service back."),
    Key("REGISTRY", "str", "", "TARGET=swarm: registry and repository prefix the built images are pushed to and deployed "
        "from by digest, e.g. registry.example.com/health (every node must be able to pull from it)."),
    Key("REGISTRY_USER", "str", "", "TARGET=swarm: registry user; with REGISTRY_PASSWORD the manager logs in "
        "(password on stdin) and passes the credentials to the nodes (--with-registry-auth)."),
    Key("REGISTRY_PASSWORD", "secret", None, "TARGET=swarm: password or token of REGISTRY_USER."),
    # -- layout on the host -----------------------------------------------------------------------
    Key("DEPLOY_PATH", "str", "/srv/healthdeploy/{env}", "Base directory on the host; {env}, {host} and {address} are expanded."),
    Key("COMPOSE_PROJECT", "str", "healthdeploy-{env}", "Compose project name; {env}, {host} and {address} are expanded."),
    Key("KEEP_RELEASES", "int", 5, "Releases kept on each host (the live one is never removed)."),
    Key("STACK_VARIANT", "choice", "production", "production builds the real application; sandbox builds the sample app from local images.",
        choices=("production", "sandbox")),
    Key("DISABLED_SERVICES", "list", (), "Infrastructure services left out of the stack (e.g. mongodb,qdrant in the sandbox)."),
    Key("APP_SOURCE", "str", "", "Application source: a local directory streamed up as an archive, or a git URL fetched on the host."),
    Key("APP_REF", "str", "main", "Git ref to deploy when APP_SOURCE is a git URL."),
    Key("DEPLOY_ALLOW", "list", (), "Files of a local APP_SOURCE that look like secrets (.env*, *.pem, *.key, private "
        "keys, keystores, cloud credentials, .npmrc with a token, ...) but are shipped on purpose: paths or globs, "
        "gitignore syntax, relative to APP_SOURCE (e.g. certs/public-ca.pem,config/*.key). Without it such a file "
        "stops the deploy before connecting unless .deployignore in APP_SOURCE leaves it out (docs/security.md)."),
    # -- where images are built (docs/build.md) --------------------------------------------------
    Key("BUILD_ON", "str", "", "Where the application images are built: host (each host builds its own, next to its "
        "live traffic), operator (this machine, once per deploy) or the SSH alias of a build host (once per deploy). "
        "Built off the host, images reach each host over its SSH connection from a registry healthdeploy runs on this "
        "machine: only the layers the host lacks, gzip-compressed. Default: host for ENV_KIND=sandbox, operator otherwise."),
    Key("BUILD_CACHE", "path", "~/.cache/healthdeploy", "On this machine, with BUILD_ON other than host: the shipping "
        "registry's storage (registry/<env>) and the build contexts of BUILD_ON=operator."),
    Key("BUILD_HOST_PATH", "str", "/var/tmp/healthdeploy-build/{env}", "On a build host: where each deploy's build "
        "context is unpacked (removed after the build; {env} is expanded)."),
    # -- deploy behaviour -------------------------------------------------------------------------
    Key("MIN_FREE_DISK_MB", "int", 2048, "Preflight refuses a host with less free disk under DEPLOY_PATH."),
    Key("HEALTH_TIMEOUT", "int", 120, "Seconds new containers get to become healthy before rollback."),
    Key("START_TIMEOUT", "int", 300, "Seconds a service that was not running (a database's first start initialises its "
        "data; a restart may replay its log) or is recreated gets to become healthy before the deploy is undone."),
    Key("DRAIN_SECONDS", "float", 2.0, "Seconds old containers stay in the gateway as a fallback after the switch."),
    Key("DRAIN_LIMIT", "float", 30.0, "Seconds a roll waits for connections still open to the old containers (slow "
        "requests, WebSockets) before it stops them; those still open then are counted and closed."),
    Key("MIGRATE_COMMAND", "str", "pnpm prisma migrate deploy", "Run once per deploy in a new backend container before any traffic moves."),
    # -- gateway and ports ------------------------------------------------------------------------
    Key("GATEWAY_BIND", "str", "0.0.0.0", "Address the gateway publishes ports 3000, 3001, 5000, 8001 on; {address} = the host's address."),
    Key("PUBLISH_INFRA", "choice", "loopback", "Publish database/broker ports: none, loopback (127.0.0.1) or all (0.0.0.0, not recommended). With none, MinIO's S3 API and Qdrant's HTTP API still get an ephemeral port on 127.0.0.1 for backups through the SSH tunnel.",
        choices=("none", "loopback", "all")),
    Key("SERVER_NAMES", "list", ("_",), "Host names the gateway answers to (TLS certificates must cover them)."),
    Key("TLS_CERT_FILE", "path", "", "Local PEM certificate chain; when set with TLS_KEY_FILE the gateway terminates TLS on 443."),
    Key("TLS_KEY_FILE", "path", "", "Local PEM private key for TLS_CERT_FILE (synced with mode 0600)."),
    # -- images (pin them; a digest is best) ------------------------------------------------------
    Key("NODE_IMAGE", "str", "node:18-alpine", "Base image of the NestJS and frontend build stages."),
    Key("PYTHON_IMAGE", "str", "python:3.11-alpine", "Base image of ai-service."),
    Key("NGINX_IMAGE", "str", "nginx:1.27-alpine", "Runtime image of the frontends."),
    Key("GATEWAY_IMAGE", "str", "nginx:1.27-alpine", "Image of the gateway."),
    Key("POSTGRES_IMAGE", "str", "postgres:15-alpine", "PostgreSQL image."),
    Key("REDIS_IMAGE", "str", "redis:7-alpine", "Redis image."),
    Key("INFLUXDB_IMAGE", "str", "influxdb:2.7-alpine", "InfluxDB image."),
    Key("MONGODB_IMAGE", "str", "mongo:7.0", "MongoDB image."),
    Key("QDRANT_IMAGE", "str", "qdrant/qdrant:v1.12.4", "Qdrant image."),
    Key("EMQX_IMAGE", "str", "emqx/emqx:5.8.3", "EMQX image."),
    Key("MINIO_IMAGE", "str", "minio/minio:RELEASE.2024-12-18T13-15-44Z", "MinIO image."),
    Key("SAMPLE_APP_IMAGE", "str", "healthdeploy/python:3.11", "Sandbox only: base image of the sample application."),
    # -- application and infrastructure credentials (appendix B of the report) -----------------
    Key("DB_USER", "str", "admin", "PostgreSQL user."),
    Key("DB_NAME", "str", "health_mgmt", "PostgreSQL database."),
    Key("DB_PASSWORD", "secret", None, "PostgreSQL password.", production_secret=True, service="postgres"),
    Key("REDIS_PASSWORD", "secret", None, "Redis password.", production_secret=True, service="redis"),
    Key("INFLUX_VERSION", "choice", "2", "InfluxDB major version: 2 (influx backup with token) or 1 (influxd backup -portable).", choices=("1", "2")),
    Key("INFLUX_ORG", "str", "health", "InfluxDB 2 organisation."),
    Key("INFLUX_BUCKET", "str", "health_data", "InfluxDB 2 bucket / InfluxDB 1 database."),
    Key("INFLUX_USER", "str", "admin", "InfluxDB admin user created at first start."),
    Key("INFLUX_PASSWORD", "secret", None, "InfluxDB admin password.", production_secret=True, service="influxdb"),
    Key("INFLUX_TOKEN", "secret", None, "InfluxDB 2 operator token.", production_secret=True, service="influxdb"),
    Key("MONGO_USER", "str", "admin", "MongoDB root user."),
    Key("MONGO_PASSWORD", "secret", None, "MongoDB root password.", production_secret=True, service="mongodb"),
    Key("MONGO_DB", "str", "health_mgmt", "MongoDB database of the application."),
    Key("MINIO_USER", "str", "healthadmin", "MinIO root user (S3 access key)."),
    Key("MINIO_PASSWORD", "secret", None, "MinIO root password (S3 secret key).", production_secret=True, service="minio"),
    Key("MINIO_BUCKETS", "list", ("health-files",), "Buckets the application uses."),
    Key("QDRANT_API_KEY", "secret", None, "Qdrant API key (QDRANT__SERVICE__API_KEY): every request to Qdrant must carry it "
        "(ai-service gets it as QDRANT_API_KEY; `inv backup` sends it).", production_secret=True, service="qdrant"),
    # -- backups --------------------------------------------------------------------------------
    Key("BACKUP_SERVICES", "list", ("postgres", "influxdb", "mongodb", "minio"),
        "What `inv backup` takes by default (postgres, influxdb, mongodb, minio; extras: redis, qdrant); disabled ones are skipped."),
    Key("BACKUP_COMPRESSION", "choice", "none",
        "zstd: compress artifacts the engine does not compress itself (globals, object archive, Redis); none: as they come.",
        choices=("none", "zstd")),
    Key("BACKUP_ZSTD_LEVEL", "int", 3, "zstd level for BACKUP_COMPRESSION=zstd (1-19)."),
    Key("BACKUP_AGE_RECIPIENTS", "list", (),
        "Encrypt every artifact at rest with age for these public keys (age1... or ssh-ed25519/ssh-rsa lines); "
        "`inv backup.keygen` makes a pair."),
    Key("BACKUP_AGE_IDENTITY_FILE", "path", "",
        "Private age (or OpenSSH) key that decrypts encrypted sets for restore and verify; keep it off the servers."),
    Key("BACKUP_SIGNING_KEY", "path", "",
        "Operator's ed25519 private key (OpenSSH format, no passphrase, operator machine only) that signs every "
        "backup manifest (manifest.json.sig, an OpenSSH signature, namespace healthdeploy-backup); "
        "`inv backup.keygen --signing --out FILE` makes one."),
    Key("BACKUP_ALLOWED_SIGNERS", "path", "",
        "File of the public keys allowed to sign backups (`healthdeploy-backup ssh-ed25519 AAAA...` lines, "
        "ssh-keygen's allowed_signers format). When set (always in production), restore and verify refuse an "
        "unsigned or wrongly signed set (exit 8) before reading anything else of it."),
    Key("EMQX_USERNAME", "str", "health", "MQTT user of the backend."),
    Key("EMQX_PASSWORD", "secret", None, "MQTT / EMQX dashboard password.", production_secret=True, service="emqx"),
    Key("JWT_SECRET", "secret", None, "JWT signing secret (at least 32 characters).", production_secret=True),
    Key("JWT_EXPIRES_IN", "str", "7d", "JWT lifetime."),
    Key("DEEPSEEK_API_KEY", "secret", None, "DeepSeek API key of ai-service.", production_secret=True),
    Key("DEEPSEEK_API_BASE", "str", "https://api.deepseek.com", "DeepSeek API base URL."),
) + tuple(
    key
    for service, (cpus, memory) in DEFAULT_LIMITS.items()
    for key in (
        Key(f"{_env_key(service)}_CPUS", "float", float(cpus), f"CPU limit of {service}."),
        Key(f"{_env_key(service)}_MEMORY", "str", memory, f"Memory limit of {service} (e.g. 512m, 1g)."),
    )
)

KEYS_BY_NAME = {key.name: key for key in SCHEMA}

_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(key: Key, raw: str) -> Any:
    """Raw text -> typed value; raises ValueError with a hint-like message."""
    value = raw.strip()
    if key.kind == "str":
        return value
    if key.kind == "secret":
        return Secret(value)
    if key.kind == "int":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if key.kind == "float":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if key.kind == "bool":
        if value.lower() not in _BOOL:
            raise ValueError(f"expected true or false, got {value!r}")
        return _BOOL[value.lower()]
    if key.kind == "list":
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if key.kind == "choice":
        if value not in key.choices:
            raise ValueError(f"expected one of {', '.join(key.choices)}, got {value!r}")
        return value
    if key.kind == "path":
        return _path(value)
    raise AssertionError(key.kind)


def _path(value: str) -> str:
    """~ is expanded; a relative path is relative to the project root (so env files are portable)."""
    if not value:
        return ""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else PROJECT_ROOT / path)


def _default(key: Key) -> Any:
    if key.default is None:
        return Secret("") if key.kind == "secret" else None
    if key.kind == "path" and key.default:
        return _path(key.default)
    return key.default


_SettingsBase = dataclasses.make_dataclass(
    "_SettingsBase",
    [("env_name", str), ("source", str)]
    + [(key.attr, Any, dataclasses.field(default=None)) for key in SCHEMA],
    frozen=True,
)


class Settings(_SettingsBase):  # type: ignore[misc, valid-type]
    """The frozen, typed settings of one environment. Attribute names are the keys in lower case."""

    @property
    def enabled_services(self) -> tuple[str, ...]:
        return tuple(s for s in ALL_SERVICES if s not in self.disabled_services)

    @property
    def enabled_infra(self) -> tuple[str, ...]:
        return tuple(s for s in INFRA_SERVICES if s not in self.disabled_services)

    @property
    def primary(self) -> str:
        """The host that migrates: PRIMARY_HOST, else the first application host."""
        return self.primary_host or next((h for h in self.hosts if self.role_of(h).runs_app), self.hosts[0])

    def role_of(self, host: str) -> Role:
        if self.topology == "cells" or len(self.hosts) == 1:
            return Role.BOTH
        for entry in self.roles:
            name, _, role = entry.partition("=")
            if name.strip() == host:
                return Role(role.strip())
        return Role.BOTH

    @property
    def build_side(self) -> str:
        """Where images are built: "host", "operator" or a build host's alias (BUILD_ON, or its default)."""
        return self.build_on or ("host" if self.env_kind == "sandbox" else "operator")

    @property
    def data_hosts(self) -> tuple[str, ...]:
        return tuple(h for h in self.hosts if self.role_of(h).runs_data)

    @property
    def app_hosts(self) -> tuple[str, ...]:
        return tuple(h for h in self.hosts if self.role_of(h).runs_app)

    @property
    def data_host(self) -> str:
        """With TOPOLOGY=shared, the one host that keeps the data (validated: exactly one)."""
        return self.data_hosts[0]

    @property
    def swarm(self) -> bool:
        return self.target == "swarm"

    @property
    def stack_name(self) -> str:
        return self.expand(self.swarm_stack)

    def swarm_roles(self) -> dict[str, frozenset[str]]:
        """TARGET=swarm: node hostname -> its roles (data, app, edge), in SWARM_NODES order."""
        return _swarm_roles(self.swarm_nodes or ())[0]

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every secret value of the environment, for redaction: the secret keys, and the token inside an
        https APP_SOURCE URL (as written and decoded)."""
        from deploy.core.urls import url_secrets

        keys = tuple(getattr(self, k.attr) for k in SCHEMA if k.kind == "secret" and getattr(self, k.attr))
        return keys + url_secrets(self.app_source or "")

    def limits(self, service: str) -> tuple[float, str]:
        prefix = _env_key(service).lower()
        return getattr(self, f"{prefix}_cpus"), getattr(self, f"{prefix}_memory")

    def expand(self, template: str, host: str = "", address: str = "") -> str:
        """Expand {env}, {host} and {address} in a per-host setting (DEPLOY_PATH, COMPOSE_PROJECT, ...)."""
        safe_host = host.replace(".", "-")
        return template.replace("{env}", self.env_name).replace("{host}", safe_host).replace("{address}", address)

    def __repr__(self) -> str:  # dataclass repr would be long; secrets print *** anyway
        return f"Settings(env={self.env_name!r}, hosts={self.hosts!r})"


def parse_env_text(text: str) -> tuple[dict[str, str | None], list[int]]:
    """Parse .env text with python-dotenv; return (values, line numbers that failed to parse).

    ``KEY=   # comment`` is an empty value with a comment (as env/example.env writes it): python-dotenv
    reads the comment as the value when nothing precedes it."""
    bindings = list(parse_stream(io.StringIO(text)))
    bad_lines = [b.original.line for b in bindings if b.error]
    empty_with_comment = {b.key for b in bindings if b.key and b.value is not None
                          and b.original.string.partition("=")[2].strip().startswith("#")}
    values = dict(dotenv_values(stream=io.StringIO(text), interpolate=True))
    for key in empty_with_comment:
        values[key] = ""
    return values, bad_lines


def build_settings(env_name: str, values: dict[str, str | None], source: str = "<memory>",
                   bad_lines: list[int] = ()) -> Settings:
    """Validate raw values against SCHEMA; raise SettingsError listing every problem."""
    problems: list[Problem] = [
        Problem(f"{source}:{line}", "cannot parse this line", "use KEY=value, quote values with spaces or #")
        for line in bad_lines
    ]
    typed: dict[str, Any] = {}
    for name, raw in values.items():
        key = KEYS_BY_NAME.get(name)
        if key is None:
            close = difflib.get_close_matches(name, KEYS_BY_NAME, n=1)
            hint = f"did you mean {close[0]}?" if close else "see env/example.env for the known keys"
            problems.append(Problem(name, "unknown setting", hint))
            continue
        if raw is None:
            problems.append(Problem(name, "has no value", f"write {name}=<value> or remove the line"))
            continue
        try:
            typed[key.attr] = _convert(key, raw)
        except ValueError as exc:
            problems.append(Problem(name, str(exc), key.doc))

    for key in SCHEMA:
        typed.setdefault(key.attr, _default(key))

    kind = typed["env_kind"]
    disabled = set(typed["disabled_services"] or ())
    for service in disabled:
        if service not in INFRA_SERVICES:
            problems.append(Problem("DISABLED_SERVICES", f"{service!r} cannot be disabled",
                                    f"only infrastructure services: {', '.join(INFRA_SERVICES)}"))
    for key in SCHEMA:
        value = typed[key.attr]
        if key.required and not value:
            problems.append(Problem(key.name, f"required for env '{env_name}'", key.doc))
        if key.kind == "secret" and key.production_secret and kind == "production":
            if key.service and key.service in disabled:
                continue
            if key.name == "INFLUX_TOKEN" and typed["influx_version"] == "1":
                continue
            if not value:
                problems.append(Problem(key.name, f"required for env '{env_name}'",
                                        f"set a strong value in env/{env_name}.env"))
            elif value.reveal().strip().lower() in KNOWN_DEFAULT_SECRETS:
                problems.append(Problem(key.name, "is an example value from the deployment report",
                                        "generate one, e.g. `openssl rand -base64 32`"))
    for key in SCHEMA:
        value = typed[key.attr]
        if key.kind == "secret" and value and any(ch in value.reveal() for ch in "'\n\"\\"):
            problems.append(Problem(key.name, "contains a quote, backslash or newline",
                                    "use letters, digits and -_.+/=!@#%^&*:, (env files and config files quote values)"))
        elif key.kind in ("str", "list") and value and any(ch in "".join(value if key.kind == "list" else [value])
                                                             for ch in "'\n"):
            problems.append(Problem(key.name, "contains a single quote or newline",
                                    "remove it (values are written into single-quoted env files)"))
    hosts = typed["hosts"] or ()
    if typed["target"] == "swarm":
        problems += _swarm_problems(typed)
    else:
        problems += _topology_problems(typed, hosts)
    if typed["primary_host"] and hosts and typed["primary_host"] not in hosts:
        problems.append(Problem("PRIMARY_HOST", f"{typed['primary_host']!r} is not in HOSTS", "name one of HOSTS"))
    if bool(typed["tls_cert_file"]) != bool(typed["tls_key_file"]):
        problems.append(Problem("TLS_CERT_FILE", "TLS needs both TLS_CERT_FILE and TLS_KEY_FILE", "set both or neither"))
    for key_name in ("TLS_CERT_FILE", "TLS_KEY_FILE"):
        path = typed[key_name.lower()]
        if path and not Path(path).is_file():
            problems.append(Problem(key_name, f"file {path} does not exist", "give the path of a PEM file"))
    if not any(p.key.startswith("TLS_") for p in problems) and typed["tls_cert_file"]:
        problems += _tls_problems(typed["tls_cert_file"], typed["tls_key_file"])
    problems += _server_name_problems(typed["server_names"] or ())
    problems += _limit_problems(typed)
    ssh_config = typed["ssh_config"]
    written_by_sandbox = Path(ssh_config or "/").parent == PROJECT_ROOT / ".sandbox"
    if (ssh_config and ssh_config != _default(KEYS_BY_NAME["SSH_CONFIG"]) and not written_by_sandbox
            and not Path(ssh_config).is_file()):
        # A mistyped path must not fall back to ~/.ssh/config (other HostName, User, IdentityFile) in silence.
        # .sandbox/ssh_config is the exception: `inv sandbox.up` / `inv testbed.up` write it, after settings load.
        problems.append(Problem("SSH_CONFIG", f"file {ssh_config} does not exist",
                                "fix the path, or remove the line to use ~/.ssh/config"))
    if typed["stack_variant"] == "production" and not typed["app_source"] and kind != "sandbox":
        problems.append(Problem("APP_SOURCE", f"required for env '{env_name}'",
                                "a local directory of the application or a git URL"))
    problems += _build_problems(typed, hosts, kind)
    if not 1 <= typed["backup_zstd_level"] <= 19:
        problems.append(Problem("BACKUP_ZSTD_LEVEL", "must be between 1 and 19", KEYS_BY_NAME["BACKUP_ZSTD_LEVEL"].doc))
    for service in typed["backup_services"]:
        if service not in BACKUPABLE:
            problems.append(Problem("BACKUP_SERVICES", f"{service!r} cannot be backed up",
                                    f"choose from {', '.join(BACKUPABLE)}"))
    if typed["backup_age_recipients"]:
        from deploy.backup.sealing import parse_recipients
        from deploy.core.errors import UsageError
        try:
            parse_recipients(typed["backup_age_recipients"])
        except UsageError as exc:
            problems.append(Problem("BACKUP_AGE_RECIPIENTS", exc.message, exc.hint or KEYS_BY_NAME["BACKUP_AGE_RECIPIENTS"].doc))
    for name in ("BATCH_SIZE", "KEEP_RELEASES", "HEALTH_TIMEOUT", "START_TIMEOUT"):
        if isinstance(typed[name.lower()], int) and typed[name.lower()] < 1:
            problems.append(Problem(name, "must be at least 1", KEYS_BY_NAME[name].doc))
    if problems:
        raise SettingsError(env_name, problems)
    return Settings(env_name=env_name, source=source, **typed)


# nginx server_name entries: exact names, *.suffix / prefix.* wildcards, .example.com, or "_" (any name).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SERVER_NAME = re.compile(rf"(?:\*\.|\.)?{_LABEL}(?:\.{_LABEL})*(?:\.\*)?")
# What Compose accepts for a memory limit (go-units RAMInBytes): 512m, 1g, 1.5GiB, 268435456.
_MEMORY = re.compile(r"\d+(?:\.\d+)? ?[kKmMgGtTpP]?[iI]?[bB]?")


def _server_name_problems(names: tuple[str, ...]) -> list[Problem]:
    """Checked here, not by `nginx -t` on the host ~20 s into a deploy: a name is written into the gateway config."""
    return [Problem("SERVER_NAMES", f"{name!r} is not a host name",
                    "use names like health.example.com or *.example.com, separated by commas, or _ for any")
            for name in names if name != "_" and not _SERVER_NAME.fullmatch(name)]


def _limit_problems(typed: dict) -> list[Problem]:
    """Resource limits Compose would refuse (`docker compose config` on the host), refused before connecting."""
    problems = []
    for service in DEFAULT_LIMITS:
        prefix = _env_key(service)
        memory, cpus = typed[f"{prefix.lower()}_memory"], typed[f"{prefix.lower()}_cpus"]
        if not _MEMORY.fullmatch(str(memory)):
            problems.append(Problem(f"{prefix}_MEMORY", f"{memory!r} is not a memory size",
                                    "a number with an optional unit b, k, m or g, e.g. 512m or 1g"))
        if isinstance(cpus, float) and not cpus > 0:
            problems.append(Problem(f"{prefix}_CPUS", f"must be more than 0, got {cpus:g}", "e.g. 0.5 or 2"))
    return problems


def _tls_problems(cert_file: str, key_file: str) -> list[Problem]:
    """The certificate and key parse as PEM and belong together (else `nginx -t` fails on the host, late)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())
    except (OSError, ValueError):
        return [Problem("TLS_CERT_FILE", f"{cert_file} is not a PEM certificate",
                        "give the PEM chain (-----BEGIN CERTIFICATE-----), the server's certificate first")]
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except TypeError:
        return [Problem("TLS_KEY_FILE", f"{key_file} is encrypted", "give the key without a passphrase "
                        "(nginx cannot ask for one): openssl pkey -in KEY -out KEY.plain")]
    except (OSError, ValueError):
        return [Problem("TLS_KEY_FILE", f"{key_file} is not a PEM private key",
                        "give the private key (-----BEGIN PRIVATE KEY-----) of TLS_CERT_FILE")]
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, raw)
            != certs[0].public_key().public_bytes(serialization.Encoding.DER, raw)):
        return [Problem("TLS_KEY_FILE", f"{key_file} does not belong to the certificate in {cert_file}",
                        "give the key the certificate was issued for (the first certificate of the chain)")]
    return []


def _build_problems(typed: dict, hosts: tuple[str, ...], kind: str) -> list[Problem]:
    where = typed["build_on"]
    if not where or where in ("host", "operator"):
        return []
    if not all(ch.isalnum() or ch in "._-@" for ch in where) or where.startswith("-"):
        return [Problem("BUILD_ON", f"{where!r} is not host, operator or an SSH host alias", KEYS_BY_NAME["BUILD_ON"].doc)]
    if where in hosts and kind == "production":
        return [Problem("BUILD_ON", f"{where} is in HOSTS: production does not build where patients are served",
                        "name a build host that serves nothing, or BUILD_ON=operator")]
    return []


SWARM_ROLES = ("data", "app", "edge")


def _swarm_roles(entries) -> tuple[dict[str, frozenset[str]], list[Problem]]:
    roles: dict[str, frozenset[str]] = {}
    problems = []
    for entry in entries:
        name, sep, text = entry.partition("=")
        name = name.strip()
        wanted = frozenset(r.strip() for r in text.split("+") if r.strip())
        if not sep or not name or not wanted or not wanted <= set(SWARM_ROLES):
            problems.append(Problem("SWARM_NODES", f"{entry!r} is not node=role[+role] with roles data, app, edge",
                                    "e.g. SWARM_NODES=node1=data,node2=app+edge,node3=app+edge"))
        elif name in roles:
            problems.append(Problem("SWARM_NODES", f"node {name!r} is listed twice", "list every node once"))
        else:
            roles[name] = wanted
    return roles, problems


def _swarm_problems(typed: dict) -> list[Problem]:
    import ipaddress

    roles, problems = _swarm_roles(typed["swarm_nodes"] or ())
    example = "e.g. SWARM_NODES=node1=data,node2=app+edge,node3=app+edge"
    if not typed["swarm_nodes"]:
        problems.append(Problem("SWARM_NODES", "required with TARGET=swarm", example))
    elif not problems:
        data = [n for n, r in roles.items() if "data" in r]
        if len(data) != 1:
            problems.append(Problem("SWARM_NODES", f"{len(data)} data nodes ({', '.join(data) or 'none'}); exactly one keeps "
                                    "the stateful services (their volumes live on it)", example))
        for role in ("app", "edge"):
            if not any(role in r for r in roles.values()):
                problems.append(Problem("SWARM_NODES", f"no {role} node", example))
    for key in ("ROLES", "PRIMARY_HOST", "DATA_ADDRESS"):
        if typed[key.lower()]:
            problems.append(Problem(key, "has no meaning with TARGET=swarm (node roles come from SWARM_NODES)",
                                    f"remove {key}"))
    if typed["topology"] == "cells":
        problems.append(Problem("TOPOLOGY", "cells has no meaning with TARGET=swarm (one stack, one data node)",
                                "remove TOPOLOGY"))
    subnet = (typed["swarm_subnet"] or "").strip()
    if not subnet:
        problems.append(Problem("SWARM_SUBNET", "required with TARGET=swarm",
                                "a private range no node uses, e.g. SWARM_SUBNET=10.252.0.0/24 (not Docker's default pool)"))
    else:
        try:
            network = ipaddress.ip_network(subnet)
            if not network.is_private or network.version != 4 or network.prefixlen > 28:
                problems.append(Problem("SWARM_SUBNET", f"{subnet} is not a private IPv4 range of at least 16 addresses",
                                        "e.g. 10.252.0.0/24"))
        except ValueError:
            problems.append(Problem("SWARM_SUBNET", f"{subnet!r} is not a subnet", "e.g. 10.252.0.0/24"))
    if not typed["registry"]:
        problems.append(Problem("REGISTRY", "required with TARGET=swarm: every node pulls the images built once, by digest",
                                "e.g. REGISTRY=registry.example.com/health"))
    elif typed["registry"].startswith(("http://", "https://")) or typed["registry"].endswith("/") or " " in typed["registry"]:
        problems.append(Problem("REGISTRY", f"{typed['registry']!r} is not host[:port][/path]",
                                "e.g. REGISTRY=registry.example.com/health"))
    if bool(typed["registry_user"]) != bool(typed["registry_password"]):
        problems.append(Problem("REGISTRY_USER", "REGISTRY_USER and REGISTRY_PASSWORD go together", "set both or neither"))
    if typed["swarm_parallelism"] < 1:
        problems.append(Problem("SWARM_PARALLELISM", "must be at least 1", KEYS_BY_NAME["SWARM_PARALLELISM"].doc))
    if typed["swarm_replicas"] < 1:
        problems.append(Problem("SWARM_REPLICAS", "must be at least 1", KEYS_BY_NAME["SWARM_REPLICAS"].doc))
    if typed["swarm_monitor"] < 0:
        problems.append(Problem("SWARM_MONITOR", "must not be negative", KEYS_BY_NAME["SWARM_MONITOR"].doc))
    if "{address}" in (typed["deploy_path"] or ""):
        problems.append(Problem("DEPLOY_PATH", "{address} has no meaning with TARGET=swarm (the gateway's directory is "
                                "mounted by Swarm on every edge node alike)", "use {host} (the node's hostname) or neither"))
    stack = typed["swarm_stack"].replace("{env}", "x")
    if not stack or any(not (c.isalnum() or c in "-_") for c in stack):
        problems.append(Problem("SWARM_STACK", f"{typed['swarm_stack']!r}: a stack name has letters, digits, - and _ only",
                                "e.g. SWARM_STACK=healthdeploy-{env}"))
    return problems


def _topology_problems(typed: dict, hosts: tuple[str, ...]) -> list[Problem]:
    problems = []
    roles: dict[str, str] = {}
    for entry in typed["roles"] or ():
        name, sep, role = entry.partition("=")
        name, role = name.strip(), role.strip()
        if not sep or role not in ("data", "app", "both"):
            problems.append(Problem("ROLES", f"{entry!r} is not host=data, host=app or host=both",
                                    "e.g. ROLES=db1=data,web1=app,web2=app"))
        elif name not in hosts:
            problems.append(Problem("ROLES", f"{name!r} is not in HOSTS", "name hosts of HOSTS"))
        else:
            roles[name] = role
    if typed["topology"] == "cells":
        if roles:
            problems.append(Problem("ROLES", "has no meaning with TOPOLOGY=cells (every host keeps its own data)",
                                    "remove ROLES, or use TOPOLOGY=shared"))
        return problems
    if len(hosts) > 1 and not problems:
        missing = [h for h in hosts if h not in roles]
        if missing:
            problems.append(Problem("ROLES", f"no role for {', '.join(missing)}: with several hosts, say which one keeps the data",
                                    "e.g. ROLES=db1=data,web1=app,web2=app; or TOPOLOGY=cells if every host keeps its own data"))
        data = [h for h, r in roles.items() if r in ("data", "both")]
        app = [h for h, r in roles.items() if r in ("app", "both")]
        if not missing and len(data) != 1:
            problems.append(Problem("ROLES", f"{len(data)} data hosts ({', '.join(data) or 'none'}); TOPOLOGY=shared needs exactly one",
                                    "give exactly one host the role data (or both)"))
        if not missing and not app:
            problems.append(Problem("ROLES", "no application host", "give at least one host the role app (or both)"))
    return problems


def env_dir() -> Path:
    return Path(os.environ.get("HEALTHDEPLOY_ENV_DIR") or PROJECT_ROOT / "env")


def available_envs(directory: Path | None = None) -> list[str]:
    directory = directory or env_dir()
    return sorted(p.stem for p in directory.glob("*.env") if p.stem != "example")


def load_settings(env_name: str, directory: Path | None = None,
                  overrides: dict[str, str] | None = None) -> Settings:
    """Read ``env/<env_name>.env`` and validate it. ``overrides`` win over the file (tests, CLI flags)."""
    directory = directory or env_dir()
    if not env_name or "/" in env_name or env_name.startswith("."):
        raise UsageError(f"invalid environment name {env_name!r}", "use the name of a file in env/, e.g. --env prod")
    path = directory / f"{env_name}.env"
    if not path.is_file():
        known = ", ".join(available_envs(directory)) or "none"
        raise UsageError(f"no settings file {path}", f"known environments: {known}; copy env/example.env to start")
    values, bad_lines = parse_env_text(path.read_text(encoding="utf-8"))
    values.update(overrides or {})
    return build_settings(env_name, values, source=str(path), bad_lines=bad_lines)


def find_env_for_host(host: str, directory: Path | None = None) -> str:
    """The environment whose HOSTS lists ``host`` (for ``fab -H prod deploy`` without --env)."""
    directory = directory or env_dir()
    matches = []
    for name in available_envs(directory):
        values, _ = parse_env_text((directory / f"{name}.env").read_text(encoding="utf-8"))
        hosts = [h.strip() for h in (values.get("HOSTS") or "").split(",")]
        if host in hosts:
            matches.append(name)
    if not matches:
        raise UsageError(f"no environment lists host {host!r} in HOSTS", "pass --env NAME or add the host to env/NAME.env")
    if len(matches) > 1:
        raise UsageError(f"host {host!r} is in several environments ({', '.join(matches)})", "pass --env NAME")
    return matches[0]


def describe_schema() -> list[Key]:
    return list(SCHEMA)


Loader = Callable[[str], Settings]
