"""Testbed builders (deploy/sandbox/netns.py): names, addresses, daemon command lines, configs."""

from __future__ import annotations

import pytest

from deploy.core.errors import UsageError
from deploy.sandbox import hosts, netns


def test_node_names_and_addresses():
    n1, n2 = netns.node_for("node1"), netns.node_for("node2")
    assert (n1.address, n2.address) == ("10.251.0.2", "10.251.0.3")
    assert n1.netns == "hd-node1" and n1.veth == "hdv-node1" and len(netns.node_for("node250").veth) <= 15
    assert n1.docker_host == "unix:///run/hd-netns/node1/docker.sock"
    assert [n.name for n in netns.parse_names("node2, node1,node2")] == ["node2", "node1"]


@pytest.mark.parametrize("name", ["node0", "node251", "node01", "nodex", "sandbox2", "node"])
def test_invalid_node_names(name):
    with pytest.raises(UsageError):
        netns.node_for(name)


def test_dockerd_runs_in_the_namespace_with_its_own_everything():
    node = netns.node_for("node1")
    argv = netns.in_node(node, netns.dockerd_args(node))
    assert argv[:3] == ["nsenter", "--net=/run/netns/hd-node1", "--uts=/run/hd-netns/node1/uts"]
    args = argv[3:]
    assert args[0] == "dockerd"
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags == {
        "--config-file": "/var/lib/healthdeploy-netns/node1/daemon.json",
        "--data-root": "/var/lib/healthdeploy-netns/node1/docker",
        "--exec-root": "/run/hd-netns/node1/exec",
        "-H": "unix:///run/hd-netns/node1/docker.sock",
        "--pidfile": "/run/hd-netns/node1/docker.pid",
        "--insecure-registry": "10.251.0.1:5000",
        "--cgroup-parent": "/hd-netns-node1",
    }
    assert '"deprecated-key-path": "/var/lib/healthdeploy-netns/node1/key.json"' in netns.daemon_json(node)


def test_sshd_points_sessions_at_the_nodes_engine():
    conf = netns.sshd_config(netns.node_for("node2")).splitlines()
    assert "ListenAddress 10.251.0.3:22" in conf
    # One SetEnv line (sshd reads only the first): the node's engine, and SHLVL=1 so the session's bash skips
    # ~/.bashrc (this machine's root runs `pyenv init` there: about 100 processes per command).
    setenv = [line.split()[1:] for line in conf if line.startswith("SetEnv ")]
    assert setenv == [["SHLVL=1", "DOCKER_HOST=unix:///run/hd-netns/node2/docker.sock"]]
    assert "PidFile /run/hd-netns/node2/sshd.pid" in conf
    assert "PermitRootLogin prohibit-password" in conf and "PasswordAuthentication no" in conf


def test_known_hosts_and_ssh_config_entries(tmp_path):
    node, loop = netns.node_for("node1"), hosts.host_for("sandbox")
    key = "ssh-ed25519 AAAAC3Nza host"
    assert hosts.known_hosts_line(node, key) == "10.251.0.2 ssh-ed25519 AAAAC3Nza"
    assert hosts.known_hosts_line(loop, key) == "[127.0.0.2]:2222 ssh-ed25519 AAAAC3Nza"
    text = hosts.ssh_config([loop, node], tmp_path)
    assert "Host node1\n  HostName 10.251.0.2\n  Port 22\n  User root" in text
    assert "Host sandbox\n  HostName 127.0.0.2\n  Port 2222" in text


def test_images_to_load_compares_ids():
    listing = "healthdeploy/base:bookworm sha256:aa\n<none>:<none> sha256:cc\nhealthdeploy/redis:7 sha256:bb\n"
    ids = netns.image_ids(listing)
    assert ids == {"healthdeploy/base:bookworm": "sha256:aa", "healthdeploy/redis:7": "sha256:bb"}
    main = {"healthdeploy/base:bookworm": "sha256:aa", "healthdeploy/redis:7": "sha256:b2"}
    assert netns.images_to_load(list(main), main, ids) == ["healthdeploy/redis:7"]
    assert netns.images_to_load(list(main), main, main) == []
    assert netns.images_to_load(list(main), main, {}) == list(main)


def test_registry_config():
    text = netns.registry_config()
    assert "addr: 10.251.0.1:5000" in text and "rootdirectory: /var/lib/healthdeploy-netns/registry" in text
