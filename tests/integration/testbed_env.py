"""The testbed for integration tests: real hosts as network namespaces (deploy/sandbox/netns.py).

``testbed_hosts`` (session) brings up HEALTHDEPLOY_TESTBED_HOSTS (default node1,node2,node3) and does
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

TESTBED_NODES = tuple(n.strip() for n in os.environ.get("HEALTHDEPLOY_TESTBED_HOSTS", "node1,node2,node3").split(",") if n.strip())
SSH_CONFIG = STATE_DIR / "ssh_config"


@pytest.fixture(scope="session")
def testbed_hosts():
    # Image tags are machine-wide: build only when one is missing (never rebuild another checkout's).
    if any(images.image_label(tag) is None for tag in images.all_tags()):
        images.build_all()
    reports = netns.up(list(TESTBED_NODES))
    yield [r.node for r in reports]
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
