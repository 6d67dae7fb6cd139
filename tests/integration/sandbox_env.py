"""The shared sandbox for integration tests: real sshd hosts on 127.0.0.2/.3, the real Docker engine,
images built offline. Set up once per run; each test that deploys uses its own copy of the sample
app and its own env file (in a temporary env dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.sandbox import images

from deploy.sandbox import hosts as sandbox
from deploy.sandbox import setup
from deploy.core.settings import PROJECT_ROOT

SANDBOX_ENV = (PROJECT_ROOT / "env" / "sandbox.env").read_text()
# Tests use their own sandbox hosts (127.0.0.6-8), so the README's demo on `sandbox` (127.0.0.2)
# can stay up while they run.
# HEALTHDEPLOY_TEST_HOSTS=sandbox15,sandbox16,sandbox17 lets a second checkout run its suite beside this one.
# Parallel workers (pytest-xdist: gw0, gw1, ...) get their own three hosts each: sandbox5-7, sandbox8-10, ...
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
TEST_HOSTS = tuple(os.environ.get("HEALTHDEPLOY_TEST_HOSTS", ",".join(
    f"sandbox{5 + 3 * _WORKER + i}" for i in range(3))).split(","))
MAIN = TEST_HOSTS[0]
MAIN_ADDRESS = sandbox.host_for(MAIN).address


def _remove_leftovers() -> None:
    """Compose projects and deploy dirs left by an earlier run (Docker state outlives a stop)."""
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=com.docker.compose.project"],
                         capture_output=True, text=True).stdout.split()
    ids = []
    for cid in out:
        project = subprocess.run(["docker", "inspect", "--format", '{{index .Config.Labels "com.docker.compose.project"}}', cid],
                                 capture_output=True, text=True).stdout.strip()
        if project.startswith("hd-t") and project.endswith(tuple(f"-{h}" for h in TEST_HOSTS)):
            ids.append(cid)
    if ids:
        subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True)
    subprocess.run("docker ps -aq --filter label=healthdeploy.role=drill | xargs -r docker rm -f -v", shell=True,
                   capture_output=True)  # restore drills killed before their clean-up
    for host in TEST_HOSTS:
        subprocess.run(f"docker network ls -q --filter name=hd-t | xargs -r -n1 docker network inspect --format '{{{{.Name}}}}' "
                       f"| grep -- '-{host}_' | xargs -r docker network rm", shell=True, capture_output=True)
        subprocess.run(f"docker volume ls -q --filter name=hd-t | grep -- '-{host}_' | xargs -r docker volume rm", shell=True,
                       capture_output=True)
        shutil.rmtree(f"/var/lib/healthdeploy-test/{host}", ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox_hosts():
    setup.ensure_machine()
    images.build_all()
    _remove_leftovers()
    hosts = sandbox.up(list(TEST_HOSTS), install=False)
    yield hosts


class Env:
    """One test environment: env/<name>.env in a temporary env dir, its own app source copy."""

    def __init__(self, directory: Path, name: str, app: Path):
        self.directory, self.name, self.app = directory, name, app

    @property
    def project_prefix(self) -> str:
        return f"hd-t{self.name}"

    def write(self, hosts: str = MAIN, **overrides: str) -> None:
        values = {
            "HOSTS": hosts,
            "DEPLOY_PATH": "/var/lib/healthdeploy-test/{host}/{env}",
            "COMPOSE_PROJECT": "hd-t{env}-{host}",
            "APP_SOURCE": str(self.app),
            "HEALTH_TIMEOUT": "40",
            "KEEP_RELEASES": "3",
            "SSH_CONFIG": str(PROJECT_ROOT / ".sandbox/ssh_config"),
            "SSH_KNOWN_HOSTS": str(PROJECT_ROOT / ".sandbox/known_hosts"),
        }
        values.update(overrides)
        lines = [line for line in SANDBOX_ENV.splitlines() if line.split("=", 1)[0] not in values]
        lines += [f"{k}={v}" for k, v in values.items()]
        (self.directory / f"{self.name}.env").write_text("\n".join(lines) + "\n")

    def run(self, *args: str, timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.directory), **(extra_env or {})}
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)

    def fab(self, *args: str, hosts: str = MAIN, **kw) -> subprocess.CompletedProcess:
        return self.run("fab", "-H", hosts, *args, **kw)

    def set_build(self, service: str, build_id: str) -> None:
        (self.app / service / "build_id").write_text(build_id + "\n")

    def deploy_root(self, host: str = MAIN) -> Path:
        return Path(f"/var/lib/healthdeploy-test/{host}/{self.name}")


def _cleanup(env: "Env") -> None:
    for host in TEST_HOSTS:
        sandbox.remove_project(f"hd-t{env.name}-{host}")
        shutil.rmtree(f"/var/lib/healthdeploy-test/{host}/{env.name}", ignore_errors=True)


def new_env(factory, name: str) -> "Env":
    directory = factory.mktemp("env")
    app = directory / "app"
    shutil.copytree(PROJECT_ROOT / "deploy" / "sandbox" / "app", app, ignore=shutil.ignore_patterns("__pycache__"))
    env = Env(directory, name, app)
    env.write()
    return env


@pytest.fixture
def make_env(sandbox_hosts, tmp_path_factory):
    created = []

    def make(name: str) -> Env:
        env = new_env(tmp_path_factory, name)
        created.append(env)
        return env

    yield make
    for env in created:
        _cleanup(env)


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_for(url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get_json(url)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
