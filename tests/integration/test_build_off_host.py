"""Builds off the serving host, for real (docs/build.md): real sshd, real engines, healthdeploy's registry
(Debian's docker-registry) on this machine, images pulled through a reverse tunnel of each host's SSH connection.

On the namespaced test bed (its own nodes, testbed_env.GROUPS["build"]: TARGET with its own engine, BUILDER a
build host with another):
- BUILD_ON=operator: built here, shipped into TARGET; the stack serves; nothing was built on TARGET (no build cache,
  no intermediate image, only release tags besides the test bed's own images);
- a one-file change ships only the top layer (bytes measured at the tunnel: a few kB of a 555 MB image);
- BUILD_ON=BUILDER: built on the build host, pushed through its tunnel, shipped into TARGET;
- a build failure changes nothing on TARGET; a ship that fails (the registry lost a blob) leaves TARGET as it was.
On a loopback sandbox host (the operator's own engine): BUILD_ON=operator only tags what is there (0 bytes shipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.sandbox import netns, setup
from sandbox_env import MAIN, MAIN_ADDRESS, _cleanup, new_env
from testbed_env import docker, group_nodes, nodes_of_group

TARGET, BUILDER = group_nodes("build")[:2]
testbed_hosts = nodes_of_group("build")
NODE = {n: netns.node_for(n) for n in (TARGET, BUILDER)}
ENV = "bo"


def cleanup_node(env_name: str) -> None:
    for name, node in NODE.items():
        ids = docker(node, "ps", "-aq", "--filter", f"label=com.docker.compose.project=hd-t{env_name}-{name}").stdout.split()
        if ids:
            docker(node, "rm", "-f", "-v", *ids)
        docker(node, "network", "rm", f"hd-t{env_name}-{name}_default")
        volumes = docker(node, "volume", "ls", "-q", "--filter", f"name=hd-t{env_name}-{name}_").stdout.split()
        if volumes:
            docker(node, "volume", "rm", *volumes)
        tags = docker(node, "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        ours = [t for t in tags if t.startswith((f"healthdeploy/hd-t{env_name}-", f"healthdeploy/build-{env_name}/"))]
        # and a pull's own references an earlier run's cut ship left (127.0.0.1:<port>/healthdeploy/<env>/...)
        ours += [r for r in docker(node, "images", "--digests", "--format", "{{.Repository}}@{{.Digest}}").stdout.split()
                 if r.startswith("127.0.0.1:") and f"/healthdeploy/{env_name}/" in r]
        if ours:
            docker(node, "image", "rm", *ours)
        subprocess.run(["rm", "-rf", f"/var/lib/healthdeploy-test/{name}/{env_name}"])
    remove_local_build_images(env_name)


def remove_local_build_images(env_name: str) -> None:
    tags = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter",
                           f"reference=healthdeploy/build-{env_name}/*"], capture_output=True, text=True).stdout.split()
    if tags:
        subprocess.run(["docker", "image", "rm", *tags], capture_output=True)


@pytest.fixture(scope="module")
def env(testbed_hosts, tmp_path_factory):
    setup.ensure_tools(setup.REGISTRY_TOOLS)  # the shipping registry runs on this machine
    env = new_env(tmp_path_factory, ENV)
    cache = env.directory / "build-cache"
    env.write(hosts=TARGET, BUILD_ON="operator", BUILD_CACHE=str(cache))
    env.cache = cache
    cleanup_node(ENV)
    yield env
    cleanup_node(ENV)


def fab(env, *args, timeout=1200):
    return env.run("fab", args[0], "--env", env.name, *args[1:], timeout=timeout)


def outcome(proc) -> tuple[dict, dict]:
    data = json.loads(proc.stdout[proc.stdout.index("{"):])
    return data["hosts"][0], data.get("build") or {}


def get_build(port: int = 5000, path: str = "/api/build") -> str:
    with urllib.request.urlopen(f"http://{NODE[TARGET].address}:{port}{path}", timeout=10) as response:
        return json.loads(response.read())["build"]


def engine_state(name: str) -> dict:
    """What a node's engine holds: tags with their IDs, dangling/intermediate images, build cache, containers."""
    node = NODE[name]
    tags = dict(line.split() for line in docker(node, "images", "--no-trunc", "--format",
                                                "{{.Repository}}:{{.Tag}} {{.ID}}").stdout.splitlines())
    dangling = docker(node, "images", "-a", "-q", "--filter", "dangling=true").stdout.split()
    df = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in docker(
        node, "system", "df", "--format", "{{.Type}}|{{.TotalCount}} {{.Size}}").stdout.replace("Build Cache", "BuildCache").replace("|", " ").splitlines()}
    containers = sorted(docker(node, "ps", "-q", "--no-trunc", "--filter",
                               f"label=com.docker.compose.project=hd-t{ENV}-{name}").stdout.split())
    return {"tags": tags, "dangling": dangling, "build_cache": df.get("BuildCache", ""), "containers": containers}


