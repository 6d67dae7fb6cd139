"""``SwarmApply``: runs a ``SwarmPlan`` on the manager (and, for the gateway's files, on each edge node over
SSH), writing an undo command into the host's journal (inside its lock) before each change: if we fail, we
run it; if we die or lose the connection, the lock holder on that host runs it. The plan decided; this only
acts, waits and checks.

Waiting: `docker stack deploy` returns once Swarm has the new specs. A service counts as converged when the
tasks that should run all run the desired definition (its digest is a container label), as many as it
should have, none starting, and its update (if one started) completed after the monitor window. An update
that Swarm rolled back (update_config failure_action: rollback) or paused, a new service whose tasks keep
failing, or the deadline fail the deploy: every service this deploy changed goes back (the previous
release's stack file deployed again, services it created removed), exit 5.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

import yaml

from deploy.commands import files as fs
from deploy.commands import git as gitc
from deploy.commands import swarm as sc
from deploy.commands.docker import http_probes
from deploy.core.errors import ExitCode, HealthdeployError, RemoteCommandError
from deploy.core.secret import redact
from deploy.core.services import APP_PORTS, APP_SERVICES, GATEWAY, GATEWAY_PORT_OF
from deploy.execute.executor import shielded
from deploy.execute.session import FILES, SERVICES, SETTINGS, Session, utc_now
from deploy.execute.wait import WaitTimeout, wait_for
from deploy.facts import swarm as sf
from deploy.plan.steps import Applied, Step, StepKind
from deploy.plan.swarm import SwarmDesired, SwarmObserved, SwarmPayload, SwarmPlan
from deploy.stack import payload as pl
from deploy.stack import swarm as sw
from deploy.stack.render import GATEWAY_DIR

STATE_HISTORY = 50
POLL = 1.0
VERIFY_TIMEOUT = 45.0
INSTALL_FILE = ('set -e; umask 022; mkdir -p "$(dirname "$2")"; if [ -f "$2" ]; then cp -p "$2" "$2.prev"; fi; '
                'tmp=$(mktemp "$2.XXXXXX"); cat > "$tmp"; chmod "$1" "$tmp"; mv -f "$tmp" "$2"')


class StackRolledBack(HealthdeployError):
    exit_code = ExitCode.ROLLED_BACK

    def __init__(self, message: str, service: str = "", reason: str = "", logs: str = ""):
        super().__init__(message)
        self.service, self.reason, self.logs = service, reason, logs


class SwarmStepFailed(HealthdeployError):
    """A step failed before anything was switched: the live release keeps serving."""


@dataclass
class ServiceResult:
    service: str
    action: str  # created | updated | unchanged | rolled-back | failed
    tasks: str = ""  # "2/2"
    seconds: float = 0.0
    message: str = ""


@dataclass
class SwarmReport:
    applied: Applied = field(default_factory=Applied)
    services: dict[str, ServiceResult] = field(default_factory=dict)
    migrated: bool = False
    uploaded_bytes: int = 0
    uploaded_files: int = 0
    built: dict[str, str] = field(default_factory=dict)  # service -> image by digest
    undo: list[tuple[str, str]] = field(default_factory=list)


class NodeLink:
    """Executors of the edge and data nodes, connected on first use and closed with the apply."""

    def __init__(self, connect):
        self._connect = connect
        self._hosts: dict = {}

    def __call__(self, node: str):
        if node not in self._hosts:
            self._hosts[node] = self._connect(node)
        return self._hosts[node]

    def close(self) -> None:
        for host in self._hosts.values():
            try:
                host.close()
            except Exception:  # closing is best effort
                pass
        self._hosts.clear()


def node_facts(settings, host, node: str) -> sf.NodeFacts:
    text = host.run(sf.node_observe(sw.node_deploy_path(settings, node), settings.stack_name)).text
    return sf.parse_node(node, text)


class SwarmApply:
    def __init__(self, session: Session, plan: SwarmPlan, desired: SwarmDesired, payload: SwarmPayload,
                 observed: SwarmObserved, nodes: NodeLink):
        self.session = session
        self.plan, self.d, self.payload, self.o = plan, desired, payload, observed
        self.m = observed.manager
        self.s = session.s
        self.t = session.t
        self.nodes = nodes
        self.report = SwarmReport()
        self.release, self.previous = plan.release, plan.previous
        self.stack = desired.stack
        self.images: dict[str, str] = {}  # app service -> image by digest
        self.configs: dict[str, sw.ImageConfig] = {}
        self.committed = False
        self.started_at = ""  # the manager's clock when the stack deploy began
        self.edge_sessions: dict = {}  # edge node -> (Session, held lock): only where its gateway files change
        self.stack_undo: list[str] = []  # the services the stack's undo puts back

    # -- helpers ------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        self.session.say(message)

    def run_cmd(self, command, **kw):
        return self.session.run(command, **kw)

    @property
    def rdir(self) -> str:
        return self.t.release_dir(self.release)

    def full(self, service: str) -> str:
        return f"{self.stack}_{service}"

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, steps) -> SwarmReport:
        for step in steps:
            getattr(self, "do_" + step.kind.value.replace("-", "_"))(step)
            self.report.applied.ran(step)
        return self.report

    def abort(self) -> list[tuple[str, str]]:
        if len(self.session.undo):
            self.say("undoing this deploy's changes")
        self.report.undo = list(self.session.undo.run(self.session.warn))
        for node, (session, held) in list(self.edge_sessions.items()):
            self.report.undo += [(f"{node}: {d}", o) for d, o in session.undo.run(session.warn)]
            session.release(held, "deploy", self.release)
        self.edge_sessions.clear()
        if self.stack_undo:
            with shielded():
                try:
                    self._after_stack_undo()
                except HealthdeployError as exc:
                    self.session.warn(f"the stack is going back, but did not converge yet: {exc.message}")
        return self.report.undo

    def commit(self) -> None:
        self.session.undo.discard()
        for session, held in self.edge_sessions.values():
            session.undo.discard()
            session.release(held, "deploy", self.release)
        self.edge_sessions.clear()
        self.committed = True

    # -- steps --------------------------------------------------------------------------------------------
    def do_label_nodes(self, step: Step) -> None:
        from deploy.plan.swarm import label_changes

        for hostname, node, add, remove in label_changes(self.d, self.m):
            # By ID: a hostname can also name an entry of a node that left and joined again.
            found = self.m.node_by_id(node)
            before = found.labels if found else {}
            old_add = {k: before[k] for k in remove if k in before}
            old_remove = tuple(k for k in add if k not in before)
            old_value = {k: before[k] for k in add if k in before}
            self.session.undo.push(f"labels of {hostname} as before",
                                   sc.node_update_labels(node, {**old_add, **old_value}, old_remove), SETTINGS)
            self.run_cmd(sc.node_update_labels(node, add, remove))
        self.say(f"node labels: {'; '.join(step.items)}")

    def do_new_release(self, step: Step) -> None:
        source = self.t.release_dir(self.previous) if self.previous else ""
        self.session.undo.push(f"remove release {self.release}", fs.remove_tree(self.rdir), FILES)
        self.run_cmd(fs.copy_release(source, self.rdir))

    def do_export_source(self, step: Step) -> None:
        mirror = f"{self.t.shared}/git/{pl.sha256(self.s.app_source.encode())[:16]}.git"
        self.run_cmd(gitc.git_fetch(self.s.app_source, mirror, self.d.git_commit), timeout=900)
        self.run_cmd(gitc.git_export(mirror, self.d.git_commit, f"{self.rdir}/src"), timeout=900)

    def do_send_files(self, step: Step) -> None:
        data = pl.tar_of(self.payload.files, step.items, 0o644)
        self.session.host.stream_from_file(fs.extract_tar(self.rdir), io.BytesIO(data))
        self.report.uploaded_bytes += len(data)
        self.report.uploaded_files += len(step.items)
        self.say(f"sent {len(step.items)} file(s), {len(data)} bytes")

    def do_remove_files(self, step: Step) -> None:
        self.run_cmd(fs.remove_paths(self.rdir, step.items))

    def do_write_release(self, step: Step) -> None:
        files = {pl.RELEASE_ENV: self.payload.release_env, pl.MANIFEST: pl.format_manifest(dict(self.d.files))}
        self.session.host.stream_from_file(fs.extract_tar(self.rdir), io.BytesIO(pl.tar_of(files, tuple(files))))

    def do_create_secrets(self, step: Step) -> None:
        created = []
        self.session.undo.push("remove the secrets this deploy created", sc.remove_secrets(tuple(step.items)), FILES)
        for name in step.items:
            self.run_cmd(sc.secret_create(name, self.payload.secrets[name], self.stack,
                                          self.payload.secret_services[name]))
            created.append(name)
        self.say(f"created {len(created)} Swarm secret(s) ({step.reason})")

    def do_create_configs(self, step: Step) -> None:
        created = []
        self.session.undo.push("remove the configs this deploy created", sc.remove_configs(tuple(step.items)), FILES)
        for name in step.items:
            self.run_cmd(sc.config_create(name, self.payload.configs[name], self.stack))
            created.append(name)

    @property
    def docker_config(self) -> str:
        return docker_config_dir(self.s, self.t)

    def do_registry_login(self, step: Step) -> None:
        # Not left at rest on the manager: the services carry what their nodes need to pull.
        self.session.undo.push("log out of the registry", sc.registry_logout(self.s.registry, self.docker_config), FILES)
        self.run_cmd(sc.registry_login(self.s.registry, self.s.registry_user, self.s.registry_password.reveal().encode(),
                                       self.docker_config))

    def do_build(self, step: Step) -> None:
        sandbox = self.s.stack_variant == "sandbox"
        for service in step.items:
            tag = f"{self.s.registry}/{self.stack}/{service}:{self.release}".lower()
            if sandbox:
                command = sc.build_image(tag, f"{self.rdir}/src", {"BASE_IMAGE": self.s.sample_app_image,
                                                                    "SERVICE": service}, network_none=True)
            else:
                command = sc.build_image(tag, f"{self.rdir}/src/{service}")
            self.say(f"building {service}")
            log: list[str] = []
            try:
                self.run_cmd(command, on_line=log.append)
            except RemoteCommandError as exc:
                raise SwarmStepFailed(f"{self.t.alias}: the {service} image build failed; the live release keeps "
                                      "serving", "\n".join(log[-15:]) or exc.message) from None
            try:
                out = self.run_cmd(sc.push_image(tag, self.docker_config)).text
                digest = [line for line in out.splitlines() if "@sha256:" in line][:1]
                configs = sf.parse_image_configs(out[out.find("["):] if "[" in out else "")
            except RemoteCommandError as exc:
                raise SwarmStepFailed(f"{self.t.alias}: pushing {tag} to {self.s.registry} failed: {exc.message}",
                                      "check REGISTRY (and REGISTRY_USER/REGISTRY_PASSWORD); every node pulls from it") from None
            if not digest or "@sha256:" not in digest[0]:
                raise SwarmStepFailed(f"{self.t.alias}: {self.s.registry} gave no digest for {tag}",
                                      "is REGISTRY a registry (docker push must report a digest)?")
            self.images[service] = digest[0]
            self.report.built[service] = digest[0]
            self.configs[service] = configs.get(tag, sw.ImageConfig())
            self.say(f"{service}: pushed {digest[0]}")

    def do_pull(self, step: Step) -> None:
        for ref in step.items:
            self.run_cmd(sc.pull_image(ref, self.docker_config))

    def _stack_text(self) -> str:
        """The stack file of this release: built images by digest, the others as they run now."""
        configs: dict[str, sw.ImageConfig] = {}
        data_refs = tuple(self.d.data_images)
        known = dict(self.m.image_configs)
        if any(r not in known for r in data_refs):
            known.update(sf.parse_image_configs(self.run_cmd(sc.image_configs(data_refs)).text))
        for service in self.d.services:
            if service == GATEWAY:
                continue
            if service in APP_SERVICES:
                if service in self.configs:
                    configs[service] = self.configs[service]
                else:
                    live = self.m.service(service)
                    if live is None or "@sha256:" not in live.image:
                        raise SwarmStepFailed(f"{service} has no image by digest to keep", "deploy again (it will build)")
                    self.images[service] = live.image
                    configs[service] = sw.ImageConfig((), live.args)
            else:
                ref = getattr(self.s, f"{service.replace('-', '_')}_image")
                if ref not in known:
                    raise SwarmStepFailed(f"{self.t.alias}: cannot read the entrypoint and command of {ref}",
                                          "pull it on the manager (the stack file runs them)")
                configs[service] = known[ref]
        releases = {}
        for service in self.d.apps:
            live = self.m.service(service)
            releases[service] = self.release if (service in self.plan.changes or live is None) else (live.release or self.release)
        inputs = sw.StackInputs(release=self.release, images=dict(self.images), image_configs=configs,
                                releases=releases, image_inputs=dict(self.d.image_inputs))
        return sw.render_stack(self.s, self.t, inputs, self.d.definitions)

    def do_validate(self, step: Step) -> None:
        text = self._stack_text()
        files = {sw.STACK_FILE: text.encode(), "stack-data.yaml": sw.data_stack(text, self.d.infra).encode()}
        self.session.host.stream_from_file(sc.unpack_and_check(self.rdir, sw.STACK_FILE),
                                           io.BytesIO(pl.tar_of(files, tuple(files))))
        from deploy.stack.render import sandbox_report

        for line in sandbox_report(self.s):
            self.say(line)

    def _edge_session(self, node: str) -> Session:
        """The edge node locked like the manager (its journal lives in its lock), for as long as the deploy runs."""
        if node not in self.edge_sessions:
            from deploy.core.services import Role
            from deploy.stack.render import Target

            host = self.nodes(node)
            target = Target(alias=node, address=host.address, deploy_path=sw.node_deploy_path(self.s, node),
                            project=self.stack, gateway_bind="", role=Role.APP)
            session = Session(host, self.s, target, self.session.console)
            self.edge_sessions[node] = (session, session.acquire("deploy", self.release))
        return self.edge_sessions[node][0]

    def do_install_gateway_conf(self, step: Step) -> None:
        node = step.target
        session = self._edge_session(node)
        base = f"{sw.node_deploy_path(self.s, node)}/shared/gateway"
        paths = tuple(f"{base}/{p}" for p in sorted(self.payload.gateway_files))
        session.run(fs.mkdirs(base, f"{base}/upstreams", f"{base}/tls"))
        session.undo.push("the previous gateway files", sc.restore_gateway_files(self.stack, f"{GATEWAY_DIR}/nginx.conf",
                                                                                 paths), SETTINGS)
        for path, data in sorted(self.payload.gateway_files.items()):
            session.run(_install(f"{base}/{path}", data, "0600" if path.endswith("key.pem") else "0644"))
        reloaded = session.run(sc.reload_gateway(self.stack, f"{GATEWAY_DIR}/nginx.conf")).text.strip()
        self.say(f"{node}: gateway files installed ({step.reason})" + ("; reloaded" if reloaded == "reloaded" else ""))

    def do_deploy_data(self, step: Step) -> None:
        changed = [s for s in self.d.infra if s in self.plan.changes]
        self.say(f"data layer: {', '.join(step.items)}")
        self._register_stack_undo(changed)
        self.started_at = self._manager_now()
        self.run_cmd(sc.stack_deploy(self.stack, f"{self.rdir}/stack-data.yaml", self.docker_config))
        self.wait_converged(changed)

    def do_migrate(self, step: Step) -> None:
        image = self.images.get("backend")
        secret = self.d.secrets.get("backend")
        name = f"{self.stack}_migrate-{self.release.lower()[-8:]}-{int(time.time()) % 100000}"
        self.say(f"migrating: {self.s.migrate_command} (one-off task {name} on {self.stack}_default)")
        env = ()
        self.run_cmd(sc.job_create(name, self.stack, f"{self.stack}_default", image, secret, "1001",
                                   self.s.migrate_command, env, "node.labels.healthdeploy.app == true",
                                   names=tuple(self.d.infra)))
        try:
            task = self._wait_job(name)
            logs = self.run_cmd(sc.service_logs(name, tail=40), check=False)
            text = redact((logs.text + logs.err).strip(), self.s.secrets)
            if task is None or task.state != "complete":
                why = (task.error or task.state) if task else "it never ran"
                raise SwarmStepFailed(f"{self.t.alias}: migration failed, nothing was switched ({why})",
                                      text[-1500:] or "see `docker service logs` of the job")
            for line in text.splitlines()[-5:]:
                self.say(f"migrate: {line}")
            self.report.migrated = True
        finally:
            with shielded():
                self.run_cmd(sc.service_remove((name,)), check=False)

    def _wait_job(self, name: str) -> sf.Task | None:
        def check():
            text = self.run_cmd(_job_tasks(name)).text
            task = sf.parse_job(text)
            if task is not None and task.state in ("complete", "failed", "rejected", "shutdown", "orphaned"):
                return task
            return None
        try:
            return wait_for(check, max(120.0, float(self.s.health_timeout) * 2), f"migration {name}", interval=1.0)
        except WaitTimeout:
            return None

    def do_deploy_stack(self, step: Step) -> None:
        changed = [s for s in self.d.services if s in self.plan.changes]
        if step.items:
            self.say(f"stack: {', '.join(step.items)}")
        self._register_stack_undo(changed)
        if not self.started_at:
            self.started_at = self._manager_now()
        self.run_cmd(sc.stack_deploy(self.stack, f"{self.rdir}/{sw.STACK_FILE}", self.docker_config))
        self.wait_converged(changed)
        self.rebalance(list(self.d.apps))

    def do_rebalance(self, step: Step) -> None:
        self.started_at = self._manager_now()
        self.rebalance(list(self.d.apps))

    def rebalance(self, services: list[str]) -> None:
        """Spread each stateless service over the app nodes when its tasks crowd on fewer (after a start-first
        update, or after a node that failed came back: Swarm never moves a running task). One more task is
        placed where the service has none, then the service is scaled back: Swarm removes the extra task from
        the node that has the most, and the gateways follow both through DNS (zero downtime)."""
        from deploy.plan.swarm import crowded_services

        for _ in range(2):
            _, polled, tasks, nodes = sf.parse_tasks_poll(
                self.run_cmd(sf.services_and_tasks(self.stack, tuple(services), nodes=True)).text, self.stack)
            m = sf.ManagerFacts(services=tuple(polled), tasks=tuple(t for t in tasks if t.desired == "running"),
                                nodes=tuple(nodes))
            crowded = {s: w for s, w in crowded_services(self.d, m).items() if s in services}
            if not crowded:
                return
            ready = [n for n in m.nodes if n.ready and n.labels.get("healthdeploy.app") == "true"]
            plus = {}
            for service in crowded:
                live = m.service(service)
                hosting = {t.node_id for t in m.tasks_of(service) if t.running}
                plus[service] = (live.replicas, live.replicas + min(live.replicas, len(ready)) - len(hosting))
            self.say("spreading " + "; ".join(f"{s} ({w})" for s, w in crowded.items()))
            self.run_cmd(sc.service_scale(tuple((self.full(s), up) for s, (_, up) in plus.items())))
            wanted = {s: m.service(s).definition for s in plus}
            self.wait_converged(list(plus), definitions=wanted, quiet=True)
            self.run_cmd(sc.service_scale(tuple((self.full(s), n) for s, (n, _) in plus.items())))
            self.wait_converged(list(plus), definitions=wanted, quiet=True)
        self.session.warn(f"tasks still crowded after spreading: {', '.join(crowded)}")

    def _manager_now(self) -> str:
        return self.run_cmd(sf_now()).text.strip()

    def _register_stack_undo(self, changed: list[str]) -> None:
        """Once per deploy, before its first change of a service: every service this deploy changes goes back
        together (per stack): the previous release's stack file deployed again (no release yet: Swarm's own
        rollback of each), the application services it creates removed. A command in the manager's journal."""
        if self.stack_undo:
            return
        planned = [s for s in self.d.services if s in self.plan.changes]
        created = tuple(s for s in planned if self.m.service(s) is None and s not in self.d.infra)
        existed = tuple(s for s in planned if self.m.service(s) is not None)
        previous = f"{self.t.release_dir(self.previous)}/{sw.STACK_FILE}" if self.previous else ""
        self.stack_undo = list(existed) + list(created)
        self.session.undo.push("the stack as before this deploy",
                               sc.stack_back(self.stack, previous, self.docker_config, created, existed), SERVICES)

    def _after_stack_undo(self) -> None:
        """After the journal ran: wait until the services are back on their previous definitions (report)."""
        existed = [s for s in self.stack_undo if self.m.service(s) is not None]
        created = [s for s in self.stack_undo if s not in existed]
        self.say(f"the stack goes back: {', '.join(existed) or 'nothing'} to {self.previous or 'their previous spec'}"
                 + (f"; removed {', '.join(created)}" if created else ""))
        if existed:
            self.wait_converged(existed, definitions={s: self.m.service(s).definition for s in existed},
                                rolling_back=True)
        for s in self.stack_undo:
            result = self.report.services.get(s)
            if result is not None and result.action != "failed":
                result.action = "rolled-back" if s in existed else "removed"

    # -- waiting ------------------------------------------------------------------------------------------
    def wait_converged(self, services: list[str], definitions: dict[str, str] | None = None,
                       rolling_back: bool = False, quiet: bool = False) -> None:
        if not services:
            return
        wanted = definitions or {s: self.d.definitions[s] for s in services}
        started = sf.parse_time(self.started_at)
        begun = time.monotonic()
        done: dict[str, float] = {}
        timeout = float(self.s.health_timeout) + self.s.swarm_monitor * max(2, self.s.swarm_replicas) + 90
        edge = [n for n in self.d.edge_nodes]
        last: dict[str, str] = {}

        def check():
            now, services_now, tasks, nodes = sf.parse_tasks_poll(
                self.run_cmd(sc_tasks(self.stack, tuple(services))).text, self.stack)
            by_name = {x.service: x for x in services_now}
            for service in services:
                if service in done:
                    continue
                live = by_name.get(service)
                if live is None:
                    last[service] = "not created yet"
                    continue
                mine = [t for t in tasks if t.service_id == live.id]
                verdict = _converged(service, live, mine, wanted[service], started, nodes, edge, self.s,
                                     rolling_back=rolling_back)
                if verdict is True:
                    done[service] = time.monotonic() - begun
                    if quiet:
                        continue
                    running = [t for t in mine if t.running and t.definition == wanted[service]]
                    action = ("rolled back" if rolling_back else
                              "created" if self.plan.changes.get(service) == "created" else "updated")
                    self.report.services[service] = ServiceResult(service, action.replace(" ", "-"),
                                                                  f"{len(running)}/{len(running)}", round(done[service], 1))
                    self.say(f"{service}: {action}, {len(running)} task(s) running the new definition "
                             f"({done[service]:.1f}s)")
                elif isinstance(verdict, str) and verdict.startswith("failed:") and not rolling_back:
                    reason = verdict[len("failed:"):].strip()
                    self.report.services[service] = ServiceResult(service, "failed", message=reason)
                    raise StackRolledBack(f"{self.t.alias}: {service} failed: {reason}", service, reason,
                                          self._logs(service))
                else:
                    last[service] = verdict
            return True if len(done) == len(services) else None

        try:
            wait_for(check, timeout, "services converged", interval=POLL)
        except WaitTimeout:
            pending = [s for s in services if s not in done]
            reason = "; ".join(f"{s}: {last.get(s, '?')}" for s in pending)
            if rolling_back:
                raise HealthdeployError(f"the stack did not converge back within {timeout:.0f}s ({reason})",
                                        "`fab status` shows the tasks") from None
            for s in pending:
                self.report.services[s] = ServiceResult(s, "failed", message=last.get(s, ""))
            raise StackRolledBack(f"{self.t.alias}: not converged within {timeout:.0f}s: {reason}",
                                  pending[0], last.get(pending[0], ""), self._logs(pending[0])) from None

    def _logs(self, service: str) -> str:
        result = self.run_cmd(sc.service_logs(self.full(service), tail=25), check=False)
        return redact((result.text + result.err).strip()[-3000:], self.s.secrets)

    # -- after the stack ----------------------------------------------------------------------------------
    def do_verify(self, step: Step) -> None:
        """Each edge gateway's upstream files list exactly the running tasks, and each site answers /health."""
        from concurrent.futures import ThreadPoolExecutor

        deadline = time.monotonic() + VERIFY_TIMEOUT
        apps = list(self.d.apps)
        urls = tuple(f"http://127.0.0.1:{GATEWAY_PORT_OF[s]}/health" for s in apps)

        def check(node: str) -> list[str]:
            text = self.nodes(node).run(sf.gateway_check(sw.node_deploy_path(self.s, node), self.stack, urls)).text
            facts, probes = sf.parse_gateway_check(node, text)
            problems = []
            for service in apps:
                listed = tuple(sorted(facts.upstreams.get(service, ())))
                if listed != expected[service]:
                    problems.append(f"{node}: the {service} upstream lists {', '.join(listed) or 'nothing'}, "
                                    f"the running tasks are {', '.join(expected[service]) or 'none'}")
            if facts.container_of(self.full(GATEWAY)) is None:
                return problems + [f"{node}: no gateway container runs"]
            bad = [u for u in urls if f"ok {u}" not in probes.splitlines()]
            if bad:
                problems.append(f"{node}: no answer through the gateway from {', '.join(bad)}")
            return problems

        with ThreadPoolExecutor(max_workers=max(1, len(step.items))) as pool:
            while True:
                _, services_now, tasks, _ = sf.parse_tasks_poll(
                    self.run_cmd(sf.services_and_tasks(self.stack, tuple(apps))).text, self.stack)
                by_name = {x.service: x for x in services_now}
                expected = {}
                for service in apps:
                    live = by_name.get(service)
                    addresses = [a for t in tasks if live and t.service_id == live.id and t.running for a in t.addresses]
                    expected[service] = tuple(sorted(f"{a}:{APP_PORTS[service]}" for a in addresses))
                problems = [p for found in pool.map(check, step.items) for p in found]
                if not problems:
                    self.say(f"verified through the gateways of {', '.join(step.items)}")
                    return
                if time.monotonic() > deadline:
                    raise StackRolledBack(f"{self.t.alias}: the gateways do not serve the new tasks: {problems[0]}",
                                          GATEWAY, problems[0])
                time.sleep(0.5)

    def do_switch(self, step: Step) -> None:
        self.run_cmd(fs.switch_symlink(self.t.current, f"releases/{self.release}"))

    def do_record(self, step: Step) -> None:
        write_state(self.session, self.m, self.release, "deploy")

    def do_prune(self, step: Step) -> None:
        if self.s.registry_user:
            self.run_cmd(sc.registry_logout(self.s.registry, self.docker_config), check=False)
        releases = sorted(set(self.m.host.releases) | {self.release})
        keep = set(releases[-self.d.keep_releases:]) | {self.release}
        doomed = [r for r in releases if r not in keep]
        for release in doomed:
            self.run_cmd(fs.remove_tree(self.t.release_dir(release)), check=False)
        names = self.run_cmd(_referenced(self.t.releases, self.stack), check=False).text.split()
        referenced = set(names) | set(self.d.secrets.values()) | set(self.d.configs)
        self.run_cmd(sc.remove_secrets(tuple(sorted(n for n in self.m.secrets if n not in referenced))), check=False)
        self.run_cmd(sc.remove_configs(tuple(sorted(n for n in self.m.configs if n not in referenced))), check=False)
        if doomed:
            self.say(f"pruned {len(doomed)} old release(s)")


