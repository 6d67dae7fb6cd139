"""The gateway: its upstream files (replaced atomically in a mounted directory), ``nginx -t`` and a graceful
reload, probes from inside it."""

from __future__ import annotations

from deploy.commands import docker as dk
from deploy.commands import files as fs
from deploy.core.services import APP_PORTS, APP_SERVICES, GATEWAY, GATEWAY_PORT_OF
from deploy.execute.session import Session
from deploy.facts.containers import Container
from deploy.facts.files import file_hashes, parse_hashes
from deploy.stack.render import GATEWAY_DIR, render_upstream


class Gateway:
    def __init__(self, session: Session):
        self.session = session

    def container(self, containers: list[Container] | None = None) -> Container | None:
        containers = self.session.containers() if containers is None else containers
        return next((c for c in containers if c.service == GATEWAY and c.running), None)

    def write_upstream(self, service: str, addresses: list[str], release: str, backups: list[str] = ()) -> None:
        text = render_upstream(service, addresses, release, backups=backups).encode()
        self.session.run(fs.write_file(f"{self.session.t.gateway_dir}/upstreams/{service}.conf", text, "0644")
                         .tagged("upstream", service, tuple(addresses), tuple(backups)))

    def reload(self, gateway: Container) -> None:
        self.session.run(dk.nginx_test_and_reload(gateway.name, f"{GATEWAY_DIR}/nginx.conf"))

    def probe(self, gateway: Container, url: str) -> bool:
        return self.session.run(dk.http_probe(gateway.name, url), check=False).ok

    def through(self, gateway: Container, service: str) -> bool:
        """/health through the gateway, given a moment: a reload just signalled may not have taken effect yet (a
        first release's check once hit an old worker whose only upstream was the placeholder)."""
        url = f"http://127.0.0.1:{GATEWAY_PORT_OF[service]}/health"
        return self.session.run(dk.http_probe(gateway.name, url, within=3), check=False).ok

    def probes(self, gateway: Container, urls: list[str], then_warm: list[str] = ()) -> dict[str, bool]:
        out = self.session.run(dk.http_probes(gateway.name, tuple(urls), then_warm=tuple(then_warm)), check=False).text
        answers = {line.split(" ", 1)[1]: line.startswith("ok ") for line in out.splitlines() if " " in line}
        return {u: answers.get(u, False) for u in urls}

    def ensure_upstream_files(self, containers: list[Container], release: str) -> None:
        """Placeholders before the first start (nginx refuses a config naming an undefined upstream)."""
        existing = parse_hashes(self.session.run(file_hashes(f"{self.session.t.gateway_dir}/upstreams")).text)
        for service in APP_SERVICES:
            if f"{service}.conf" not in existing:
                live = [c.ip for c in containers if c.service == service and c.running and c.ip]
                self.write_upstream(service, live, release)

    def refresh(self, release: str, services=APP_SERVICES) -> None:
        """Point upstreams at the running containers' current addresses (a restarted container can come back
        with another IP), then reload."""
        containers = self.session.containers()
        for service in services:
            live = [c.ip for c in containers if c.service == service and c.running and c.ip]
            self.write_upstream(service, live, release)
        gateway = self.container(containers)
        if gateway:
            self.reload(gateway)


def health_url(container: Container) -> str:
    return f"http://{container.ip}:{APP_PORTS[container.service]}/health"
