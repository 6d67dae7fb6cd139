"""Images built off the serving host (BUILD_ON=operator or a build host; docs/build.md).

Once per deploy, before any host changes: the release files of one application host (the same compose file,
Dockerfiles and source a host build would use) go to the build side, ``docker compose build`` runs there with a
second compose file that only renames the images (``healthdeploy/build-<env>/<svc>:<release>``), and the images
are pushed into healthdeploy's registry on this machine (``execute.registry``; from a build host through a
reverse tunnel of its SSH connection). Then each host, inside its own apply, pulls them by digest from the
read-only registry through a reverse tunnel of ITS SSH connection: its dockerd fetches only the blobs it lacks,
gzip-compressed, and the image gets the release tag the host would have built (``healthdeploy/<project>/...``).

A build failure raises before any host step ran (nothing changed anywhere); a host's ship registers the removal of
what it tags before it pulls, so a failed ship leaves that host as it was.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deploy.commands import docker as dk
from deploy.commands import files as fs
from deploy.core.console import Console
from deploy.core.errors import HealthdeployError, RemoteCommandError
from deploy.core.settings import Settings
from deploy.execute.executor import Executor, shielded
from deploy.execute import faults
from deploy.execute import registry as reg
from deploy.facts.host import HostFacts, host_facts, version_tuple
from deploy.facts.images import parse_image_ids, project_images
from deploy.plan.deploy import MIN_COMPOSE, MIN_DOCKER, PreflightError
from deploy.plan.desired import Payload
from deploy.stack import payload as pl
from deploy.stack.render import build_override, build_prefix

OVERRIDE = "compose.build.yaml"
PROGRESS_EVERY = 5.0  # seconds between "shipped so far" lines
FAULT_AFTER_BYTES = 1 << 20  # during:ship acts once this much crossed the tunnel


class BuildFailed(HealthdeployError):
    """The build off the host failed: no host was changed."""


@dataclass(frozen=True)
class BuiltImage:
    service: str
    image_id: str  # sha256:... of the image config: the same on every engine that has it
    repository: str  # in the shipping registry
    digest: str  # the manifest digest it is pulled by


@dataclass
class BuildReport:
    where: str
    services: tuple[str, ...] = ()
    build_seconds: float = 0.0
    push_seconds: float = 0.0
    layers_pushed: int = 0
    layers_present: int = 0
    from_build_host: int = 0  # bytes the build host pushed to this machine (0 for BUILD_ON=operator)


@dataclass
class ShipReport:
    bytes: int = 0
    seconds: float = 0.0
    pulled: int = 0  # images pulled (the others were on the host already, only tagged)


def _describe(where: str) -> str:
    return "this machine" if where == "operator" else where


@dataclass
class OffHostBuild:
    """The build side of one deploy. ``builder`` runs the build (``LocalHost`` for operator, the build host's
    ``RemoteHost`` otherwise); ``registry`` makes a ``ShipRegistry`` (tests swap both)."""

    settings: Settings
    console: Console
    where: str
    builder: Executor
    registry: Callable[[Path, bool], reg.ShipRegistry] | None = None  # default: reg.ShipRegistry
    images: dict[str, BuiltImage] = field(default_factory=dict)
    report: BuildReport | None = None
    _serving: reg.ShipRegistry | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def root(self) -> Path:
        return Path(self.settings.build_cache) / "registry" / self.settings.env_name

    @property
    def prefix(self) -> str:
        return build_prefix(self.settings)

    def context_dir(self, release: str) -> str:
        if self.where == "operator":
            return str(Path(self.settings.build_cache) / "build" / self.settings.env_name / release)
        return f"{self.settings.expand(self.settings.build_host_path, self.where).rstrip('/')}/{release}"

    def say(self, message: str) -> None:
        self.console.phase(self.where, message)

    # -- before any lock: can it build? ------------------------------------------------------------------
    def _registry(self, readonly: bool) -> reg.ShipRegistry:
        return (self.registry or reg.ShipRegistry)(self.root, readonly)

    def preflight(self) -> HostFacts:
        if reg.locate() is None:
            raise PreflightError("BUILD_ON=" + self.where + ": docker-registry is not installed on this machine "
                                 "(images built off the host are shipped through it)",
                                 "apt-get install docker-registry, or set BUILD_ON=host; nothing was changed")
        facts = HostFacts.parse(self.builder.run(host_facts("/")).text)
        problems = []
        if not facts.docker or version_tuple(facts.docker) < MIN_DOCKER:
            problems.append(f"Docker {facts.docker or 'missing'} (needs {'.'.join(map(str, MIN_DOCKER))} or newer)")
        if not facts.compose or version_tuple(facts.compose) < MIN_COMPOSE:
            problems.append(f"Compose {facts.compose or 'missing'} (needs {'.'.join(map(str, MIN_COMPOSE))} or newer)")
        if problems:
            raise PreflightError(f"build side {_describe(self.where)}: " + "; ".join(problems),
                                 "fix it or set BUILD_ON=host; nothing was changed")
        return facts

    # -- once per deploy, before any host changes ----------------------------------------------------------
    def build(self, payload: Payload, release: str, services: tuple[str, ...], project: str) -> BuildReport:
        report = BuildReport(self.where, services)
        context = self.context_dir(release)
        files = {**payload.files, pl.RELEASE_ENV: payload.release_env,
                 OVERRIDE: build_override(self.prefix, release, services)}
        self.say(f"building {', '.join(services)} for every host (release {release})")
        started = time.monotonic()
        log: list[str] = []
        try:
            self.builder.run(fs.mkdirs(context, mode="0700"))
            self.builder.stream_from_file(fs.extract_tar(context), io.BytesIO(pl.tar_of(files, tuple(files))))
            faults.point("during:build", None if self.where == "operator" else self.builder, delay=1.0)
            try:
                self.builder.run(dk.compose_build(f"{project}-build", f"{context}/compose.yaml",
                                                  f"{context}/{pl.RELEASE_ENV}", services, f"{context}/{OVERRIDE}"),
                                 on_line=log.append)
            except RemoteCommandError as exc:
                raise BuildFailed(f"image build on {_describe(self.where)} failed; no host was changed",
                                  "\n".join(log[-15:]) or exc.message) from None
        finally:
            with shielded():  # also after Ctrl-C: the context is removed
                self.builder.run(fs.remove_tree(context), check=False)
        report.build_seconds = time.monotonic() - started
        self.say(f"built {', '.join(services)} in {report.build_seconds:.1f}s")
        started = time.monotonic()
        self._push(release, services, report)
        report.push_seconds = time.monotonic() - started
        self.report = report
        return report

    def _push(self, release: str, services: tuple[str, ...], report: BuildReport) -> None:
        pairs = tuple((f"{self.prefix}/{s}:{release}", f"healthdeploy/{self.settings.env_name}/{s}") for s in services)
        lines: list[str] = []
        with self._registry(False) as registry:
            try:
                if self.where == "operator":
                    out = self.builder.run(dk.push_images(registry.address, pairs), on_line=lines.append).text
                else:
                    with self.builder.reverse_tunnel("127.0.0.1", registry.port) as tunnel:
                        out = self.builder.run(dk.push_images(f"127.0.0.1:{tunnel.port}", pairs),
                                               on_line=lines.append).text
                    report.from_build_host = tunnel.from_host
            except RemoteCommandError as exc:
                raise BuildFailed(f"pushing the images built on {_describe(self.where)} to the shipping registry "
                                  "failed; no host was changed", "\n".join(lines[-8:]) or exc.message) from None
        pushed = dk.parse_pushed(out)
        missing = [s for s, (tag, _) in zip(services, pairs) if tag not in pushed]
        if missing:
            raise BuildFailed(f"no digest for {', '.join(missing)} after the push; no host was changed")
        for service, (tag, repository) in zip(services, pairs):
            image_id, digest = pushed[tag]
            self.images[service] = BuiltImage(service, image_id, repository, digest)
        report.layers_pushed = sum(1 for line in lines if line.rstrip().endswith(": Pushed"))
        report.layers_present = sum(1 for line in lines if "Layer already exists" in line)
        self.say(f"registry has {', '.join(services)}: {report.layers_pushed} new layer(s), "
                 f"{report.layers_present} already there")

    # -- into each host, during its apply -------------------------------------------------------------------
    def serving(self) -> reg.ShipRegistry:
        """The read-only registry the hosts pull from (started on first use, stopped by ``close``)."""
        with self._lock:
            if self._serving is None:
                self._serving = self._registry(True).start()
            return self._serving

    def ship(self, host: Executor, services: tuple[str, ...], tags: dict[str, str],
             say: Callable[[str], None]) -> ShipReport:
        """Pull ``services``' images into ``host`` and tag them ``tags[service]``; returns the bytes sent."""
        missing = [s for s in services if s not in self.images]
        if missing:
            raise HealthdeployError(f"internal: {', '.join(missing)} were not built on {self.where}")
        entries = tuple((self.images[s].image_id, self.images[s].repository, self.images[s].digest, tags[s])
                        for s in services)
        registry = self.serving()
        report = ShipReport()
        started = time.monotonic()
        log: list[str] = []
        with host.reverse_tunnel("127.0.0.1", registry.port) as tunnel:
            done = threading.Event()

            def progress() -> None:
                while not done.wait(PROGRESS_EVERY):
                    elapsed = time.monotonic() - started
                    say(f"shipping: {tunnel.to_host / 1e6:,.1f} MB so far ({tunnel.to_host / 1e6 / elapsed:,.1f} MB/s)")

            ticker = threading.Thread(target=progress, daemon=True)
            ticker.start()
            try:
                with faults.armed_while("during:ship", host, lambda: tunnel.to_host >= FAULT_AFTER_BYTES):
                    out = host.run(dk.ship_images(f"127.0.0.1:{tunnel.port}", entries), on_line=log.append).text
            except RemoteCommandError as exc:
                tail = [line.strip() for line in log if line.strip() and not line.startswith(dk.SHIPPED_MARKER)]
                raise HealthdeployError(f"{host.alias}: shipping the images built on {_describe(self.where)} failed; "
                                        "this host keeps what it had", " | ".join(tail[-2:])[:400] or exc.message) from None
            finally:
                done.set()
            report.bytes = tunnel.to_host
        report.seconds = time.monotonic() - started
        shipped = dk.parse_shipped(out)
        report.pulled = sum(1 for line in log if line.startswith("Status: Downloaded"))
        absent = [s for s in services if tags[s] not in shipped]
        if absent:
            raise HealthdeployError(f"{host.alias}: {', '.join(absent)} did not arrive; this host keeps what it had")
        return report

    # -- after the deploy -----------------------------------------------------------------------------------
    def prune(self, keep: int) -> None:
        """The build side keeps the images of its newest ``keep`` releases (its build cache stays)."""
        listing = parse_image_ids(self.builder.run(project_images(self.prefix)).text)
        releases = sorted({ref.rsplit(":", 1)[1] for ref in listing if ":" in ref})
        doomed = set(releases[:-keep]) if keep else set(releases)
        refs = tuple(sorted(ref for ref in listing if ref.rsplit(":", 1)[1] in doomed))
        if refs:
            self.builder.run(dk.remove_images(refs), check=False)

    def close(self) -> None:
        with self._lock:
            if self._serving is not None:
                self._serving.stop()
                self._serving = None
        if self.where != "operator":
            self.builder.close()
