"""The Swarm stack file (TARGET=swarm), rendered from the same template as the compose file.

Pure: settings, the manager's ``Target`` and ``StackInputs`` (image references and image configs, known
only after a build or from the live services) in, text out. Names of the Swarm objects healthdeploy creates
(secrets, configs) are derived from their content, so a changed secret is a new secret and a service update
(rotation), and an unchanged one is the same object again.

What differs from the compose file (docs/swarm.md):
- images by digest from REGISTRY (apps), no build; env files: only the release half (``env_file``, read by
  ``docker stack deploy`` on the manager); the secret half is a Swarm secret mounted at
  /run/healthdeploy/secrets.env and loaded by healthdeploy's task entrypoint (a Swarm config);
- every service on one overlay network with an explicit subnet, endpoint_mode dnsrr (no routing mesh);
- stateless services: SWARM_REPLICAS tasks on app nodes, update_config start-first + rollback + monitor;
  stateful ones: one task pinned to the data node, stop-first; the gateway: one per edge node, host-mode
  ports, following the healthy tasks itself (gateway.sh).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Mapping

import yaml

from deploy.core.services import APP_PORTS, APP_SERVICES, GATEWAY, UPSTREAM_NAMES, Role, services_of
from deploy.core.settings import Settings
from deploy.stack.render import (DEFINITION_LABEL, TEMPLATES, Target, _is_secret, _render_compose, env_halves,
                                 service_environment)

ENTRYPOINT_SCRIPT = (TEMPLATES / "swarm" / "entrypoint.sh").read_bytes()
GATEWAY_SCRIPT = (TEMPLATES / "swarm" / "gateway.sh").read_bytes()
SYNC_INTERVAL = 0.5  # seconds between two rounds of the gateway's sync
RELEASE_LABEL = "healthdeploy.release"
INPUTS_LABEL = "healthdeploy.image-inputs"
STACK_FILE = "stack.yaml"
NAME_LIMIT = 64  # Swarm's limit for secret and config names
PLACEHOLDER_IMAGE = "healthdeploy/unbuilt"


@dataclass(frozen=True)
class ImageConfig:
    """What the stack file needs of an image: its own entrypoint and command (the task entrypoint runs them)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: Mapping) -> "ImageConfig":
        return cls(tuple(config.get("Entrypoint") or ()), tuple(config.get("Cmd") or ()))


@dataclass(frozen=True)
class StackInputs:
    release: str
    images: Mapping[str, str] = field(default_factory=dict)  # service -> image reference (apps: repo@sha256:...)
    image_configs: Mapping[str, ImageConfig] = field(default_factory=dict)  # service -> entrypoint/cmd
    releases: Mapping[str, str] = field(default_factory=dict)  # app service -> release it last changed in
    image_inputs: Mapping[str, str] = field(default_factory=dict)  # app service -> digest of its build inputs


def stack_services(settings: Settings) -> tuple[str, ...]:
    """Every service of the stack (apps, gateway, enabled data services)."""
    return services_of(Role.BOTH, settings.enabled_infra)


def swarm_target(settings: Settings, manager: str, address: str) -> Target:
    """The manager as a ``Target``: where releases live; every service reaches the others by name."""
    base = Target.of(settings, manager, address)
    return Target(alias=manager, address=address, deploy_path=node_deploy_path(settings, manager),
                  project=settings.stack_name, gateway_bind=base.gateway_bind, role=Role.BOTH)


def node_deploy_path(settings: Settings, node: str) -> str:
    """DEPLOY_PATH on a node, {host} being its Swarm hostname (the gateway's bind mount uses Swarm's own
    {{.Node.Hostname}} template, so each edge node has its own directory)."""
    return settings.deploy_path.replace("{env}", settings.env_name).replace("{host}", node).rstrip("/")


def mount_deploy_path(settings: Settings) -> str:
    return settings.deploy_path.replace("{env}", settings.env_name).replace("{host}", "{{.Node.Hostname}}").rstrip("/")


def stop_delay(settings: Settings) -> int:
    """Seconds a stop signal is held back: the gateway's sync round, its reload and DRAIN_SECONDS as a backup,
    after Swarm's own 2 s between the DNS removal and the signal."""
    return int(math.ceil(settings.drain_seconds)) + 2


