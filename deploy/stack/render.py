"""Render the stack healthdeploy ships (compose file, Dockerfiles, nginx configs, env files) from settings.

Pure: settings and a target in, ``{relative path: bytes}`` out. Templates live in ``deploy/stack/templates``.

Env files come in two halves per service: the *release* half (``env/<svc>.env`` inside the release, no
secret in it, versioned with the release) and the *secret* half (``shared/env/<svc>.env``, 0600, versioned
apart from releases). A rollback takes the target release's settings with the current secrets, so a key
rotated after a leak stays rotated. A variable is secret when its value contains a secret setting.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jinja2
import yaml

from deploy.core.services import (APP_DEPENDS, APP_PORTS, APP_SERVICES, GATEWAY, GATEWAY_PORT_OF,  # noqa: F401
                                  GATEWAY_PORTS, INFRA_PORTS, ROLL_ORDER, UPSTREAM_NAMES, Role, services_of)
from deploy.core.settings import Settings

TEMPLATES = Path(__file__).parent / "templates"
GATEWAY_DIR = "/etc/healthdeploy-gateway"  # where the gateway container sees shared/gateway
SECRETS_MOUNT = "/run/healthdeploy"  # where a data service reads its own secret env file at run time
DEFINITION_LABEL = "healthdeploy.definition"

# What the sandbox runs under each infrastructure service's name, and what it cannot run.
SANDBOX_SUBSTITUTES = {
    "postgres": "PostgreSQL 15 (Debian)", "redis": "Redis 7 (Debian)", "influxdb": "InfluxDB 1.6 (Debian), not 2.x",
    "emqx": "Mosquitto (MQTT broker), not EMQX", "minio": "SeaweedFS S3 API, not MinIO",
    "gateway": "nginx 1.22 (Debian)",
}
SANDBOX_GAPS = {"mongodb": "no offline MongoDB server exists here", "qdrant": "no offline Qdrant server exists here"}


@dataclass(frozen=True)
class Target:
    """One host of an environment, with its per-host settings expanded.

    ``data_address``: on an application-only host, the private address of the data host (the app services'
    connection settings point there); on a data-only host, the private address it publishes its databases
    on. Empty on a host that runs both (the services reach each other by name on the compose network).
    """

    alias: str
    address: str
    deploy_path: str
    project: str
    gateway_bind: str
    role: Role = Role.BOTH
    data_address: str = ""

    @classmethod
    def of(cls, settings: Settings, alias: str, address: str, data_address: str = "") -> "Target":
        role = settings.role_of(alias)
        return cls(
            alias=alias,
            address=address,
            deploy_path=settings.expand(settings.deploy_path, alias, address).rstrip("/"),
            project=settings.expand(settings.compose_project, alias, address),
            gateway_bind=settings.expand(settings.gateway_bind, alias, address),
            role=role,
            data_address="" if role is Role.BOTH else (data_address or (address if role is Role.DATA else "")),
        )

    @property
    def shared(self) -> str:
        return f"{self.deploy_path}/shared"

    @property
    def releases(self) -> str:
        return f"{self.deploy_path}/releases"

    @property
    def current(self) -> str:
        return f"{self.deploy_path}/current"

    def release_dir(self, release_id: str) -> str:
        return f"{self.releases}/{release_id}"

    @property
    def gateway_dir(self) -> str:
        return f"{self.shared}/gateway"

    @property
    def env_dir(self) -> str:
        return f"{self.shared}/env"

    @property
    def lock_dir(self) -> str:
        return f"{self.deploy_path}/.lock"


def services_on(settings: Settings, target: Target) -> tuple[str, ...]:
    """The services that run on ``target``'s host."""
    return services_of(target.role, settings.enabled_infra)


def app_services_on(settings: Settings, target: Target) -> tuple[str, ...]:
    return tuple(s for s in services_on(settings, target) if s in APP_SERVICES)


def infra_services_on(settings: Settings, target: Target) -> tuple[str, ...]:
    return tuple(s for s in services_on(settings, target) if s in settings.enabled_infra)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def _images(settings: Settings) -> dict[str, str]:
    return {
        "gateway": settings.gateway_image, "postgres": settings.postgres_image, "redis": settings.redis_image,
        "influxdb": settings.influxdb_image, "mongodb": settings.mongodb_image, "qdrant": settings.qdrant_image,
        "emqx": settings.emqx_image, "minio": settings.minio_image, "sample_app": settings.sample_app_image,
    }


