"""One service's zero-downtime roll on one host (like Kamal's ``Cli::App::Boot``: one object per roll).

Measured on this machine (``../shared/measurements/zero-downtime.md``): taking the old containers out of the
gateway *before* they are signalled loses nothing, where DNS-based switching and naive recreates do. So:

1. new containers start beside the old ones (``up --no-recreate --scale svc=2N``);
2. they must be healthy by their own health check (Docker's verdict, or the same test run by healthdeploy
   while Docker still says "starting": ``health_now.py``) AND answer /health from the gateway; then a few
   real requests warm them;
3. the gateway's upstream lists the new containers, the old ones as ``backup`` (a request whose connect to
   a new container fails still reaches an old one), ``nginx -t`` and a graceful reload;
4. after ``DRAIN_SECONDS`` the old ones leave the upstream (second reload), and the roll waits until no
   connection is open to them any more (in-flight requests, keep-alive and WebSocket connections through
   nginx's old workers), at most ``DRAIN_LIMIT`` seconds: those still open then are counted and closed by
   the stop;
5. a check through the gateway, then the old containers are stopped and removed.

Anything failing before the old containers stop: the upstream goes back to them, the new ones are removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from deploy.commands import docker as dk
from deploy.core.errors import HealthdeployError
from deploy.core.services import APP_PORTS
from deploy.execute import faults
from deploy.execute.executor import shielded
from deploy.execute.gateway import Gateway, health_url
from deploy.execute.health_now import HealthNow
from deploy.execute.session import Session
from deploy.execute.wait import WaitTimeout, wait_for
from deploy.facts.connections import parse_established, tcp_tables
from deploy.facts.containers import Container
from deploy.core.secret import redact

WARM_REQUESTS = 3


class RollFailure(HealthdeployError):
    def __init__(self, service: str, reason: str, logs: str = ""):
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason
        self.logs = logs


@dataclass
class RollReport:
    service: str
    new: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    closed_at_limit: int = 0  # connections still open to the old containers when the drain limit came
    drain_seconds: float = 0.0
    retired: list[str] = field(default_factory=list)  # old container ids, stopped; removed when the deploy commits


class ServiceRoll:
    def __init__(self, session: Session, gateway: Gateway, service: str, release: str, compose_files: tuple[str, str, str],
                 environment: dict[str, str], old: list[Container], before_switch=None, started=None,
                 listed: list[Container] | None = None):
        self.session = session
        self.gateway = gateway
        self.service = service
        self.release = release
        self.project, self.compose_file, self.env_file = compose_files
        self.environment = environment
        self.old = old
        self.s = session.s
        self.report = RollReport(service)
        self.before_switch = before_switch  # e.g. a password changed on the server just before the switch
        self.started = started  # called with the new containers' ids as soon as they exist (to journal the undo)
        self.listed = listed  # the host's containers as just listed by the caller (``old`` came from it)

    def say(self, message: str) -> None:
        self.session.say(f"{self.service}: {message}")

    def logs(self, container: Container | None) -> str:
        if container is None:
            return ""
        result = self.session.run(dk.logs_tail(container.name), check=False)
        return redact((result.text + result.err).strip()[-3000:], self.s.secrets)

    def run(self) -> RollReport:
        gateway = self.gateway.container(self.listed)
        if gateway is None:
            raise RollFailure(self.service, "the gateway is not running")
        old_ids = {c.id for c in self.old}
        count = max(1, len(self.old))
        self.say(f"starting {count} new container(s) beside {len(self.old)} old")
        switched = False
        try:
            self.session.run(dk.compose_scale_up(self.project, self.compose_file, self.env_file, self.service,
                                                 len(self.old) + count, self.environment))
            new_ids = {c.id for c in self.session.containers() if c.service == self.service and c.id not in old_ids}
            if self.started:
                self.started(sorted(new_ids))
            new = self._wait_healthy(new_ids, gateway)
            self.report.new = [c.name for c in new]
            self.say(f"new container(s) healthy: {', '.join(c.name for c in new)}")
            faults.point(f"roll:{self.service}:healthy", self.session.host)
            if self.before_switch:
                self.before_switch()
            old_ips = [c.ip for c in self.old if c.ip]
            self.gateway.write_upstream(self.service, [c.ip for c in new], self.release, backups=old_ips)
            switched = True
            self.gateway.reload(gateway)
            if self.old:
                faults.point(f"roll:{self.service}:drain", self.session.host)
                time.sleep(self.s.drain_seconds)  # nginx's old workers finish their requests to the old containers
                self.gateway.write_upstream(self.service, [c.ip for c in new], self.release)
                self.gateway.reload(gateway)
            if not self.gateway.through(gateway, self.service):
                raise RollFailure(self.service, "health check through the gateway failed after the switch",
                                  self.logs(new[0]))
            if self.old:
                self._drain()
        except BaseException as exc:
            with shielded():
                if switched or self.old:
                    self._switch_back(gateway)
                self._remove_new(old_ids)
            if isinstance(exc, RollFailure) or not isinstance(exc, HealthdeployError):
                raise
            raise RollFailure(self.service, exc.message) from None
        if self.old:
            # The new containers serve now. The old ones stop (SIGTERM after the drain) but stay until the deploy
            # commits, so an undo can start them again; one that will not stop is a warning, not a rollback.
            with shielded():
                ids = tuple(c.id for c in self.old)
                try:
                    result = self.session.run(dk.stop_containers(ids), check=False)
                    if not result.ok:
                        self.session.warn(f"stopping the old containers failed: {result.err.strip()[:200]}")
                except HealthdeployError as exc:
                    self.session.warn(f"stopping the old containers failed: {exc.message}")
            self.report.removed = [c.name for c in self.old]
            self.report.retired = [c.id for c in self.old]
        closed = f"; {self.report.closed_at_limit} connection(s) closed at the drain limit" if self.report.closed_at_limit else ""
        self.say(f"switched; old container(s) drained and stopped{closed}")
        return self.report

    # -- phases ---------------------------------------------------------------------------------------
    def _wait_healthy(self, ids: set[str], gateway: Container) -> list[Container]:
        own_check = HealthNow(self.session.run)  # not only at Docker's next probe (health_now.py)

        def check():
            current = own_check.all_of(self.session.inspect(tuple(sorted(ids))))
            bad = [c for c in current if c.health == "unhealthy" or c.state in ("exited", "dead")]
            if bad:
                what = bad[0].state if bad[0].state in ("exited", "dead") else bad[0].health
                raise RollFailure(self.service, f"new container {bad[0].name} is {what}", self.logs(bad[0]))
            if current and all(c.healthy for c in current):
                return current
            check.last = current
            return None

        check.last = []
        try:
            current = wait_for(check, self.s.health_timeout, f"{self.service}: new containers healthy")
        except WaitTimeout:
            last = check.last
            raise RollFailure(self.service, f"new containers not healthy after {self.s.health_timeout}s "
                              f"({', '.join(f'{c.name}={c.health or c.state}' for c in last)})",
                              self.logs(last[0]) if last else "") from None
        # Then, in the same exec, a few real requests to each before it takes all traffic (first-request costs:
        # lazy imports, connection pools, caches).
        answers = self.gateway.probes(gateway, [health_url(c) for c in current], then_warm=self._warm_urls(current))
        for c in current:  # Docker's view is not enough: it must answer through the network too
            if not answers.get(health_url(c)):
                raise RollFailure(self.service, f"new container {c.name} does not answer /health from the gateway",
                                  self.logs(c))
        return current

    def _warm_urls(self, new: list[Container]) -> list[str]:
        path = "/" if APP_PORTS[self.service] == 80 else "/health"
        return [f"http://{c.ip}:{APP_PORTS[self.service]}{path}" for c in new for _ in range(WARM_REQUESTS)]

    def _drain(self) -> None:
        """Wait until no connection is open to the old containers (nginx's old workers done with them, WebSockets
        closed by their clients), at most DRAIN_LIMIT; report what is still open then."""
        started = time.monotonic()
        names = tuple(c.name for c in self.old)
        port = APP_PORTS[self.service]

        def open_connections() -> int:
            text = self.session.run(tcp_tables(names), check=False).text
            return sum(parse_established(text, port).values())

        left = open_connections()
        while left and time.monotonic() - started < self.s.drain_limit:
            time.sleep(0.5)
            left = open_connections()
        self.report.closed_at_limit = left
        self.report.drain_seconds = round(time.monotonic() - started + self.s.drain_seconds, 1)

    def _switch_back(self, gateway: Container) -> None:
        self.gateway.write_upstream(self.service, [c.ip for c in self.old if c.ip], self.release)
        try:
            self.gateway.reload(gateway)
        except HealthdeployError as exc:
            self.session.warn(f"gateway reload while switching back failed: {exc.message}")

    def _remove_new(self, old_ids: set[str]) -> None:
        try:
            extra = tuple(c.id for c in self.session.containers() if c.service == self.service and c.id not in old_ids)
        except HealthdeployError:
            return
        if extra:
            self.session.run(dk.remove_containers(extra), check=False)
