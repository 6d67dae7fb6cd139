"""The testbed for integration tests: real hosts as network namespaces (deploy/sandbox/netns.py).

``testbed_hosts`` (session) brings up the topology group (node1,node2,node3; see GROUPS) and does
NOT tear them down, so later test modules and runs reuse them (a second `up` takes about a second).
``teardown()`` removes them; HEALTHDEPLOY_TESTBED_TEARDOWN=1 calls it at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from deploy.sandbox import images, netns
from deploy.sandbox.hosts import STATE_DIR

# Each module that needs namespaced hosts has nodes of its own, so parallel workers (pytest-xdist, one
# module per worker) never deploy to, cut or restart each other's hosts. HEALTHDEPLOY_TESTBED_<GROUP>
# (e.g. HEALTHDEPLOY_TESTBED_SWARM=node21,node22,node23) names others; the benches use node7-10 and up.
GROUPS = {
    "topology": ("node1", "node2", "node3"),  # test_topology: 1 data + 2 app hosts, cells
    "swarm": ("node4", "node5", "node6"),  # test_swarm: a 3-node Swarm
    "build": ("node11", "node12"),  # test_build_off_host: a target and a build host
    "testbed": ("node13", "node14"),  # test_testbed: the helper itself (cuts its second node)
}


def group_nodes(group: str) -> tuple[str, ...]:
    override = os.environ.get(f"HEALTHDEPLOY_TESTBED_{group.upper()}", "")
    names = tuple(n.strip() for n in override.split(",") if n.strip())
    return names or GROUPS[group]


TESTBED_NODES = group_nodes("topology")
SSH_CONFIG = STATE_DIR / "ssh_config"


def bring_up(names: tuple[str, ...]) -> list[netns.Node]:
    # Image tags are machine-wide: build only when one is missing (never rebuild another checkout's).
    if any(images.image_label(tag) is None for tag in images.all_tags()):
        images.build_all()
    return [r.node for r in netns.up(list(names))]


def nodes_of_group(group: str):
    """A module fixture ``testbed_hosts`` bringing up the nodes of ``group`` (override the session one)."""

    @pytest.fixture(scope="module")
    def testbed_hosts():
        return bring_up(group_nodes(group))

    return testbed_hosts


@pytest.fixture(scope="session")
def testbed_hosts():
    yield bring_up(TESTBED_NODES)
    if os.environ.get("HEALTHDEPLOY_TESTBED_TEARDOWN") == "1":
        teardown()


def teardown() -> list[str]:
    return netns.down()


def ssh(node: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", str(SSH_CONFIG), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", node, command],
                          capture_output=True, text=True, timeout=timeout)


def docker(node: netns.Node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The node's engine through its socket (works while the node is cut off)."""
    return subprocess.run(["docker", "-H", node.docker_host, *args], capture_output=True, text=True, timeout=timeout)


def tcp_open(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def eventually(check, timeout: float = 15, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