def drain_ticks(settings: Settings) -> int:
    return max(1, int(math.ceil(settings.drain_seconds / SYNC_INTERVAL)))


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _name(settings: Settings, what: str, data: bytes) -> str:
    name = f"{settings.stack_name}_{what}.{_short(data)}"
    if len(name) > NAME_LIMIT:  # long stack names: still unique per stack and content
        name = f"hd{_short(settings.stack_name.encode())[:8]}_{what}.{_short(data)}"
    return name


def secret_halves(settings: Settings, target: Target) -> dict[str, bytes]:
    """service -> its secret env half, for the services that have a secret at all."""
    secrets = tuple(s.reveal() for s in settings.secrets)
    _, hidden = env_halves(settings, target)
    wanted = {name for name, values in service_environment(settings, target).items()
              if any(_is_secret(v, secrets) for v in values.values())}
    return {name: hidden[f"env/{name}.env"] for name in sorted(wanted)}


def release_values(settings: Settings, target: Target) -> dict[str, dict[str, str]]:
    """service -> its settings without a secret in them (the release half of its env file). On Swarm they are the
    service's environment in the stack file (`docker stack deploy --env-file` would keep the quotes)."""
    secrets = tuple(s.reveal() for s in settings.secrets)
    return {name: {k: v for k, v in values.items() if not _is_secret(v, secrets)}
            for name, values in service_environment(settings, target).items()}


def secret_names(settings: Settings, target: Target) -> dict[str, str]:
    """service -> the Swarm secret holding its secret half (the name carries the content's digest)."""
    return {service: _name(settings, f"{service}-env", data) for service, data in secret_halves(settings, target).items()}


def config_names(settings: Settings) -> dict[str, str]:
    return {"entrypoint": _name(settings, "hd-entrypoint", ENTRYPOINT_SCRIPT),
            "gateway": _name(settings, "hd-gateway", GATEWAY_SCRIPT)}


def config_contents(settings: Settings) -> dict[str, bytes]:
    names = config_names(settings)
    return {names["entrypoint"]: ENTRYPOINT_SCRIPT, names["gateway"]: GATEWAY_SCRIPT}


def _stack_escape(word: str) -> str:
    return word.replace("$", "$$")  # docker stack deploy interpolates ${VAR}


def _template_commands(settings: Settings, target: Target) -> dict[str, list[str]]:
    """The commands the template itself gives a service (redis's wrapper, MinIO's server arguments)."""
    data = yaml.safe_load(_render_compose(settings, target, {})) or {}
    return {name: list(spec["command"]) for name, spec in (data.get("services") or {}).items()
            if isinstance(spec.get("command"), list)}


def argv_of(settings: Settings, target: Target, configs: Mapping[str, ImageConfig]) -> dict[str, str]:
    """service -> the JSON argv the task entrypoint runs: the image's entrypoint, then the template's command or
    else the image's own (Docker's rule: an overridden entrypoint drops the image's CMD)."""
    own = _template_commands(settings, target)
    out = {}
    for service in stack_services(settings):
        if service == GATEWAY:
            continue
        config = configs.get(service, ImageConfig())
        words = [_stack_escape(w) for w in config.entrypoint]
        words += own[service] if service in own else [_stack_escape(w) for w in config.cmd]
        out[service] = json.dumps(words)
    return out


def _uids(settings: Settings) -> dict[str, str]:
    uids = {s: "1001" for s in APP_SERVICES}  # the application images run as uid 1001
    uids.update({s: "0" for s in settings.enabled_infra})  # their entrypoints start as root, then drop
    if settings.stack_variant == "production":
        uids["redis"] = "999"  # `user: redis` of the official image
    return uids


def _context(settings: Settings, target: Target, inputs: StackInputs, definitions: Mapping[str, str],
             data_node: str) -> dict:
    apps = [s for s in APP_SERVICES if s in stack_services(settings)]
    return {
        "release": inputs.release, "stack": settings.stack_name, "subnet": settings.swarm_subnet,
        "replicas": settings.swarm_replicas, "monitor": _seconds(settings.swarm_monitor),
        "parallelism": settings.swarm_parallelism,
        "stop_delay": stop_delay(settings), "drain_ticks": drain_ticks(settings), "sync_interval": SYNC_INTERVAL,
        "data_node": data_node, "node_deploy_path": mount_deploy_path(settings),
        "images": {s: inputs.images.get(s, PLACEHOLDER_IMAGE) for s in apps},
        "argv": argv_of(settings, target, inputs.image_configs),
        "releases": {s: inputs.releases.get(s, inputs.release) for s in apps},
        "image_inputs": {s: inputs.image_inputs.get(s, "") for s in apps},
        "secrets": secret_names(settings, target), "configs": config_names(settings),
        "env": {svc: {k: json.dumps(_stack_escape(v)) for k, v in values.items()}
                for svc, values in release_values(settings, target).items()},
        "definitions": {s: definitions.get(s, "") for s in stack_services(settings)},
        "uids": _uids(settings),
        "gateway_services": " ".join(f"{s}={UPSTREAM_NAMES[s]}:{APP_PORTS[s]}" for s in apps),
    }


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def data_node_of(settings: Settings) -> str:
    return next((n for n, roles in settings.swarm_roles().items() if "data" in roles), "")


