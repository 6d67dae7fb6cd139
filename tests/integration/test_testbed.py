"""The testbed: nodes with their own engine and sshd, traffic across the bridge, cut and heal, images,
the registry, and an idempotent `testbed.up`."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
import uuid

import pytest

from deploy.commands.base import Command
from deploy.core.settings import PROJECT_ROOT
from deploy.execute.ssh import RemoteHost
from deploy.sandbox import images, netns
from testbed_env import SSH_CONFIG, docker, eventually, group_nodes, ssh, tcp_open, nodes_of_group

TESTBED_NODES = group_nodes("testbed")
testbed_hosts = nodes_of_group("testbed")

PORT = 18080
CLIENT_IMAGE = images.BASE_IMAGE  # has curl
SERVER_IMAGE = "healthdeploy/python:3.11"


@pytest.fixture
def nodes(testbed_hosts):
    assert len(testbed_hosts) >= 2, "the testbed tests need two nodes"
    return testbed_hosts[0], testbed_hosts[1]


@pytest.fixture
def web_on_node2(nodes):
    _, node2 = nodes
    name = f"hd-tb-web-{uuid.uuid4().hex[:6]}"
    docker(node2, "rm", "-f", "hd-tb-web")
    run = docker(node2, "run", "-d", "--name", name, "-p", f"{node2.address}:{PORT}:8080", SERVER_IMAGE,
                 "python3", "-m", "http.server", "8080")
    assert run.returncode == 0, run.stderr
    assert eventually(lambda: tcp_open(node2.address, PORT)), "the web container on node2 does not listen"
    yield f"http://{node2.address}:{PORT}/"
    docker(node2, "rm", "-f", name)


def curl_from(node: netns.Node, url: str, max_time: int = 3) -> str:
    proc = ssh(node.name, f"docker run --rm {CLIENT_IMAGE} curl -s -o /dev/null -w '%{{http_code}}' --max-time {max_time} {url}")
    return proc.stdout.strip()


def test_each_node_has_its_own_engine_and_name(nodes):
    ids = {}
    for node in nodes:
        proc = ssh(node.name, "hostname; echo $DOCKER_HOST; docker info --format '{{.ID}} {{.Name}}'")
        assert proc.returncode == 0, proc.stderr
        hostname, docker_host, info = proc.stdout.strip().splitlines()
        assert hostname == node.name and docker_host == node.docker_host
        engine_id, name = info.split()
        assert name == node.name
        ids[node.name] = engine_id
    main = subprocess.run(["docker", "info", "--format", "{{.ID}}"], capture_output=True, text=True).stdout.strip()
    assert len(set(ids.values()) | {main}) == len(nodes) + 1, ids
    # The library's own SSH executor (paramiko, strict host keys) sees the same engine.
    remote = RemoteHost.connect(nodes[1].name, str(SSH_CONFIG), str(SSH_CONFIG.parent / "known_hosts"))
    try:
        result = remote.run(Command((("docker", "info", "--format", "{{.ID}}"),), "engine id", readonly=True))
        assert result.text.strip() == ids[nodes[1].name]
    finally:
        remote.close()


def test_a_container_on_node1_reaches_one_published_on_node2(nodes, web_on_node2):
    node1, _ = nodes
    assert curl_from(node1, web_on_node2) == "200"


def test_cutting_node2_makes_it_unreachable_and_healing_brings_it_back(nodes, web_on_node2):
    node1, node2 = nodes
    netns.cut(node2.name)
    try:
        assert netns.is_cut(node2.name)
        started = time.monotonic()
        assert not tcp_open(node2.address, 22, timeout=2)  # from the root namespace
        assert curl_from(node1, web_on_node2, max_time=3) != "200"  # from a container on node1
        assert time.monotonic() - started < 20
        assert docker(node2, "version").returncode == 0  # it still runs, only its network is gone
    finally:
        netns.heal(node2.name)
    assert not netns.is_cut(node2.name)
    assert eventually(lambda: tcp_open(node2.address, 22), timeout=10)
    assert eventually(lambda: curl_from(node1, web_on_node2) == "200", timeout=15)


def test_the_offline_images_are_in_every_node_engine(testbed_hosts):
    seen = []
    for node in testbed_hosts:
        listing = docker(node, "images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}")
        assert listing.returncode == 0, listing.stderr
        ids = netns.image_ids(listing.stdout)
        assert set(images.all_tags()) <= set(ids), f"{node.name} lacks {set(images.all_tags()) - set(ids)}"
        seen.append({t: ids[t] for t in images.all_tags()})
    assert all(s == seen[0] for s in seen)  # one save, the same image IDs everywhere


def _tiny_image(tag: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = f"probe {tag}\n".encode()
        info = tarfile.TarInfo("probe.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    proc = subprocess.run(["docker", "import", "-", tag], input=buf.getvalue(), capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_registry_push_from_the_main_engine_and_pull_on_a_node(nodes):
    node1, _ = nodes
    registry = netns.ensure_registry()
    assert netns.ensure_registry() == registry  # idempotent
    tag = f"{registry}/hd-testbed/probe:{uuid.uuid4().hex[:8]}"
    _tiny_image(tag)
    try:
        push = subprocess.run(["docker", "push", "-q", tag], capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        pull = ssh(node1.name, f"docker pull -q {tag} && docker image inspect -f '{{{{.Id}}}}' {tag}")
        assert pull.returncode == 0, pull.stderr
        main_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True).stdout.strip()
        assert pull.stdout.strip().splitlines()[-1] == main_id
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
        docker(node1, "rmi", "-f", tag)


def _inv_up() -> subprocess.CompletedProcess:
    return subprocess.run(["inv", "testbed.up", "--hosts", ",".join(TESTBED_NODES)], capture_output=True, text=True,
                          timeout=600, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


def test_a_second_up_is_fast_and_changes_nothing(testbed_hosts):
    # Image tags are machine-wide: another checkout may have rebuilt one since the fixture's up, which the
    # first `up` here delivers; the second one must then find everything as it is.
    first = _inv_up()
    assert first.returncode == 0, first.stderr
    before = {n.name: (netns.dockerd_pid(n), netns.sshd_pid(n)) for n in testbed_hosts}
    started = time.monotonic()
    proc = _inv_up()
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("node")]
    assert len(lines) == len(testbed_hosts) and all(line.endswith("unchanged)") for line in lines), proc.stdout
    assert "loading" not in proc.stderr
    assert {n.name: (netns.dockerd_pid(n), netns.sshd_pid(n)) for n in testbed_hosts} == before
    assert elapsed < 10, f"a warm testbed.up took {elapsed:.1f}s"