def _ports_block(settings: Settings, target: Target):
    def ports(service: str, *container_ports: int) -> str:
        if target.role is Role.DATA:
            # The application hosts reach the databases over the private network, on this address only.
            return "\n".join(["    ports:"] + [f'      - "{target.data_address}:{p}:{p}"' for p in container_ports])
        if settings.publish_infra == "none":
            if service in ("minio", "qdrant"):  # `inv backup` reaches their APIs through an SSH tunnel to loopback
                return f'    ports:\n      - "127.0.0.1::{container_ports[0]}"'
            return ""
        bind = "127.0.0.1" if settings.publish_infra == "loopback" else "0.0.0.0"
        lines = ["    ports:"] + [f'      - "{bind}:{p}:{p}"' for p in container_ports]
        return "\n".join(lines)
    return ports


def image_prefix(settings: Settings, target: Target) -> str:
    return f"healthdeploy/{target.project}"


def build_prefix(settings: Settings) -> str:
    """Where a build off the host tags its images (never a host's own prefix: on a machine whose engine is also a
    host's, the host's tags stay the host's)."""
    return f"healthdeploy/build-{settings.env_name}"


def build_override(prefix: str, release: str, services: tuple[str, ...]) -> bytes:
    """A second compose file for a build off the host: the same release files, images tagged ``prefix/svc:release``."""
    lines = ["# Written by healthdeploy for a build off the host: only the image names differ.", "services:"]
    for service in services:
        lines += [f"  {service}:", f"    image: {prefix}/{service}:{release}"]
    return ("\n".join(lines) + "\n").encode()


def _render_compose(settings: Settings, target: Target, definitions: dict[str, str],
                    swarm: dict | None = None) -> str:
    """The compose file; with ``swarm`` (the context deploy/stack/swarm.py builds) the Swarm stack file from the
    same template."""
    sandbox = settings.stack_variant == "sandbox"
    here = services_on(settings, target)
    infra = tuple(s for s in settings.enabled_infra if s in here)
    apps = [
        {"name": s, "port_is_80": APP_PORTS[s] == 80, "depends": tuple(d for d in APP_DEPENDS[s] if d in here)}
        for s in APP_SERVICES if s in here
    ]
    template = _environment().get_template("compose.yaml.j2")
    return template.render(
        env=settings.env_name, variant=settings.stack_variant, project=target.project, sandbox=sandbox,
        images=_images(settings), image_prefix=image_prefix(settings, target), apps=apps, infra=infra,
        gateway=GATEWAY in here,
        deploy_path=target.deploy_path, gateway_dir=GATEWAY_DIR, gateway_bind=target.gateway_bind,
        gateway_ports=GATEWAY_PORTS + ((80, 443) if settings.tls_cert_file else ()),
        limits={s: settings.limits(s) for s in (*APP_SERVICES, *infra, "gateway")},
        influx_version=settings.influx_version, release_path_var=".", secrets_mount=SECRETS_MOUNT,
        # Each probe is an exec: about 80 ms of CPU here, the engine's share included, and Docker 20.10 has no
        # start_interval to probe fast only while starting. An idle sandbox stack cost 14.6 CPU-s a minute with 2 s
        # for the applications and 5 s for the rest, 10.8 with 3 s and 10 s (measured on this machine; its rolls
        # were not slower). A roll no longer waits for its new containers' first probe (it runs the same check
        # itself: execute/health_now.py), but the sandbox's tests read Docker's status soon after a roll, hence 3 s
        # for the applications; only a first start or a restore waits on the data layer's and the gateway's, hence
        # 10 s. A Swarm stack keeps 2 s and 5 s: its routing and its rolls wait on them.
        health_interval=("3s" if swarm is None else "2s") if sandbox else "10s",
        health_start_period="5s" if sandbox else "40s",
        infra_health_interval="10s" if sandbox and swarm is None else None,
        log_max_size="10m", log_max_file="5",
        # On Swarm nothing of the data layer is published (backups reach it over the node's docker_gwbridge).
        ports=_ports_block(settings, target) if swarm is None else (lambda *args: ""),
        definitions=definitions, definition_label=DEFINITION_LABEL,
        swarm=swarm, apps_names=tuple(a["name"] for a in apps),
        env_files=tuple(service_environment(settings, target)) if swarm else (),
    )