def differences(before: dict, after: dict) -> dict:
    """What changed between two ``engine_state``s, readable in a failure: tags added/removed/moved, and the rest."""
    out = {}
    added = {t: i for t, i in after["tags"].items() if before["tags"].get(t) != i}
    removed = {t: i for t, i in before["tags"].items() if after["tags"].get(t) != i}
    if added or removed:
        out["tags"] = {"added": added, "removed": removed}
    out.update({k: (before[k], after[k]) for k in ("dangling", "build_cache", "containers") if before[k] != after[k]})
    return out


def release_tags(state: dict, release: str) -> dict[str, str]:
    prefix = f"healthdeploy/hd-t{ENV}-{TARGET}/"
    return {t[len(prefix):].split(":")[0]: i for t, i in state["tags"].items() if t.startswith(prefix) and t.endswith(":" + release)}


def test_build_on_the_operator_ships_into_the_host_and_nothing_is_built_there(env):
    before = set(engine_state(TARGET)["tags"])
    proc = fab(env, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    host, build = outcome(proc)
    assert host["result"] == "deployed" and build["where"] == "operator"
    assert build["services"] == ["backend", "ai-service", "frontend-web", "frontend-patient"]
    assert "[operator] built backend, ai-service, frontend-web, frontend-patient" in proc.stderr
    assert get_build() == "backend-v1"
    state = engine_state(TARGET)
    # Nothing was built on the host: no build cache, no intermediate image; the only new tags are the release's,
    # each exactly the image built on the operator's machine.
    assert state["build_cache"].startswith("0 "), state["build_cache"]
    assert state["dangling"] == []
    new = set(state["tags"]) - before
    assert {t.rsplit(":", 1)[0].split("/")[-1] for t in new} == set(build["services"])
    assert release_tags(state, host["release"]) == {s: i["id"] for s, i in build["images"].items()}
    assert not [t for t in state["tags"] if t.startswith("127.0.0.1:")]  # the pull's own references are gone
    print(f"\nfirst deploy: shipped {host['shipped_bytes']:,} bytes")


def test_a_one_file_change_ships_only_the_top_layer(env):
    env.set_build("backend", "backend-v2")
    proc = fab(env, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    host, build = outcome(proc)
    assert build["services"] == ["backend"] and build["layers_pushed"] == 1
    assert get_build() == "backend-v2"
    size = int(docker(NODE[TARGET], "image", "inspect", "--format", "{{.Size}}", build["images"]["backend"]["id"]).stdout)
    # backend/build_id is in the last layer only: that layer (and the manifest and config) cross, nothing else.
    assert 0 < host["shipped_bytes"] < 64 * 1024, host["shipped_bytes"]
    assert size > 500e6
    print(f"\none-file change: shipped {host['shipped_bytes']:,} bytes of a {size / 1e6:.0f} MB image")
    assert engine_state(TARGET)["build_cache"].startswith("0 ")


@pytest.fixture
def on_builder(env):
    env.write(hosts=TARGET, BUILD_ON=BUILDER, BUILD_CACHE=str(env.cache))
    yield env
    env.write(hosts=TARGET, BUILD_ON="operator", BUILD_CACHE=str(env.cache))  # the later tests build here again


def test_build_on_a_build_host_ships_from_there(on_builder):
    env = on_builder
    env.set_build("ai-service", "ai-v2")
    proc = fab(env, "deploy", "--json", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host, build = outcome(proc)
    assert build["where"] == BUILDER and build["services"] == ["ai-service"]
    assert build["from_build_host_bytes"] > 0  # the build host pushed into the registry here, through its tunnel
    with urllib.request.urlopen(f"http://{NODE[TARGET].address}:8001/api/build", timeout=10) as response:
        assert json.loads(response.read())["build"] == "ai-v2"
    builder = engine_state(BUILDER)
    assert builder["tags"].get(f"healthdeploy/build-{ENV}/ai-service:{host['release']}") == build["images"]["ai-service"]["id"]
    assert not [t for t in builder["tags"] if t.startswith("127.0.0.1:")]
    target = engine_state(TARGET)
    assert release_tags(target, host["release"])["ai-service"] == build["images"]["ai-service"]["id"]
    assert target["build_cache"].startswith("0 ") and target["dangling"] == []
    print(f"\nbuilt on {BUILDER}: pushed {build['from_build_host_bytes']:,} bytes here, shipped {host['shipped_bytes']:,}")


def test_a_build_failure_changes_nothing_on_the_host(env):
    before = engine_state(TARGET)
    live = os.readlink(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}/current")
    releases = sorted(os.listdir(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}/releases"))
    dockerfile = env.app / "Dockerfile"
    original = dockerfile.read_text()
    dockerfile.write_text(original.replace("FROM python-app AS backend\n", "FROM python-app AS backend\nRUN exit 3\n"))
    try:
        proc = fab(env, "deploy", "--json")
    finally:
        dockerfile.write_text(original)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "image build on this machine failed; no host was changed" in errors[0]
    assert outcome(proc)[0]["result"] == "skipped"
    assert differences(before, engine_state(TARGET)) == {}
    assert os.readlink(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}/current") == live
    assert sorted(os.listdir(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}/releases")) == releases
    assert get_build() == "backend-v2"


def test_a_ship_failure_leaves_the_host_as_it_was(env):
    """The registry loses the blobs of the new image between the push and the host's pull: the pull fails, the
    host undoes its release and keeps serving the old one with exactly the images it had."""
    before = engine_state(TARGET)
    releases = sorted(os.listdir(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}/releases"))
    env.set_build("backend", "backend-v3")
    started = time.time()
    blobs = env.cache / "registry" / ENV / "storage" / "docker" / "registry" / "v2" / "blobs"
    process = subprocess.Popen(["fab", "deploy", "--env", env.name, "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
                               env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(env.directory)})
    removed: list[str] = []
    lines: list[str] = []

    def watch() -> None:
        for line in process.stderr:
            lines.append(line)
            if "[operator] registry has backend" in line:  # pushed; the hosts have not pulled yet
                for data in blobs.rglob("data"):
                    if data.stat().st_mtime >= started - 1:
                        data.unlink()
                        removed.append(str(data))

    reader = threading.Thread(target=watch)
    reader.start()
    stdout = process.stdout.read()
    process.wait(timeout=900)
    reader.join()
    assert removed, "".join(lines)[-3000:]
    assert process.returncode == 1, "".join(lines)[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and f"{TARGET}: shipping the images built on this machine failed" in errors[0]
    host = json.loads(stdout[stdout.index("{"):])["hosts"][0]
    assert host["result"] == "failed" and any("remove the images shipped" in u[0] for u in host["undo"])
    assert differences(before, engine_state(TARGET)) == {}  # same tags and IDs, no dangling layers, same containers
    assert sorted(os.listdir(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}/releases")) == releases
    assert get_build() == "backend-v2"
    # The next deploy heals the registry (dockerd pushes what it finds missing) and goes through.
    proc = fab(env, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert get_build() == "backend-v3"


def test_the_operator_killed_during_a_ship_leaves_the_host_as_it_was(env):
    """SIGKILL of the deploy 1 MB into the host's pull (HEALTHDEPLOY_FAULT=during:ship=kill): nothing local runs any
    more; the host's lock holder runs the journal (the release and the shipped tags go) and releases the lock."""
    before = engine_state(TARGET)
    root = Path(f"/var/lib/healthdeploy-test/{TARGET}/{ENV}")
    releases = sorted(os.listdir(root / "releases"))
    blob = env.app / "backend" / "blob.bin"
    blob.write_bytes(os.urandom(24 << 20))  # a new 24 MB layer that does not compress: the pull takes a while
    env.set_build("backend", "backend-v4")
    proc = env.run("fab", "deploy", "--env", env.name, "--json", timeout=900,
                   extra_env={"HEALTHDEPLOY_FAULT": "during:ship=kill"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "shipping backend from operator" in proc.stderr
    assert "shipped backend" not in proc.stderr  # killed during the pull (1 MB in), not after it
    deadline = time.monotonic() + 60
    while (root / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (root / ".lock").exists(), "the host's lock holder did not undo and release"
    deadline = time.monotonic() + 30
    while engine_state(TARGET) != before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert differences(before, engine_state(TARGET)) == {}
    assert sorted(os.listdir(root / "releases")) == releases and get_build() == "backend-v3"
    blob.unlink()
    env.set_build("backend", "backend-v5")
    proc = fab(env, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert get_build() == "backend-v5"


# -- a loopback sandbox host: the operator's engine is the host's --------------------------------------------
@pytest.fixture
def loopback(sandbox_hosts, tmp_path_factory):
    setup.ensure_tools(setup.REGISTRY_TOOLS)
    env = new_env(tmp_path_factory, "bol")
    env.write(hosts=MAIN, BUILD_ON="operator", BUILD_CACHE=str(env.directory / "build-cache"))
    _cleanup(env)
    yield env
    _cleanup(env)
    remove_local_build_images("bol")


def test_on_a_loopback_host_the_operators_images_are_only_tagged(loopback):
    proc = loopback.fab("deploy", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    host, build = outcome(proc)
    assert build["where"] == "operator" and host["result"] == "deployed"
    assert host["shipped_bytes"] == 0  # the host's engine has them: tagged, not pulled
    assert "(0 pulled, 4 already here)" in proc.stderr
    with urllib.request.urlopen(f"http://{MAIN_ADDRESS}:5000/api/build", timeout=10) as response:
        assert json.loads(response.read())["build"] == "backend-v1"
