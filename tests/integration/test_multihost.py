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


def test_sigterm_reaches_every_host_of_a_batch_and_each_undoes(make_env):
    """A CI cancel (SIGTERM) while two hosts roll in parallel (BATCH_SIZE=2): every thread stops at its next
    wait, each host runs its undo journal, the locks are released, exit 130; the next deploy works."""
    import signal
    import subprocess
    import time

    env = make_env("sig")
    env.write(hosts=f"{H1},{H2}", TOPOLOGY="cells", BATCH_SIZE="2", DRAIN_SECONDS="3")
    assert env.fab("deploy", hosts=f"{H1},{H2}").returncode == 0
    live = {h: (env.deploy_root(h) / "current").resolve().name for h in (H1, H2)}
    env.set_build("backend", "backend-sigterm")
    proc = subprocess.Popen(["fab", "-H", f"{H1},{H2}", "deploy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, "HEALTHDEPLOY_ENV_DIR": str(env.directory)})
    seen = []
    while proc.poll() is None:  # wait until both hosts are in the middle of their backend roll
        line = proc.stderr.readline()
        seen.append(line)
        if sum("backend: new container(s) healthy" in s for s in seen) >= 1:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    for host in (H1, H2):
        assert (env.deploy_root(host) / "current").resolve().name == live[host]
        assert get_json(f"http://{ADDRESSES[host]}:5000/api/build")["build"] == "backend-v1"
        assert not (env.deploy_root(host) / ".lock").exists()
    again = env.fab("deploy", hosts=f"{H1},{H2}")
    assert again.returncode == 0, again.stderr
    for host in (H1, H2):
        assert get_json(f"http://{ADDRESSES[host]}:5000/api/build")["build"] == "backend-sigterm"
