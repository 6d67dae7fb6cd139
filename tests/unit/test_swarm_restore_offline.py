"""The Swarm restore (backup/restore.py SwarmRestore, cli/swarm.py run_restore) against a model of a swarm
through the recording executor: the same beside-the-live-data restore as Compose on the data node's task
containers, the writers scaled to 0 and back to their replica counts through the manager (never `docker
stop`), the guard armed with the scale-back, and every undo path. MinIO's S3 half is not modelled (it needs a
tunnel): the Swarm integration test covers it."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest

from deploy.backup.restore import RestoreFailed, SwarmRestore
from deploy.cli import Runtime
from deploy.cli.swarm import SwarmPlacement, manager_session
from deploy.core.console import Console
from deploy.core.errors import RemoteCommandError
from deploy.core.settings import load_settings
from deploy.execute.executor import ConnectionLost, Interrupted
from deploy.execute.recording import RecordingHost
from deploy.execute.session import Session
from deploy.plan import restore as rp
from deploy.stack import swarm as sw
from fakes import FakeContainer, RestoreWorld
from test_restore import LIVE_INFLUX, LIVE_ROWS, SET_INFLUX, SET_ROWS, make_set

STAMP = "20260102030405"
REPLICAS = {"backend": 2, "ai-service": 3}


@dataclasses.dataclass
class SwarmWorld(RestoreWorld):
    """A swarm node: the stores of RestoreWorld, the stack's task containers on this engine, and (on the manager)
    the writer services with their replica counts, whose tasks follow a scale at once."""

    stack: str = ""
    replicas: dict = dataclasses.field(default_factory=dict)
    renamed: dict = dataclasses.field(default_factory=dict)  # service -> a new task container name

    def on_task_containers(self, command, stack):
        lines = []
        for n, c in enumerate(self.containers):
            name = self.renamed.get(c.service, f"{stack}_{c.service}.1.task{n}")
            lines.append(f"{c.id} {name} {stack}_{c.service} task{n} {c.state}")
        return self.text("\n".join(lines) + "\n")

    def on_swarm_tasks(self, command, stack, *services):
        found = [s for s in services if s in self.replicas]
        specs = [{"ID": f"svc-{s}", "Spec": {"Name": f"{stack}_{s}", "Mode": {"Replicated": {"Replicas": self.replicas[s]}}}}
                 for s in found]
        tasks = [{"ID": f"t-{s}-{i}", "ServiceID": f"svc-{s}", "Slot": i + 1, "NodeID": "n1", "DesiredState": "running",
                  "Status": {"State": "running", "ContainerStatus": {"ContainerID": f"c-{s}-{i}"}}}
                 for s in found for i in range(self.replicas[s])]
        return self.text(f"=== now\n2026-01-01T00:00:00Z\n=== services\n{json.dumps(specs)}\n"
                         f"=== tasks\n{json.dumps(tasks)}\n=== nodes\n")

    def on_service_scale(self, command, *pairs):
        for name, count in pairs:
            self.replicas[name[len(self.stack) + 1:]] = count

    def on_stop(self, command, *ids):
        raise AssertionError("docker stop on Swarm: the task would be replaced")


class Cluster:
    """The data node and the manager: one host (the test bed's layout) or two."""

    def __init__(self, tmp_path: Path, two_hosts: bool = False):
        overrides = {"HEALTH_TIMEOUT": "2", "BACKUP_SIGNING_KEY": "", "BACKUP_ALLOWED_SIGNERS": ""}
        if two_hosts:
            overrides.update(HOSTS="node2", SWARM_NODES="node1=data,node2=app+edge,node3=app+edge")
        self.s = load_settings("cluster", overrides=overrides)
        self.manager_alias, self.node = self.s.hosts[0], sw.data_node_of(self.s)
        self.two_hosts = two_hosts
        stack = self.s.stack_name
        target = sw.swarm_target(self.s, self.node, "10.251.0.2")
        self.data = SwarmWorld(target.deploy_path, stack, "img", stack=stack)
        self.data.pg = {"health_mgmt": dict(LIVE_ROWS), "postgres": {}}
        self.data.influx = {"health_data": json.loads(json.dumps(LIVE_INFLUX))}
        self.data.set_rows, self.data.set_influx = dict(SET_ROWS), json.loads(json.dumps(SET_INFLUX))
        for cid, service in (("c0001", "postgres"), ("c0002", "influxdb")):
            self.data.containers.append(FakeContainer(cid + "0000000", service, "r1", "img", ""))
        if two_hosts:
            mtarget = sw.swarm_target(self.s, self.manager_alias, "10.251.0.3")
            self.manager = SwarmWorld(mtarget.deploy_path, stack, "img", stack=stack)
        else:
            self.manager = self.data
        self.manager.replicas = dict(REPLICAS)
        self.path, self.manifest = make_set(tmp_path)
        self.plan = rp.RestorePlan(
            set_name=self.path.name, env="cluster", data_host=self.node, stamp=STAMP,
            stores=rp.store_plans(("postgres", "influxdb"), STAMP, "health_mgmt", "health_data", "1", (), {}),
            writers=(rp.WriterStop(self.manager_alias, ("backend", "ai-service"), scaled=True),),
            lock_hosts=tuple(dict.fromkeys([self.node, self.manager_alias])), safety_backup=True,
            safety_services=("postgres", "influxdb"), checks=(), signed_by="SHA256:x", apply_globals=True)
        self.at_safety_backup: dict = {}

    def restore(self, host_faults: str = "data", **fail) -> tuple[SwarmRestore, RecordingHost, RecordingHost]:
        console = Console(out=io.StringIO(), err=io.StringIO())
        runtime = Runtime(self.s, console)
        data_host = RecordingHost(self.data, alias=self.node, address="10.251.0.2",
                                  **(fail if host_faults == "data" else {}))
        if self.two_hosts:
            manager_host = RecordingHost(self.manager, alias=self.manager_alias, address="10.251.0.3",
                                         **(fail if host_faults == "manager" else {}))
        else:
            manager_host = data_host
        manager = manager_session(runtime, manager_host)
        data = manager if not self.two_hosts else Session(
            data_host, self.s, sw.swarm_target(self.s, self.node, data_host.address), console)
        placement = SwarmPlacement(runtime, manager_host, data_host)

        def take_backup():
            # the writers are scaled to 0 before the safety backup, and the guard can scale them back
            self.at_safety_backup = {"replicas": dict(self.manager.replicas), "undo": self.undo_script(self.manager)}
            return self.path.parent / "safety"

        run = SwarmRestore(self.s, self.plan, self.path, self.manifest, data, manager, placement, console,
                           self.path.parent, take_backup=take_backup, verify_set=lambda p: {"result": "ok"})
        return run, data_host, manager_host

    @staticmethod
    def undo_script(world) -> str:
        return next((v for p, v in world.files.items() if p.endswith("/undo.sh")), b"").decode()

    @staticmethod
    def armed(world) -> bool:
        return any(p.endswith("/armed") for p in world.files)

    def leftovers(self) -> list[str]:
        return sorted(n for n in [*self.data.pg, *self.data.influx] if rp.is_staging_name(n))


def scale_line(s, counts: dict) -> str:
    return "docker service scale --detach " + " ".join(f"{s.stack_name}_{k}={v}" for k, v in sorted(counts.items()))


def test_the_writers_are_scaled_to_zero_and_back_and_the_stores_restored_beside_the_live_data(tmp_path):
    c = Cluster(tmp_path)
    run, host, _ = c.restore()
    report = run.run()
    assert report.states == {"postgres": "restored", "influxdb": "restored"}
    assert c.data.pg["health_mgmt"] == SET_ROWS and c.data.influx["health_data"] == SET_INFLUX
    assert c.manager.replicas == REPLICAS and c.leftovers() == [] and not c.armed(c.data)
    assert c.data.journal == []  # committed: nothing left for the lock's holder
    lines = [x.render() for x in host.commands]
    down, back = scale_line(c.s, {"ai-service": 0, "backend": 0}), scale_line(c.s, REPLICAS)
    assert lines.count(down) == 1 and lines.count(back) == 1
    # scaled to 0 before anything else changes, the safety backup taken with them at 0, back at the end
    assert c.at_safety_backup["replicas"] == {"backend": 0, "ai-service": 0}
    assert back in c.at_safety_backup["undo"]  # the guard's shell half scales them back
    staging = f"health_mgmt__hd_new_{STAMP}"
    pg_load = next(i for i, x in enumerate(host.commands) if x.intent == ("pg-load", staging))
    influx_stage = next(i for i, x in enumerate(host.commands) if x.intent[:1] == ("influx-stage",))
    pg_switch = next(i for i, x in enumerate(host.commands) if x.intent[:1] == ("pg-switch",))
    assert lines.index(down) < pg_load < influx_stage < pg_switch < lines.index(back)
    # the stores are loaded beside the live data, in the running task containers of the data node
    assert host.commands[influx_stage].intent == ("influx-stage", "health_data", f"health_data__hd_new_{STAMP}")
    assert f"docker exec -i {c.s.stack_name}_postgres.1.task0 " in lines[pg_load]
    assert f"docker exec -i {c.s.stack_name}_influxdb.1.task1 " in lines[influx_stage]
    # Swarm: no docker stop/start, no gateway refresh (its DNS follows the new tasks)
    assert not [x for x in host.intents() if x[0] in ("stop", "start-ids", "upstream")]


def test_a_rescheduled_task_is_found_under_its_new_name(tmp_path):
    c = Cluster(tmp_path)
    run, host, _ = c.restore()
    stage = run.stage

    def stage_then_reschedule(service):
        stage(service)
        c.data.renamed["postgres"] = f"{c.s.stack_name}_postgres.1.rescheduled"
    run.stage = stage_then_reschedule
    run.run()
    switch = next(x for x in host.commands if x.intent[:1] == ("pg-switch",))
    assert f"docker exec -i {c.s.stack_name}_postgres.1.rescheduled " in switch.render()


def commands_of_a_restore(tmp_path) -> int:
    c = Cluster(tmp_path / "count")
    run, host, _ = c.restore()
    run.run()
    return len(host.commands)


@pytest.mark.parametrize("error", [RemoteCommandError("injected", 1, "boom"), Interrupted()],
                         ids=["command-error", "interrupt"])
def test_a_failure_at_any_command_scales_the_writers_back_and_leaves_every_store_as_it_was(tmp_path, error):
    total = commands_of_a_restore(tmp_path)
    assert total > 30
    scaled_down_at = None
    for n in range(1, total + 1):
        c = Cluster(tmp_path / f"{n}")
        run, host, _ = c.restore(fail_at=n, error=error)
        try:
            run.run()
        except RestoreFailed as failed:
            assert set(failed.states.values()) == {"unchanged"}, (n, host.failed.description, failed.states)
        else:  # a failure the restore tolerates (after the commit)
            assert c.data.pg["health_mgmt"] == SET_ROWS, (n, host.failed)
            continue
        what = (n, host.failed.description)
        assert c.data.pg["health_mgmt"] == LIVE_ROWS, what
        assert c.data.influx["health_data"] == LIVE_INFLUX, what
        assert c.leftovers() == [], what
        assert c.manager.replicas == REPLICAS, what  # scaled back (or never scaled down)
        assert not c.armed(c.data) and c.data.journal == [], what
        lines = [x.render() for x in host.commands]
        if scale_line(c.s, {"ai-service": 0, "backend": 0}) in lines[:n - 1]:
            scaled_down_at = scaled_down_at or n
            # the undo scaled them back, after the failed command
            assert scale_line(c.s, REPLICAS) in lines[n:], what
    assert scaled_down_at is not None


def test_a_lost_connection_leaves_the_guard_armed_with_the_scale_back_last(tmp_path):
    c = Cluster(tmp_path)
    run, _, _ = c.restore(fail_when=lambda x: x.intent[:1] == ("influx-exec",) and "recreate health_data from the "
                          "restored" in x.description, error=ConnectionLost("connection to node1 was lost", "x"))
    with pytest.raises(RestoreFailed) as failed:
        run.run()
    assert set(failed.value.states.values()) == {"failed"}
    assert c.armed(c.data)
    assert [e[2] for e in c.data.journal] == ["the restore guard's undo"]
    script = c.undo_script(c.data)
    # newest first: the stores put back, then the writers scaled back to their counts (one host: one guard)
    order = [script.index(x) for x in ("recreate health_data from health_data__hd_prev",
                                       "switch database health_mgmt back", "drop database(s) health_mgmt__hd_new",
                                       scale_line(c.s, REPLICAS))]
    assert order == sorted(order)
    assert "docker start" not in script


def test_with_a_separate_data_node_the_managers_guard_scales_back(tmp_path):
    c = Cluster(tmp_path, two_hosts=True)
    assert c.node == "node1" and c.manager_alias == "node2"
    run, data_host, manager_host = c.restore(
        fail_when=lambda x: x.intent[:1] == ("pg-switch",), error=ConnectionLost("connection to node1 was lost", "x"))
    with pytest.raises(RestoreFailed):
        run.run()
    # the scale commands went to the manager, the stores' commands to the data node
    assert [x for x in data_host.intents() if x[0] in ("service-scale", "swarm-tasks")] == []
    assert [x for x in manager_host.intents() if x[0] in ("pg-load", "influx-stage", "task-containers")] == []
    manager_undo, data_undo = c.undo_script(c.manager), c.undo_script(c.data)
    assert scale_line(c.s, REPLICAS) in manager_undo and "docker service" not in data_undo
    assert "drop database(s) health_mgmt__hd_new" in data_undo
    assert c.armed(c.manager) and c.armed(c.data)
    # each locked host's holder waits for its guard
    assert [e[2] for e in c.manager.journal] == [e[2] for e in c.data.journal] == ["the restore guard's undo"]


def test_with_a_separate_data_node_a_failed_scale_down_is_undone(tmp_path):
    c = Cluster(tmp_path, two_hosts=True)
    run, _, manager_host = c.restore(host_faults="manager", fail_when=lambda x: x.intent[:1] == ("swarm-tasks",)
                                     and c.manager.replicas["backend"] == 0)
    with pytest.raises(RestoreFailed) as failed:
        run.run()
    assert set(failed.value.states.values()) == {"unchanged"}
    assert c.manager.replicas == REPLICAS and not c.armed(c.manager) and not c.armed(c.data)
    assert [x.render() for x in manager_host.commands].count(scale_line(c.s, REPLICAS)) == 1


# -- through `inv restore` --------------------------------------------------------------------------------
class ConnectedHost(RecordingHost):
    """As runtime.connect returns it: a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def swarm_cli(tmp_path, monkeypatch):
    from deploy.backup import run as bk
    from deploy.cli import backup as cli_backup
    from deploy.cli import swarm as cli_swarm

    c = Cluster(tmp_path / "sets")
    s = dataclasses.replace(c.s, env_name="cluster")
    root = tmp_path / "root"
    (root / "cluster").mkdir(parents=True)
    c.path.rename(root / "cluster" / c.path.name)
    manifest = {**c.manifest, "env": "cluster", "host": c.node}
    (root / "cluster" / c.path.name / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(cli_backup, "BACKUP_ROOT", root)
    monkeypatch.setattr(cli_swarm, "health", lambda runtime, hosts, **kw: c.health_calls.append(kw) or 0)
    c.health_calls = []
    safety = root / "cluster" / "safety"
    shutil.copytree(root / "cluster" / c.path.name, safety)  # what the (patched) safety backup "took"
    monkeypatch.setattr(bk, "backup", lambda *a, **k: safety)
    monkeypatch.setattr(bk, "verify", lambda *a, **k: {"result": "ok"})
    hosts = []

    def connect(settings, alias):
        assert alias == c.node
        hosts.append(ConnectedHost(c.data, alias=alias, address="10.251.0.2"))
        return hosts[-1]
    out = io.StringIO()
    return c, Runtime(s, Console(out=out, err=io.StringIO()), connector=connect), hosts, out


def test_inv_restore_on_swarm_restores_influxdb_beside_the_live_data_under_the_managers_lock(tmp_path, monkeypatch):
    from deploy.cli import backup as cli_backup
    from deploy.cli import swarm as cli_swarm

    c, runtime, hosts, out = swarm_cli(tmp_path, monkeypatch)
    assert cli_backup.run_restore(runtime, c.path.name, None, None, yes=True) == 0
    assert len(hosts) == 1  # the data node is the manager: one connection, one lock, one guard
    assert c.data.influx["health_data"] == SET_INFLUX and c.data.pg["health_mgmt"] == SET_ROWS
    assert c.manager.replicas == REPLICAS and not c.data.lock_held
    # the closing health check gives the gateways time to list the writers' new tasks
    assert c.health_calls == [{"settle": cli_swarm.RESTORE_SETTLE_SECONDS}]
    kinds = [i[0] for i in hosts[0].intents()]
    assert kinds.index("lock-hold") < kinds.index("service-scale") < kinds.index("lock-release")
    audit = [json.loads(line) for p, v in c.data.files.items() if p.endswith("/audit.log")
             for line in v.decode().splitlines()]
    assert any(e.get("event") == "restore" and e.get("result") == "ok" and e.get("target") == "swarm"
               and e.get("stores") == {"postgres": "restored", "influxdb": "restored"} for e in audit)


def test_inv_restore_dry_run_on_swarm_prints_the_plan_and_touches_nothing(tmp_path, monkeypatch):
    from deploy.cli import backup as cli_backup

    c, runtime, hosts, out = swarm_cli(tmp_path, monkeypatch)
    assert cli_backup.run_restore(runtime, c.path.name, None, None, yes=True, dry_run=True) == 0
    assert hosts == []
    text = out.getvalue()
    assert "health_data__hd_new_" in text and "scale writers to 0 through node1: backend, ai-service" in text
    assert "gateway re-pointed" not in text and "locks: node1" in text


def _health_reports(monkeypatch, verdicts):
    """stack_health answering these verdicts in turn (the last one again once they are used up)."""
    from deploy.cli import swarm as cli_swarm

    calls = []

    def stack_health(runtime, hosts, timeout):
        healthy = verdicts[min(len(calls), len(verdicts) - 1)]
        calls.append(healthy)
        check = {"host": "node1", "name": "backend.upstream.node1", "status": "pass" if healthy else "fail",
                 "detail": "lists 10.0.1.5:5000" + ("" if healthy else "; running: 10.0.1.5:5000, 10.0.1.9:5000")}
        return {"env": "cluster", "stack": "hd", "release": "r1", "healthy": healthy, "checks": [check]}
    monkeypatch.setattr(cli_swarm, "stack_health", stack_health)
    monkeypatch.setattr(cli_swarm, "SETTLE_INTERVAL", 0.01)
    out = io.StringIO()
    return calls, Runtime(load_settings("cluster"), Console(out=out, err=io.StringIO())), out


def test_health_with_settle_reads_again_until_the_gateways_follow(monkeypatch):
    from deploy.cli import swarm as cli_swarm

    calls, runtime, out = _health_reports(monkeypatch, [False, False, True])
    assert cli_swarm.health(runtime, [], settle=5) == 0
    assert calls == [False, False, True]
    assert "UNHEALTHY" not in out.getvalue() and "cluster: healthy" in out.getvalue()


def test_health_with_settle_still_fails_when_the_stack_stays_unhealthy(monkeypatch):
    from deploy.cli import swarm as cli_swarm
    from deploy.core.errors import ExitCode

    calls, runtime, out = _health_reports(monkeypatch, [False])
    assert cli_swarm.health(runtime, [], settle=0.05) == ExitCode.UNHEALTHY
    assert len(calls) >= 2 and "cluster: UNHEALTHY" in out.getvalue()
    assert "running: 10.0.1.5:5000, 10.0.1.9:5000" in out.getvalue()  # the last reading is the one reported


def test_health_without_settle_reads_once(monkeypatch):
    from deploy.cli import swarm as cli_swarm
    from deploy.core.errors import ExitCode

    calls, runtime, _ = _health_reports(monkeypatch, [False, True])
    assert cli_swarm.health(runtime, []) == ExitCode.UNHEALTHY and calls == [False]
