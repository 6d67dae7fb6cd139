"""The deploy fault suite shared by test_faults.py (SIGKILL) and test_faults_drop.py (dropped connection): two
modules so that parallel workers take one each.

At each phase boundary of a deploy the local process is killed with SIGKILL, and separately its SSH
connection is dropped (deploy/execute/faults.py). Nothing local can undo after that: the host's lock holder
must notice and run the deploy's undo journal. After each fault: 0 failed requests, the old release serving
completely (never a mix of releases, the gateway pointing at exactly the running containers), no stray
containers, the data as before; then the next deploy succeeds without any manual step.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from deploy.facts.upstreams import parse_upstreams
from load import Load
from sandbox_env import MAIN, MAIN_ADDRESS, _cleanup, get_json, new_env

HOST = MAIN_ADDRESS
APPS = ("backend", "ai-service", "frontend-web", "frontend-patient")
POINTS = [
    ("after:send-files", ("backend",)),
    ("during:build", ("backend",)),
    ("after:migrate", ("backend",)),
    ("roll:backend:healthy", ("backend",)),
    ("roll:backend:drain", ("backend",)),
    ("roll:frontend-web:healthy", ("backend", "frontend-web")),  # one service already rolled: never a mix
    ("before:switch", ("backend",)),
    ("after:switch", ("backend",)),
]


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60).stdout


def app_containers(project: str) -> list[dict]:
    ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").split()
    out = []
    for item in json.loads(docker("inspect", *ids) or "[]"):
        service = item["Config"]["Labels"].get("com.docker.compose.service")
        if service in APPS and item["Config"]["Labels"].get("com.docker.compose.oneoff") != "True":
            env = dict(e.split("=", 1) for e in item["Config"]["Env"] if "=" in e)
            networks = item["NetworkSettings"]["Networks"]
            out.append({"service": service, "state": item["State"]["Status"], "release": env.get("RELEASE_ID"),
                        "image": item["Image"], "ip": next(iter(networks.values()))["IPAddress"] if networks else ""})
    return out


def sql(project: str, query: str) -> str:
    return subprocess.run(["docker", "exec", f"{project}-postgres-1", "psql", "-U", "admin", "-d", "health_mgmt",
                           "-tAc", query], capture_output=True, text=True).stdout.strip()


def lock_state(env) -> str:
    proc = env.fab("lock.status", "--json")
    return json.loads(proc.stdout)["locks"][0]["state"] if proc.returncode == 0 else "?"


def assert_one_release_serves(env, release: str, where: str) -> None:
    project = project_of(env)
    root = env.deploy_root()
    assert (root / "current").resolve().name == release, f"{where}: current moved"
    containers = app_containers(project)
    running = [c for c in containers if c["state"] == "running"]
    assert sorted(c["service"] for c in running) == sorted(APPS), f"{where}: {containers}"  # one of each
    assert len(containers) == len(running), f"{where}: stray containers {containers}"
    # Every service runs exactly the image its tag in `release` names (an unchanged service keeps its container,
    # whose image the release tagged again): nothing of another release.
    for c in running:
        tagged = docker("image", "inspect", "--format", "{{.Id}}", f"healthdeploy/{project}/{c['service']}:{release}").strip()
        assert c["image"] == tagged, f"{where}: {c['service']} does not run the image of {release}"
    text = "\n".join(p.read_text() for p in sorted((root / "shared/gateway/upstreams").glob("*.conf")))
    upstreams = parse_upstreams(text)
    for service in APPS:
        assert upstreams[service] == {c["ip"] for c in running if c["service"] == service}, \
            f"{where}: the gateway does not point at {service}'s running containers"


def project_of(env) -> str:
    return f"hd-t{env.name}-{MAIN}"


def start_env(tmp_path_factory, name: str):
    env = new_env(tmp_path_factory, name)
    env.write(DRAIN_SECONDS="1")
    _cleanup(env)
    proc = env.fab("deploy")
    assert proc.returncode == 0, proc.stderr
    env.n = 0
    return env


def print_table(table: list[tuple]) -> None:
    """The table on stdout (shown with -s or -rA), and appended to $HEALTHDEPLOY_FAULT_TABLE when set."""
    if not table:
        return
    rows = ["| " + " | ".join(str(x) for x in row) + " |" for row in table]
    print("\n\n| point | action | requests | failed | recovery |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if os.environ.get("HEALTHDEPLOY_FAULT_TABLE"):
        with open(os.environ["HEALTHDEPLOY_FAULT_TABLE"], "a") as out:
            out.write("\n".join(rows) + "\n")


def run_case(env, point: str, changed: tuple[str, ...], action: str, table: list[tuple]) -> None:
    """One fault: ``action`` (kill: SIGKILL of the local process; drop: its SSH connection) at ``point``."""
    project = project_of(env)
    env.n += 1
    live = (env.deploy_root() / "current").resolve().name
    marker = sql(project, f"insert into requests (service, build, host, path) values ('test', 'fault', '{point}', "
                 f"'{action}') returning id")
    marker = marker.split()[0]
    assert marker.isdigit()
    for service in changed:
        env.set_build(service, f"{service}-fault-{env.n}")
    with Load(HOST, 5000, rate=50) as load:
        time.sleep(1)
        proc = env.fab("deploy", extra_env={"HEALTHDEPLOY_FAULT": f"{point}={action}"})
        assert proc.returncode != 0, f"{point}: the fault never fired\n{proc.stderr[-2000:]}"
        started = time.monotonic()
        # The host undoes by itself, then its lock holder removes the lock. Watched on the host's disk (the sandbox
        # host is this machine) every 0.25 s; `lock_state` (the tool's own view) decides below. Polling with
        # `fab lock.status` instead cost about the same over the module (332 vs 327 CPU-s, docs/ci-time.md).
        while (env.deploy_root() / ".lock").exists() and time.monotonic() - started < 90:
            time.sleep(0.25)
        undone_after = time.monotonic() - started
        where = f"{action} at {point}"
        assert lock_state(env) == "free", f"{where}: the lock was not released by the host"
        assert_one_release_serves(env, live, where)
        assert sql(project, f"select count(*) from requests where id = {marker}") == "1", f"{where}: data lost"
        recovery = env.fab("deploy", "--json")
        time.sleep(1)
    assert recovery.returncode == 0, f"{where}: the next deploy failed\n{recovery.stderr[-3000:]}"
    new = (env.deploy_root() / "current").resolve().name
    assert new != live
    assert_one_release_serves(env, new, f"after the recovery from {where}")
    assert get_json(f"http://{HOST}:5000/api/build")["build"] == f"backend-fault-{env.n}"
    table.append((point, action, load.result.total, load.result.failed,
                  f"host undid in {undone_after:.0f}s; next deploy ok"))
    assert load.result.failed == 0, f"{where}: {load.result.errors[:5]}"
    audit = (env.deploy_root() / "shared/audit.log").read_text()
    assert '"event": "undo-by-host"' in audit