# -- pieces -----------------------------------------------------------------------------------------------
def _converged(service, live: sf.Service, tasks: list[sf.Task], wanted: str, started, nodes, edge_nodes,
               settings, rolling_back: bool = False):
    """True, "failed: why", or a string saying what it waits for. Rolling back, Swarm's own rollback is the
    way back, not a failure, and the service counts as back only once no update of it is in progress (with
    start-first, an update under way runs a task more than the replicas)."""
    update = live.update
    update_started = sf.parse_time(update.started)
    recent = started is None or (update_started is not None and update_started >= started)
    if rolling_back and update.state in ("updating", "rollback_started"):
        return f"Swarm is still {'rolling back' if update.state == 'rollback_started' else 'updating'}"
    if rolling_back:
        recent = False
    if recent and update.state in ("rollback_started", "rollback_completed", "rollback_paused"):
        return "failed: " + (update.message or "Swarm rolled the update back")
    if recent and update.state == "paused":
        return "failed: " + (update.message or "the update paused")
    current = [t for t in tasks if t.desired == "running"]
    good = [t for t in current if t.state == "running" and t.definition == wanted]
    failures = [t for t in tasks if t.definition == wanted and t.failed
                and (started is None or (sf.parse_time(t.timestamp) or started) >= started)]
    if live.mode == "global":
        ready = {n.id for n in nodes if n.ready and n.labels.get("healthdeploy.edge") == "true"}
        expected = len(ready)
    else:
        expected = live.replicas
    if live.definition != wanted:
        return f"its spec is not the deployed one yet ({live.definition or 'none'})"
    if recent and update.state == "updating":
        return f"updating ({len(good)}/{expected} new task(s) running)"
    if len(failures) >= 3 and len(good) < expected:
        return "failed: " + (failures[-1].error or failures[-1].state) + f" ({len(failures)} failed task(s))"
    if len(good) == expected and len(current) == expected:
        return True
    starting = [t for t in current if t.state != "running"]
    return f"{len(good)}/{expected} task(s) running the new definition" + (
        f", {len(starting)} {starting[0].state}" if starting else "")