def service_definitions(compose_text: str) -> dict[str, str]:
    """Digest of each service's compose definition (limits, ports, volumes, image, command, env files...),
    without healthdeploy's own definition label: a change of any of it means the service must be recreated."""
    data = yaml.safe_load(compose_text) or {}
    digests = {}
    for name, definition in (data.get("services") or {}).items():
        definition = dict(definition)
        labels = dict(definition.get("labels") or {})
        labels.pop(DEFINITION_LABEL, None)
        if labels:
            definition["labels"] = labels
        else:
            definition.pop("labels", None)
        digests[name] = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
    return digests


def render_compose(settings: Settings, target: Target) -> str:
    """The compose file, each service labelled with the digest of its own definition."""
    return _render_compose(settings, target, service_definitions(_render_compose(settings, target, {})))


def render_gateway_conf(settings: Settings) -> str:
    tls = bool(settings.tls_cert_file)
    sites = [
        {"port": 3000, "upstream": "frontend_web", "api": True, "tls": False},
        {"port": 3001, "upstream": "frontend_patient", "api": True, "tls": False},
        {"port": 5000, "upstream": "backend", "api": False, "tls": False},
        {"port": 8001, "upstream": "ai_service", "api": False, "tls": False},
    ]
    if tls:
        sites.append({"port": 443, "upstream": "frontend_web", "api": True, "tls": True})
    return _environment().get_template("gateway/nginx.conf.j2").render(
        env=settings.env_name, gateway_dir=GATEWAY_DIR, sites=sites, tls=tls,
        server_names=" ".join(settings.server_names),
    )


