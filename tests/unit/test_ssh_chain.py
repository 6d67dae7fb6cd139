"""The SSH chain built from ssh_config (no network): ProxyJump hops in OpenSSH's order, each with the strict
host key client of the final host; a ProxyCommand kept as the operator's command."""

from __future__ import annotations

from fabric import Connection

from deploy.execute.ssh import _RefuseUnknownHost, _StrictClient, connection_for, hops_of

CONFIG = """Host t
  HostName 10.9.0.3
  Port 2222
  ProxyJump j1,j2
Host t1
  HostName 10.9.0.3
  ProxyJump j1
Host j1
  HostName 10.9.0.1
  Port 2201
Host j2
  HostName 10.9.0.2
Host viacmd
  HostName 10.9.0.4
  ProxyCommand ssh -W %h:%p j1
Host direct
  HostName 10.9.0.5
  ProxyJump none
Host *
  User deploy
"""


def test_proxyjump_hops_in_openssh_order_each_strict(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(CONFIG)
    chain = hops_of(connection_for("t", str(config), str(tmp_path / "known_hosts")))
    assert [(c.host, c.port) for c in chain] == [("10.9.0.1", 2201), ("10.9.0.2", 22), ("10.9.0.3", 2222)]
    assert [c.hd_label for c in chain] == ["j1 (jump host 1 of 2 to t)", "j2 (jump host 2 of 2 to t)", "t"]
    for c in chain:
        assert isinstance(c.client, _StrictClient) and isinstance(c.client._policy, _RefuseUnknownHost)
        assert c.client.trust_alias == "t"
    assert chain[0].gateway is False  # j1 is reached directly


def test_fabric_alone_would_reach_the_last_jump_host_first(tmp_path):
    """Why the chain is built here: Fabric's own ProxyJump handling reverses several hops (and uses AutoAddPolicy)."""
    config = tmp_path / "ssh_config"
    config.write_text(CONFIG)
    from deploy.execute.ssh import fabric_config

    fabric_gateway = Connection("t", config=fabric_config(str(config))).gateway
    assert fabric_gateway.host == "10.9.0.1" and fabric_gateway.gateway.host == "10.9.0.2"  # t via j1 via j2


def test_proxycommand_and_none(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(CONFIG)
    cmd = connection_for("viacmd", str(config), "")
    assert cmd.gateway == "ssh -W 10.9.0.4:22 j1" and isinstance(cmd.client, _StrictClient)
    assert hops_of(cmd) == [cmd]
    assert hops_of(connection_for("direct", str(config), "")) and connection_for("direct", str(config), "").gateway is False
    single = hops_of(connection_for("t1", str(config), ""))
    assert [c.host for c in single] == ["10.9.0.1", "10.9.0.3"]
