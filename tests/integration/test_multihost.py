"""Two sandbox hosts in one command: host by host, primary first, migrations once."""

from __future__ import annotations

import json

from deploy.sandbox.hosts import host_for
from sandbox_env import TEST_HOSTS, get_json

H1, H2 = TEST_HOSTS[1], TEST_HOSTS[2]
ADDRESSES = {h: host_for(h).address for h in (H1, H2)}


def test_deploy_to_two_hosts_migrates_once(make_env):
    env = make_env("mh")
    env.write(hosts=f"{H1},{H2}")
    proc = env.fab("deploy", "--json", hosts=f"{H1},{H2}")
    assert proc.returncode == 0, proc.stderr
    hosts = {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}
    assert [h for h in hosts] == [H1, H2]  # primary (first of HOSTS) first
    assert hosts[H1]["migrated"] is True and hosts[H2]["migrated"] is False
    assert all(h["result"] == "deployed" for h in hosts.values())
    assert hosts[H1]["release"] == hosts[H2]["release"]
    for alias, address in ADDRESSES.items():
        assert get_json(f"http://{address}:5000/health")["status"] == "ok"
    assert proc.stderr.count("migrating:") == 1


def test_a_failed_host_stops_the_rest(make_env):
    env = make_env("mhf")
    env.write(hosts=f"{H1},{H2}", MIN_FREE_DISK_MB="999999999")
    proc = env.fab("deploy", "--json", hosts=f"{H1},{H2}")
    assert proc.returncode == 3, proc.stderr  # refused by preflight
    hosts = {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}
    assert hosts[H1]["result"] == "refused" and hosts[H2]["result"] == "skipped"
    assert "MIN_FREE_DISK_MB" in proc.stderr
    assert not env.deploy_root(H1).exists()  # refused by preflight: the host is untouched
