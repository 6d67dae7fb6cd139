"""A real Docker Swarm of three namespaced engines (the testbed) for tests/integration/test_swarm.py.

``swarm_cluster`` (module) takes the testbed nodes of ``testbed_hosts`` (HEALTHDEPLOY_TESTBED_HOSTS; at least
three), the registry on 10.251.0.1:5000, makes the first node a manager and the others workers of one swarm
(a node in another swarm leaves it first), removes what an earlier run of this module left (its stack, secrets,
configs, volumes, deploy directories) and yields a ``SwarmEnv``: an env file of TARGET=swarm in a temporary
env dir and its own copy of the sample app. The stack is removed at the end (HEALTHDEPLOY_KEEP_SWARM=1 keeps it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.core.settings import PROJECT_ROOT
from deploy.sandbox import netns
from testbed_env import docker, eventually

SANDBOX_ENV = (PROJECT_ROOT / "env" / "sandbox.env").read_text()
ENV_NAME = "tsw"
STACK = "hdtsw"
SUBNET = "10.254.0.0/24"
DEPLOY_ROOT = Path("/var/lib/healthdeploy-test-swarm")
REGISTRY_PREFIX = f"{netns.REGISTRY}/healthdeploy-test"


def _swarm_state(node: netns.Node) -> tuple[str, str, bool]:
    """(local node state, the managers it knows, is it a manager)."""
    out = docker(node, "info", "--format",
                 "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} {{range .Swarm.RemoteManagers}}{{.Addr}},{{end}}")
    parts = (out.stdout.split() + ["", "", ""])[:3]
    return parts[0], parts[2], parts[1] == "true"


def form_swarm(nodes: list[netns.Node]) -> None:
    """nodes[0] a manager, the others its workers (idempotent)."""
    manager = nodes[0]
    state, cluster, is_manager = _swarm_state(manager)
    if state == "active" and not is_manager:
        docker(manager, "swarm", "leave", "--force")
        state = "inactive"
    if state != "active":
        init = docker(manager, "swarm", "init", "--advertise-addr", manager.address)
        assert init.returncode == 0, init.stderr
    token = docker(manager, "swarm", "join-token", "-q", "worker").stdout.strip()
    for node in nodes[1:]:
        state, managers, _ = _swarm_state(node)
        if state == "active" and f"{manager.address}:2377" in managers.split(","):
            continue
        if state != "inactive":
            docker(node, "swarm", "leave", "--force")
        join = docker(node, "swarm", "join", "--token", token, f"{manager.address}:2377", timeout=120)
        assert join.returncode == 0, join.stderr
    # Entries of nodes that left an earlier swarm of this manager show as down: remove them.
    for line in docker(manager, "node", "ls", "--format", "{{.ID}} {{.Status}}").stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "Down":
            docker(manager, "node", "rm", "--force", parts[0])
    assert eventually(lambda: all(s == "Ready" for s in _node_states(manager, nodes).values()), timeout=60), \
        _node_states(manager, nodes)


def _node_states(manager: netns.Node, nodes: list[netns.Node]) -> dict[str, str]:
    out = docker(manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout
    states = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return {n.name: states.get(n.name, "absent") for n in nodes}


def remove_leftovers(nodes: list[netns.Node], stack: str = STACK, env_name: str = ENV_NAME,
                     compose_project: str = "hd-tsw-compose", deploy_root: Path = DEPLOY_ROOT) -> None:
    """Remove the stack, its containers, volumes, secrets, configs and network, the Compose project of the
    same environment, its deploy directories and backups."""
    manager = nodes[0]
    docker(manager, "stack", "rm", stack)
    eventually(lambda: not docker(manager, "service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={stack}")
               .stdout.strip(), timeout=60)
    for node in nodes:  # the containers stop a moment after their services are gone
        eventually(lambda node=node: not docker(node, "ps", "-aq", "--filter",
                                                f"label=com.docker.stack.namespace={stack}").stdout.strip(), timeout=60)
        compose = docker(node, "ps", "-aq", "--filter", f"label=com.docker.compose.project={compose_project}").stdout.split()
        if compose:  # the Compose target of the backup test
            docker(node, "rm", "-f", "-v", *compose)
        docker(node, "network", "rm", f"{compose_project}_default")
        volumes = [v for v in docker(node, "volume", "ls", "-q").stdout.split()
                   if v.startswith((f"{stack}_", f"{compose_project}_"))]
        if volumes:
            docker(node, "volume", "rm", "-f", *volumes)
    for kind in ("secret", "config"):
        names = [n for n in docker(manager, kind, "ls", "--format", "{{.Name}}").stdout.split() if n.startswith(f"{stack}_")]
        if names:
            docker(manager, kind, "rm", *names)
    eventually(lambda: stack + "_default" not in docker(manager, "network", "ls", "--format", "{{.Name}}").stdout,
               timeout=30)
    for node in nodes:  # these nodes' trees only: another run may use other nodes under the same root
        shutil.rmtree(deploy_root / node.name, ignore_errors=True)
    shutil.rmtree(PROJECT_ROOT / "backups" / env_name, ignore_errors=True)


class SwarmEnv:
    def __init__(self, directory: Path, nodes: list[netns.Node]):
        self.directory, self.nodes = directory, nodes
        self.app = directory / "app"
        self.manager, self.edge, self.other = nodes[0], nodes[1], nodes[2]
        shutil.copytree(PROJECT_ROOT / "deploy" / "sandbox" / "app", self.app,
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.compose_dir = directory / "compose"
        self.compose_dir.mkdir()

    def values(self, **overrides: str) -> dict[str, str]:
        n = self.nodes
        values = {
            "TARGET": "swarm", "HOSTS": n[0].name,
            "SWARM_NODES": f"{n[0].name}=data,{n[1].name}=app+edge,{n[2].name}=app+edge",
            "SWARM_STACK": STACK, "SWARM_SUBNET": SUBNET, "SWARM_REPLICAS": "2", "SWARM_PARALLELISM": "2",
            "SWARM_MONITOR": "1", "REGISTRY": REGISTRY_PREFIX,
            # The test bed's registry asks for no credentials, but the login path runs (password on stdin).
            "REGISTRY_USER": "healthdeploy", "REGISTRY_PASSWORD": "testbed-registry-pass-5d1e",
            "DEPLOY_PATH": str(DEPLOY_ROOT) + "/{host}/{env}", "APP_SOURCE": str(self.app), "HEALTH_TIMEOUT": "40",
            "KEEP_RELEASES": "3", "SSH_CONFIG": str(PROJECT_ROOT / ".sandbox/ssh_config"),
            "SSH_KNOWN_HOSTS": str(PROJECT_ROOT / ".sandbox/known_hosts"),
        }
        values.update(overrides)
        return values

    def write(self, directory: Path | None = None, **overrides: str) -> None:
        values = self.values(**overrides)
        lines = [line for line in SANDBOX_ENV.splitlines() if line.split("=", 1)[0] not in values]
        lines += [f"{k}={v}" for k, v in values.items() if v is not None]
        (directory or self.directory).joinpath(f"{ENV_NAME}.env").write_text("\n".join(lines) + "\n")

    def write_compose(self, **overrides: str) -> None:
        """The same environment name as the Compose target on the data node (backups cross between them)."""
        base = {"TARGET": "compose", "SWARM_NODES": "", "SWARM_SUBNET": "", "REGISTRY": "", "REGISTRY_USER": "",
                "REGISTRY_PASSWORD": "", "SWARM_STACK": "healthdeploy-{env}", "COMPOSE_PROJECT": "hd-tsw-compose",
                "GATEWAY_BIND": "{address}", "PUBLISH_INFRA": "none",
                # a path of its own: a Compose deploy refuses a path whose live release is the stack's
                "DEPLOY_PATH": str(DEPLOY_ROOT) + "/{host}/{env}-compose"}
        base.update(overrides)
        self.write(self.compose_dir, **base)

    def run(self, *args: str, timeout: float = 900, compose: bool = False) -> subprocess.CompletedProcess:
        env = {**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.compose_dir if compose else self.directory),
               "PYTHONPATH": str(PROJECT_ROOT)}
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)

    def fab(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("fab", *args[:1], "--env", ENV_NAME, *args[1:], **kw)

    def inv(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("inv", *args[:1], "--env", ENV_NAME, *args[1:], **kw)

    def set_build(self, service: str, build_id: str) -> None:
        (self.app / service / "build_id").write_text(build_id + "\n")

    def deploy_root(self, node: netns.Node | None = None) -> Path:
        return DEPLOY_ROOT / (node or self.manager).name / ENV_NAME

    def url(self, port: int, path: str, node: netns.Node | None = None) -> str:
        return f"http://{(node or self.edge).address}:{port}{path}"

    def container_of(self, node: netns.Node, service: str) -> str:
        out = docker(node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}").stdout.split()
        return out[0] if out else ""


@pytest.fixture(scope="module")
def swarm_cluster(testbed_hosts, tmp_path_factory):
    nodes = list(testbed_hosts)
    assert len(nodes) >= 3, "the Swarm tests need three testbed nodes (HEALTHDEPLOY_TESTBED_HOSTS)"
    nodes = nodes[:3]
    netns.ensure_registry()
    for node in nodes:
        if netns.is_cut(node.name):
            netns.heal(node.name)
    form_swarm(nodes)
    remove_leftovers(nodes)
    env = SwarmEnv(tmp_path_factory.mktemp("swarm"), nodes)
    env.write()
    yield env
    for node in nodes:
        if netns.is_cut(node.name):
            netns.heal(node.name)
    if os.environ.get("HEALTHDEPLOY_KEEP_SWARM") != "1":
        remove_leftovers(nodes)


def get_json(url: str, timeout: float = 5, data: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def summary(proc) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def psql(node: netns.Node, container: str, sql: str) -> str:
    proc = docker(node, "exec", container, "psql", "-X", "-q", "-A", "-t", "-U", "admin", "-d", "health_mgmt", "-c", sql)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


CHECKSUM_SQL = ("SELECT (SELECT count(*) FROM requests) || ' ' || "
                "coalesce((SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM requests t), '-') || ' ' || "
                "coalesce((SELECT md5(string_agg(t::text, '|' ORDER BY t.name)) FROM schema_migrations t), '-')")


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)