def render_stack(settings: Settings, target: Target, inputs: StackInputs, definitions: Mapping[str, str]) -> str:
    return _render_compose(settings, target, {}, swarm=_context(settings, target, inputs, definitions,
                                                                data_node_of(settings)))


def stack_definitions(settings: Settings, target: Target, image_inputs: Mapping[str, str]) -> dict[str, str]:
    """service -> digest of its Swarm definition. An application's image stands in as the digest of the files it
    is built from (its digest is known only after the build), the image's own entrypoint and command (read
    at deploy time) and the release it was deployed in are left out: the digest changes exactly when the
    service must be updated. The Swarm objects a service references (secrets, configs, the network's
    subnet) are part of it by name, its release env file by content."""
    apps = {s for s in APP_SERVICES}
    inputs = StackInputs(release="-", images={s: f"inputs/{image_inputs.get(s, '')}" for s in apps},
                         image_configs={}, releases={s: "-" for s in apps})
    release_env, _ = env_halves(settings, target)
    text = _render_compose(settings, target, {}, swarm=_context(settings, target, inputs, {}, data_node_of(settings)))
    data = yaml.safe_load(text) or {}
    objects = {**{f"{k}-env": v for k, v in secret_names(settings, target).items()},
               **{f"hd-{k}": v for k, v in config_names(settings).items()}}
    digests = {}
    for name, spec in (data.get("services") or {}).items():
        spec = json.loads(json.dumps(spec))
        for labels in (spec.get("labels"), (spec.get("deploy") or {}).get("labels")):
            if isinstance(labels, dict):
                for label in (DEFINITION_LABEL, RELEASE_LABEL, INPUTS_LABEL):
                    labels.pop(label, None)
        refs = sorted(objects[r["source"]] for r in (spec.get("secrets") or []) + (spec.get("configs") or []))
        env = hashlib.sha256(release_env.get(f"env/{name}.env", b"")).hexdigest()
        payload = {"spec": spec, "objects": refs, "subnet": settings.swarm_subnet, "env": env}
        digests[name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return digests


def data_stack(stack_text: str, services: tuple[str, ...]) -> str:
    """The stack file reduced to ``services`` (the data layer deployed before the migration): networks,
    secrets, configs and volumes stay whole; `docker stack deploy` leaves services it is not given alone."""
    data = yaml.safe_load(stack_text)
    data["services"] = {k: v for k, v in data["services"].items() if k in services}
    return "# The data layer of the stack file beside it (deployed before the migration).\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False)


def release_files(settings: Settings, target: Target, source_files: dict[str, bytes]) -> dict[str, bytes]:
    """What a release holds on the manager (its stack file is written when the image digests are known): the
    release half of every env file, the gateway config, the production build files and the source."""
    from deploy.stack.render import render_build_files, render_gateway_conf

    files = dict(env_halves(settings, target)[0])
    files["gateway/nginx.conf"] = render_gateway_conf(settings).encode()
    files.update(source_files)
    if settings.stack_variant == "production":
        for path, text in render_build_files(settings).items():
            files[f"src/{path}"] = text.encode()
    return dict(sorted(files.items()))


def gateway_files(settings: Settings) -> dict[str, bytes]:
    """What each edge node's gateway directory holds (nginx.conf; the TLS pair with TLS_CERT_FILE)."""
    from pathlib import Path

    from deploy.stack.render import render_gateway_conf

    files = {"nginx.conf": render_gateway_conf(settings).encode()}
    if settings.tls_cert_file:
        files["tls/cert.pem"] = Path(settings.tls_cert_file).read_bytes()
        files["tls/key.pem"] = Path(settings.tls_key_file).read_bytes()
    return files
