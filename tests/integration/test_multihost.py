"""Two loopback sandbox hosts in one command, each keeping its own data (TOPOLOGY=cells): host by host,
every host migrates its own database. (Hosts that share one data host need their own network: see
tests/integration/test_topology.py on the namespaced test bed.)"""

from __future__ import annotations

import json

from deploy.sandbox.hosts import host_for
from sandbox_env import TEST_HOSTS, get_json

H1, H2 = TEST_HOSTS[1], TEST_HOSTS[2]
ADDRESSES = {h: host_for(h).address for h in (H1, H2)}


def test_deploy_to_two_cells_migrates_each(make_env):
    env = make_env("mh")
    env.write(hosts=f"{H1},{H2}", TOPOLOGY="cells")
    proc = env.fab("deploy", "--json", hosts=f"{H1},{H2}")
    assert proc.returncode == 0, proc.stderr
    hosts = {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}
    assert [h for h in hosts] == [H1, H2]  # in HOSTS order
    assert hosts[H1]["migrated"] is True and hosts[H2]["migrated"] is True  # each cell has its own database
    assert all(h["result"] == "deployed" for h in hosts.values())
    assert hosts[H1]["release"] == hosts[H2]["release"]
    for alias, address in ADDRESSES.items():
        assert get_json(f"http://{address}:5000/health")["status"] == "ok"
    assert proc.stderr.count("migrating:") == 2


def test_a_host_refused_by_preflight_stops_every_host_before_any_changes(make_env):
    env = make_env("mhf")
    env.write(hosts=f"{H1},{H2}", TOPOLOGY="cells", MIN_FREE_DISK_MB="999999999")
    proc = env.fab("deploy", "--json", hosts=f"{H1},{H2}")
    assert proc.returncode == 3, proc.stderr  # refused by preflight
    hosts = {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}
    assert hosts[H1]["result"] == "refused" and hosts[H2]["result"] == "skipped"
    assert "MIN_FREE_DISK_MB" in proc.stderr
    for host in (H1, H2):  # refused by preflight, which runs on every host before any is locked or changed
        assert not env.deploy_root(host).exists()
