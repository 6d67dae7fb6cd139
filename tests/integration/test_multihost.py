"""Two sandbox hosts in one command: host by host, primary first, migrations once."""

from __future__ import annotations

import json

from sandbox_env import get_json

ADDRESSES = {"sandbox6": "127.0.0.7", "sandbox7": "127.0.0.8"}


def test_deploy_to_two_hosts_migrates_once(make_env):
    env = make_env("mh")
    env.write(hosts="sandbox6,sandbox7")
    proc = env.fab("deploy", "--json", hosts="sandbox6,sandbox7")
    assert proc.returncode == 0, proc.stderr
    hosts = {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}
    assert [h for h in hosts] == ["sandbox6", "sandbox7"]  # primary (first of HOSTS) first
    assert hosts["sandbox6"]["migrated"] is True and hosts["sandbox7"]["migrated"] is False
    assert all(h["result"] == "deployed" for h in hosts.values())
    assert hosts["sandbox6"]["release"] == hosts["sandbox7"]["release"]
    for alias, address in ADDRESSES.items():
        assert get_json(f"http://{address}:5000/health")["status"] == "ok"
    assert proc.stderr.count("migrating:") == 1


def test_a_failed_host_stops_the_rest(make_env):
    env = make_env("mhf")
    env.write(hosts="sandbox6,sandbox7", MIN_FREE_DISK_MB="999999999")
    proc = env.fab("deploy", "--json", hosts="sandbox6,sandbox7")
    assert proc.returncode == 3, proc.stderr  # refused by preflight
    hosts = {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}
    assert hosts["sandbox6"]["result"] == "refused" and hosts["sandbox7"]["result"] == "skipped"
    assert "MIN_FREE_DISK_MB" in proc.stderr
    assert not env.deploy_root("sandbox6").exists()  # refused by preflight: the host is untouched