def render_upstream(service: str, addresses: list[str], release: str, now: _dt.datetime | None = None,
                    backups: list[str] | tuple[str, ...] = ()) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return _environment().get_template("gateway/upstream.conf.j2").render(
        service=service, name=UPSTREAM_NAMES[service], addresses=addresses, port=APP_PORTS[service],
        backups=[b for b in backups if b not in addresses] if addresses else [],
        release=release, written_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def render_build_files(settings: Settings) -> dict[str, str]:
    """Production Dockerfiles, .dockerignore and frontend nginx configs, keyed by ``<service>/<file>``."""
    env = _environment()
    common = {"node_image": settings.node_image, "python_image": settings.python_image,
              "nginx_image": settings.nginx_image, "health_interval": "10s"}
    files = {
        "backend/Dockerfile": env.get_template("app/backend/Dockerfile.j2").render(**common),
        "backend/.dockerignore": (TEMPLATES / "app/backend/.dockerignore").read_text(),
        "ai-service/Dockerfile": env.get_template("app/ai-service/Dockerfile.j2").render(**common),
        "ai-service/.dockerignore": (TEMPLATES / "app/ai-service/.dockerignore").read_text(),
    }
    for service, script, dist in (("frontend-web", "build", "dist"), ("frontend-patient", "build:h5", "dist/build/h5")):
        files[f"{service}/Dockerfile"] = env.get_template("app/frontend/Dockerfile.j2").render(
            service=service, build_script=script, dist_dir=dist, **common)
        files[f"{service}/.dockerignore"] = (TEMPLATES / "app/frontend/.dockerignore").read_text()
        files[f"{service}/nginx.conf"] = env.get_template("app/frontend/nginx.conf.j2").render(service=service)
    return files


def render_release_files(settings: Settings, target: Target) -> dict[str, bytes]:
    """Everything of a release that is not secret and not application source: the compose file, the gateway
    config (on application hosts), the release half of every env file, the production build files."""
    files = {"compose.yaml": render_compose(settings, target)}
    if target.role.runs_app:
        files["gateway/nginx.conf"] = render_gateway_conf(settings)
    if settings.stack_variant == "production" and target.role.runs_app:
        files.update({f"build/{path}": text for path, text in render_build_files(settings).items()})
    release_env, _ = env_halves(settings, target)
    out = {path: text.encode() for path, text in files.items()}
    out.update(release_env)
    return dict(sorted(out.items()))


# -- env files (secret) ----------------------------------------------------------------------------
def _url_password(secret) -> str:
    return quote(secret.reveal(), safe="")


def service_environment(settings: Settings, target: Target | None = None) -> dict[str, dict[str, str]]:
    """Per-service container environment of the services on ``target``. Each service gets only what it needs.
    On an application-only host the data services are reached at the data host's private address."""
    s = settings
    sandbox = s.stack_variant == "sandbox"
    infra = set(s.enabled_infra)
    remote = target is not None and target.role is Role.APP
    at = (lambda service: target.data_address) if remote else (lambda service: service)
    influx_url = f"http://{at('influxdb')}:8086"
    backend = {
        "NODE_ENV": "production", "PORT": "5000",
        "DATABASE_URL": f"postgresql://{quote(s.db_user, safe='')}:{_url_password(s.db_password)}@{at('postgres')}:5432/{s.db_name}?schema=public",
        "REDIS_HOST": at("redis"), "REDIS_PORT": "6379", "REDIS_PASSWORD": s.redis_password.reveal(),
        "INFLUX_URL": influx_url, "INFLUX_TOKEN": s.influx_token.reveal(), "INFLUX_ORG": s.influx_org,
        "INFLUX_BUCKET": s.influx_bucket,
        "MQTT_BROKER_URL": f"mqtt://{at('emqx')}:1883", "MQTT_USERNAME": s.emqx_username, "MQTT_PASSWORD": s.emqx_password.reveal(),
        "MINIO_ENDPOINT": at("minio"), "MINIO_PORT": "9000", "MINIO_ACCESS_KEY": s.minio_user,
        "MINIO_SECRET_KEY": s.minio_password.reveal(), "MINIO_BUCKETS": ",".join(s.minio_buckets),
        "AI_SERVICE_URL": "http://ai-service:8001",
        "JWT_SECRET": s.jwt_secret.reveal(), "JWT_EXPIRES_IN": s.jwt_expires_in,
    }
    if s.influx_version == "1":  # InfluxDB 1.x authenticates users, not tokens
        backend["INFLUX_USERNAME"] = s.influx_user
        backend["INFLUX_PASSWORD"] = s.influx_password.reveal()
    if "mongodb" in infra:
        backend["MONGO_URI"] = (f"mongodb://{quote(s.mongo_user, safe='')}:{_url_password(s.mongo_password)}"
                                f"@{at('mongodb')}:27017/{s.mongo_db}?authSource=admin")
    ai = {
        "PORT": "8001", "QDRANT_HOST": at("qdrant"), "QDRANT_PORT": "6333",
        "DEEPSEEK_API_KEY": s.deepseek_api_key.reveal(), "DEEPSEEK_API_BASE": s.deepseek_api_base,
        "BACKEND_URL": "http://backend:5000", "JWT_SECRET": s.jwt_secret.reveal(),
    }
    if s.qdrant_api_key:
        ai["QDRANT_API_KEY"] = s.qdrant_api_key.reveal()
    if sandbox:
        # The sample app's migration reads DATABASE_URL; give ai-service none of the backend's secrets.
        backend["MIGRATE_HINT"] = "python3 /app/app.py migrate"
    frontend = {"PORT": "80"}
    envs = {"backend": backend, "ai-service": ai, "frontend-web": dict(frontend), "frontend-patient": dict(frontend)}
    envs["postgres"] = {"POSTGRES_USER": s.db_user, "POSTGRES_PASSWORD": s.db_password.reveal(), "POSTGRES_DB": s.db_name}
    envs["redis"] = {"REDIS_PASSWORD": s.redis_password.reveal()}
    if s.influx_version == "1":
        # HTTP auth on, with the admin user from settings (the image creates it, or sets its password, at start).
        envs["influxdb"] = {"INFLUX_DB": s.influx_bucket, "INFLUXDB_HTTP_AUTH_ENABLED": "true",
                            "INFLUXDB_ADMIN_USER": s.influx_user, "INFLUXDB_ADMIN_PASSWORD": s.influx_password.reveal()}
    else:
        envs["influxdb"] = {
            "DOCKER_INFLUXDB_INIT_MODE": "setup", "DOCKER_INFLUXDB_INIT_USERNAME": s.influx_user,
            "DOCKER_INFLUXDB_INIT_PASSWORD": s.influx_password.reveal(), "DOCKER_INFLUXDB_INIT_ORG": s.influx_org,
            "DOCKER_INFLUXDB_INIT_BUCKET": s.influx_bucket, "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN": s.influx_token.reveal(),
        }
    envs["mongodb"] = {"MONGO_INITDB_ROOT_USERNAME": s.mongo_user, "MONGO_INITDB_ROOT_PASSWORD": s.mongo_password.reveal(),
                       "MONGO_INITDB_DATABASE": s.mongo_db}
    if sandbox:
        envs["emqx"] = {"MQTT_USERNAME": s.emqx_username, "MQTT_PASSWORD": s.emqx_password.reveal()}
    else:
        envs["emqx"] = {"EMQX_DASHBOARD__DEFAULT_PASSWORD": s.emqx_password.reveal(),
                        "EMQX_AUTHENTICATION__1__MECHANISM": "password_based",
                        "EMQX_AUTHENTICATION__1__BACKEND": "built_in_database"}
    envs["minio"] = {"MINIO_ROOT_USER": s.minio_user, "MINIO_ROOT_PASSWORD": s.minio_password.reveal()}
    envs["qdrant"] = {"QDRANT__SERVICE__API_KEY": s.qdrant_api_key.reveal()}  # every request needs the api-key header
    here = set(services_on(settings, target)) if target is not None else set(APP_SERVICES) | infra
    return {name: env for name, env in envs.items() if name in here}


def format_env_file(values: dict[str, str], secret: bool = True) -> str:
    """KEY='value' lines for Compose's env_file (single quotes: no interpolation of $ in passwords).
    The format is also valid POSIX shell: a data service sources its mounted secret half at start."""
    lines = ["# Written by healthdeploy. Secret: mode 0600, never committed." if secret else
             "# Written by healthdeploy: the settings of this release (its secrets live in shared/env)."]
    for key, value in values.items():
        if "\n" in value or "'" in value:
            raise ValueError(f"{key}: newlines and single quotes are not allowed in values")
        lines.append(f"{key}='{value}'")
    return "\n".join(lines) + "\n"


def _is_secret(value: str, secrets: tuple[str, ...]) -> bool:
    return any(s and (s in value or quote(s, safe="") in value) for s in secrets)


def env_halves(settings: Settings, target: Target | None = None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(release half, secret half) of every env file on ``target``, each ``{"env/<svc>.env": bytes}``."""
    secrets = tuple(s.reveal() for s in settings.secrets)
    release, secret = {}, {}
    for name, values in service_environment(settings, target).items():
        public = {k: v for k, v in values.items() if not _is_secret(v, secrets)}
        hidden = {k: v for k, v in values.items() if _is_secret(v, secrets)}
        release[f"env/{name}.env"] = format_env_file(public, secret=False).encode()
        secret[f"env/{name}.env"] = format_env_file(hidden).encode()
    return release, secret


def render_env_files(settings: Settings, target: Target | None = None) -> dict[str, bytes]:
    """The secret half of every env file (what goes to shared/env)."""
    return env_halves(settings, target)[1]


def render_secret_files(settings: Settings, target: Target) -> dict[str, bytes]:
    """Everything secret a host gets: the secret env halves and, on application hosts, the TLS material;
    keyed ``env/<svc>.env`` and ``tls/cert.pem`` / ``tls/key.pem``."""
    files = dict(env_halves(settings, target)[1])
    if settings.tls_cert_file and target.role.runs_app:
        files["tls/cert.pem"] = Path(settings.tls_cert_file).read_bytes()
        files["tls/key.pem"] = Path(settings.tls_key_file).read_bytes()
    return files


def secrets_version(secret_files: dict[str, bytes]) -> str:
    """A version id for a set of secret files: their content hash (the same secrets make the same version)."""
    return "s" + content_hash(secret_files)[:15]


def env_digest(release_half_sha256: str, secret_half_sha256: str) -> str:
    """Digest of a service's whole environment from the SHA-256 of its two env files (computable from file
    hashes on the host alone, which a rollback needs)."""
    return hashlib.sha256(f"{release_half_sha256} {secret_half_sha256}".encode()).hexdigest()[:16]


def env_digests(settings: Settings, target: Target) -> dict[str, str]:
    """Per application service: digest of its whole environment (both halves), the label that makes new
    settings or rotated secrets roll the service."""
    release, secret = env_halves(settings, target)
    return {s: env_digest(_sha(release[f"env/{s}.env"]), _sha(secret[f"env/{s}.env"]))
            for s in APP_SERVICES if f"env/{s}.env" in release}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()


def sandbox_report(settings: Settings) -> list[str]:
    """Human lines naming every substitute and every gap of the sandbox variant."""
    if settings.stack_variant != "sandbox":
        return []
    lines = ["sandbox stack: the application services run the sample app (deploy/sandbox/app)"]
    for service, what in SANDBOX_SUBSTITUTES.items():
        if service in settings.enabled_services:
            lines.append(f"sandbox stack: {service} is {what}")
    for service, why in SANDBOX_GAPS.items():
        if service not in settings.enabled_services:
            lines.append(f"sandbox stack: {service} is switched off ({why})")
    return lines
