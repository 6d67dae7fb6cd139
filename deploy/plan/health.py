"""Health of a deployed stack: facts in, one verdict per check out (pure), then a table or JSON.

Checks per host: every service's container state, Docker health and restart count, its image and
release; each application's /health directly (gateway -> container) and through the gateway; each
infrastructure port inside the compose network; the host's listening sockets against what the
environment publishes, including that no database or broker port listens on a public interface.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field

from deploy.core.services import APP_PORTS, APP_SERVICES, GATEWAY_PORT_OF, GATEWAY_PORTS, INFRA_PORTS, Role
from deploy.core.settings import Settings
from deploy.facts.containers import Container
from deploy.stack.render import Target, services_on

SCHEMA_VERSION = 1
RESTART_WARN = 3


@dataclass
class Check:
    host: str
    name: str  # e.g. "backend.container", "backend.http.direct", "postgres.tcp", "port.5432"
    status: str  # pass | warn | fail
    detail: str
    service: str = ""


@dataclass
class HostHealth:
    host: str
    role: str = "both"
    release: str = ""
    checks: list[Check] = field(default_factory=list)
    error: str = ""

    @property
    def healthy(self) -> bool:
        return not self.error and all(c.status != "fail" for c in self.checks)


def container_checks(host: str, settings: Settings, target: Target, containers: list[Container]) -> list[Check]:
    checks = []
    for service in services_on(settings, target):
        mine = [c for c in containers if c.service == service]
        running = [c for c in mine if c.state == "running"]
        name = f"{service}.container"
        if not mine:
            checks.append(Check(host, name, "fail", "no container", service))
            continue
        if not running:
            checks.append(Check(host, name, "fail", f"{mine[-1].name} is {mine[-1].state}", service))
            continue
        for c in running:
            image = c.image_ref
            if c.health == "unhealthy":
                checks.append(Check(host, name, "fail", f"{c.name} is unhealthy ({image})", service))
            elif c.health == "starting":
                checks.append(Check(host, name, "warn", f"{c.name} is still starting ({image})", service))
            elif c.restart_count >= RESTART_WARN:
                checks.append(Check(host, name, "warn", f"{c.name} restarted {c.restart_count} times ({image})", service))
            else:
                checks.append(Check(host, name, "pass", f"{c.name} running, {c.health or 'no health check'} ({image})",
                                    service))
    return checks


def probe_targets(settings: Settings, target: Target, containers: list[Container]) -> list[tuple[str, str, str]]:
    """Probes run from inside the gateway (application hosts): each app container directly and through the
    gateway, and each data service: by name on a single host, at the data host's private address from an
    application host (the path the application itself takes)."""
    if not target.role.runs_app:
        return []
    targets = []
    for service in APP_SERVICES:
        for c in containers:
            if c.service == service and c.state == "running" and c.ip:
                targets.append(("http", f"{service}.http.direct", f"http://{c.ip}:{APP_PORTS[service]}/health"))
        targets.append(("http", f"{service}.http.gateway", f"http://127.0.0.1:{GATEWAY_PORT_OF[service]}/health"))
    remote = target.role is Role.APP
    for service in settings.enabled_infra:
        for port in INFRA_PORTS[service][:1]:
            where = target.data_address if remote else service
            targets.append(("tcp", f"{service}.tcp", f"{where}:{port}"))
    return targets


def probe_checks(host: str, targets: list[tuple[str, str, str]], output: str | None) -> list[Check]:
    results = {}
    for line in (output or "").splitlines():
        verdict, _, name = line.partition(" ")
        results.setdefault(name, []).append(verdict)
    checks = []
    seen = set()
    for kind, name, target in targets:
        if name in seen:
            continue
        seen.add(name)
        service = name.split(".")[0]
        verdicts = results.get(name, [])
        if output is None:
            checks.append(Check(host, name, "fail", "not probed: the gateway is not running", service))
        elif verdicts and all(v == "ok" for v in verdicts):
            checks.append(Check(host, name, "pass", f"{target} answers", service))
        else:
            what = "does not answer /health" if kind == "http" else "port not reachable"
            checks.append(Check(host, name, "fail", f"{target} {what}", service))
    return checks


def parse_listeners(text: str) -> list[tuple[str, int]]:
    """(address, port) of each TCP listener, from `ss -Hltn`."""
    listeners = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] != "LISTEN":
            continue
        address, _, port = fields[3].rpartition(":")
        address = address.strip("[]").split("%")[0]
        if port.isdigit():
            listeners.append((address, int(port)))
    return listeners


def _public(address: str, private_ok: bool = False) -> bool:
    """Is a listener reachable from outside the host? Loopback never is; a private (RFC 1918 / ULA) address
    is allowed only where the data host serves the application hosts over the private network."""
    if address in ("*", "0.0.0.0", "::", ""):
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if ip.is_loopback:
        return False
    return not (private_ok and ip.is_private)


def published_targets(gateway_bind: str) -> list[tuple[str, str, str]]:
    """HTTP through each port the gateway publishes, from the host itself (docker-proxy accepts
    connections even when nothing listens behind it, so a socket list alone proves nothing)."""
    address = "127.0.0.1" if gateway_bind in ("0.0.0.0", "*", "") else gateway_bind
    return [("http", f"port.{port}", f"http://{address}:{port}/health") for port in GATEWAY_PORTS]


def port_checks(host: str, settings: Settings, target: Target, listeners: list[tuple[str, int]],
                published_output: str | None = None) -> list[Check]:
    checks = []
    gateway_bind = target.gateway_bind
    answered = {line.split(" ", 1)[1] for line in (published_output or "").splitlines() if line.startswith("ok ")}
    for port in (GATEWAY_PORTS if target.role.runs_app else ()):
        bound = [a for a, p in listeners if p == port]
        socket_ok = any(a == gateway_bind or a in ("0.0.0.0", "*", "::") for a in bound) or (
            gateway_bind in ("0.0.0.0", "*") and bound)
        if not socket_ok:
            checks.append(Check(host, f"port.{port}", "fail", f"gateway port {port} is not listening on {gateway_bind}",
                                "gateway"))
        elif published_output is not None and f"port.{port}" not in answered:
            checks.append(Check(host, f"port.{port}", "fail", f"gateway port {port} is published on {gateway_bind} but "
                                "nothing answers /health behind it", "gateway"))
        else:
            checks.append(Check(host, f"port.{port}", "pass", f"gateway port {port} answers on {gateway_bind}", "gateway"))
    data_host = target.role is Role.DATA
    for service in (settings.enabled_infra if target.role.runs_data else ()):
        for port in INFRA_PORTS[service]:
            bound = [a for a, p in listeners if p == port]
            public = [a for a in bound if _public(a, private_ok=data_host)]
            if public:
                # In production a database or broker on a public interface is a failure whatever PUBLISH_INFRA says.
                status = "warn" if settings.publish_infra == "all" and settings.env_kind != "production" else "fail"
                checks.append(Check(host, f"port.{port}", status,
                                    f"{service} port {port} listens on a public interface ({', '.join(public)}); "
                                    f"PUBLISH_INFRA={settings.publish_infra}", service))
            elif bound and settings.publish_infra == "none" and not data_host:
                checks.append(Check(host, f"port.{port}", "warn",
                                    f"{service} port {port} listens on {', '.join(bound)} though PUBLISH_INFRA=none",
                                    service))
            else:
                checks.append(Check(host, f"port.{port}", "pass",
                                    f"{service} port {port} not public" + (f" ({', '.join(bound)})" if bound else ""),
                                    service))
    return checks


def to_json(results: list[HostHealth], env: str) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "env": env,
        "healthy": all(r.healthy for r in results),
        "hosts": [{"host": r.host, "role": r.role, "healthy": r.healthy, "release": r.release, "error": r.error,
                   "checks": [asdict(c) for c in r.checks]} for r in results],
    }