def sc_tasks(stack: str, services: tuple[str, ...]):
    return sf.services_and_tasks(stack, services, nodes=GATEWAY in services)


def sf_now():
    from deploy.commands.base import cmd

    return cmd("date", "-u", "+%Y-%m-%dT%H:%M:%S.%NZ", description="read the manager's clock", readonly=True)


def _job_tasks(name: str):
    from deploy.commands.base import script

    return script('ids=$(docker service ps -q --no-trunc "$1" 2>/dev/null); [ -n "$ids" ] && docker inspect $ids; exit 0',
                  name, description=f"read the tasks of {name}", readonly=True)


def _install(path: str, data: bytes, mode: str):
    from deploy.commands.base import script

    return script(INSTALL_FILE, mode, path, description=f"install {path}", stdin=data, intent=("install", path))


def _referenced(releases_dir: str, stack: str):
    """Names of Swarm objects the kept releases' stack files use (a rollback may need them)."""
    from deploy.commands.base import script

    return script('cat "$1"/*/stack.yaml 2>/dev/null | grep -o "name: $2_[^ ]*" | sed "s/^name: //" | sort -u; exit 0',
                  releases_dir, stack, description="list the Swarm objects kept releases use", readonly=True)


def docker_config_dir(settings, target) -> str:
    """healthdeploy's docker client config on the manager (registry credentials), only with REGISTRY_USER."""
    return f"{target.shared}/docker" if settings.registry_user else ""


def write_state(session: Session, m: sf.ManagerFacts, release: str, event: str) -> None:
    history = list(m.state.get("history", []) if isinstance(m.state, dict) else [])[-(STATE_HISTORY - 1):]
    history.append({"release": release, "at": utc_now(), "event": event})
    state = {"live": release, "history": history}
    session.run(fs.write_file(f"{session.t.shared}/state.json", (json.dumps(state, indent=1) + "\n").encode(), "0644")
                .tagged("state", release))


def stack_file_names(text: str) -> dict:
    """The external names a stack file's secrets and configs point at (for a rollback)."""
    data = yaml.safe_load(text) or {}
    return {"secrets": {k: (v or {}).get("name", "") for k, v in (data.get("secrets") or {}).items()},
            "configs": {k: (v or {}).get("name", "") for k, v in (data.get("configs") or {}).items()}}
