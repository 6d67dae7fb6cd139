"""TARGET=swarm without a swarm: settings, the stack file, the pure planner, the fact parsers, the commands."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from deploy.commands import swarm as sc
from deploy.core.errors import SettingsError
from deploy.core.secret import Secret
from deploy.core.settings import build_settings, load_settings
from deploy.facts import swarm as sf
from deploy.plan.steps import StepKind
from deploy.plan.swarm import (SwarmObserved, crowded_services, plan_swarm, swarm_desired_for,
                               swarm_preflight_problems)
from deploy.stack import payload as pl
from deploy.stack import swarm as sw

SECRET_VALUES = ("sandbox-db-7f3a9c", "sandbox-redis-51d2", "sandbox-jwt-secret-not-for-production-4e1f",
                 "sandbox-s3-secret-93aa", "sandbox-mqtt-2b6e", "sandbox-deepseek-key-unused",
                 "sandbox-influx-88e1")


@pytest.fixture
def cluster():
    return load_settings("cluster")


@pytest.fixture
def target(cluster):
    return sw.swarm_target(cluster, "node1", "10.251.0.2")


def configs():
    data = {s: sw.ImageConfig(("docker-entrypoint.sh",), ("server",)) for s in ("postgres", "redis", "influxdb",
                                                                              "emqx", "minio")}
    data.update({s: sw.ImageConfig((), ("python3", "/app/app.py")) for s in ("backend", "ai-service")})
    data.update({s: sw.ImageConfig((), ("nginx", "-g", "daemon off;")) for s in ("frontend-web", "frontend-patient")})
    return data


def rendered(cluster, target, images=None) -> dict:
    inputs = sw.StackInputs("r1", images or {s: f"reg/{s}@sha256:{'a' * 64}" for s in
                                             ("backend", "ai-service", "frontend-web", "frontend-patient")},
                            configs(), {}, {})
    text = sw.render_stack(cluster, target, inputs, sw.stack_definitions(cluster, target, {}))
    return text, yaml.safe_load(text)


# -- settings ---------------------------------------------------------------------------------------------
BASE = {"ENV_KIND": "sandbox", "HOSTS": "m1", "TARGET": "swarm", "SWARM_NODES": "m1=data,w1=app+edge",
        "SWARM_SUBNET": "10.252.0.0/24", "REGISTRY": "reg.example/health", "STACK_VARIANT": "sandbox"}


def test_swarm_settings_are_checked_together():
    s = build_settings("c", dict(BASE))
    assert s.swarm and s.stack_name == "healthdeploy-c"
    assert s.swarm_roles() == {"m1": frozenset({"data"}), "w1": frozenset({"app", "edge"})}
    with pytest.raises(SettingsError) as info:
        build_settings("c", dict(BASE, SWARM_NODES="a=data,b=data+app,c=web", SWARM_SUBNET="8.8.8.0/24",
                                 REGISTRY="https://reg/", ROLES="m1=app", REGISTRY_USER="u", SWARM_REPLICAS="0"))
    text = "\n".join(info.value.lines())
    assert "SWARM_NODES: 'c=web' is not node=role[+role]" in text
    assert "SWARM_SUBNET: 8.8.8.0/24 is not a private IPv4 range" in text
    assert "REGISTRY: 'https://reg/' is not host[:port][/path]" in text
    assert "ROLES: has no meaning with TARGET=swarm" in text
    assert "REGISTRY_USER: REGISTRY_USER and REGISTRY_PASSWORD go together" in text
    assert "SWARM_REPLICAS: must be at least 1" in text
    with pytest.raises(SettingsError) as info:
        build_settings("c", dict(BASE, SWARM_NODES="a=data,b=data+app+edge", SWARM_SUBNET="", REGISTRY=""))
    text = "\n".join(info.value.lines())
    assert "2 data nodes" in text and "SWARM_SUBNET: required" in text and "REGISTRY: required" in text


def test_the_compose_target_is_the_default_and_unchanged():
    s = load_settings("sandbox")
    assert s.target == "compose" and not s.swarm


# -- the stack file ---------------------------------------------------------------------------------------
def test_the_stack_file_holds_no_secret_and_pins_images_by_digest(cluster, target):
    text, data = rendered(cluster, target)
    for secret in SECRET_VALUES:
        assert secret not in text
    services = data["services"]
    assert services["backend"]["image"].startswith("reg/backend@sha256:")
    assert services["backend"]["secrets"][0]["target"] == "/run/healthdeploy/secrets.env"
    assert services["backend"]["environment"]["HEALTHDEPLOY_ENV_FILE"] == "/run/healthdeploy/secrets.env"
    assert "DATABASE_URL" not in services["backend"]["environment"]  # a secret half: in the Swarm secret only
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "admin"  # the release half is plain
    assert all(v.get("external") for v in data["secrets"].values())
    assert data["networks"]["default"]["ipam"]["config"][0]["subnet"] == "10.252.0.0/24"
    for secret in sw.secret_halves(cluster, target).values():
        assert any(value in secret.decode() for value in SECRET_VALUES)


def test_stateless_roll_start_first_stateful_are_pinned_and_the_gateway_is_host_mode(cluster, target):
    _, data = rendered(cluster, target)
    services = data["services"]
    for name in ("backend", "ai-service", "frontend-web", "frontend-patient"):
        deploy = services[name]["deploy"]
        assert deploy["endpoint_mode"] == "dnsrr" and deploy["replicas"] == 2
        assert deploy["update_config"]["order"] == "start-first"
        assert deploy["update_config"]["failure_action"] == "rollback" and deploy["update_config"]["monitor"] == "3s"
        assert "node.labels.healthdeploy.app == true" in deploy["placement"]["constraints"]
        assert services[name]["entrypoint"] == ["/bin/sh", "/healthdeploy/entrypoint"]
    for name in ("postgres", "redis", "influxdb", "emqx", "minio"):
        deploy = services[name]["deploy"]
        assert deploy["replicas"] == 1 and deploy["update_config"]["order"] == "stop-first"
        assert deploy["placement"]["constraints"] == ["node.labels.healthdeploy.data == true", "node.hostname == node1"]
        assert "ports" not in services[name]
    gateway = services["gateway"]
    assert gateway["deploy"]["mode"] == "global" and gateway["deploy"]["update_config"]["order"] == "stop-first"
    assert {p["mode"] for p in gateway["ports"]} == {"host"}
    assert gateway["volumes"][0]["source"] == "/var/lib/healthdeploy-swarm/{{.Node.Hostname}}/cluster/shared/gateway"
    assert services["redis"]["command"][0] == "docker-entrypoint.sh"  # the image's entrypoint, then the template's
    assert "exec docker-entrypoint.sh redis-server" in services["redis"]["command"][-1]


def test_definitions_change_exactly_with_what_must_roll(cluster, target):
    base = sw.stack_definitions(cluster, target, {"backend": "a"})
    assert sw.stack_definitions(cluster, target, {"backend": "a"}) == base
    changed = sw.stack_definitions(cluster, target, {"backend": "b"})
    assert {k for k in base if base[k] != changed[k]} == {"backend"}
    rotated = load_settings("cluster", overrides={"DB_PASSWORD": "another-db-password-1234"})
    after = sw.stack_definitions(rotated, target, {"backend": "a"})
    # The password is in the backend's DATABASE_URL and in PostgreSQL's secret half: new secret names.
    assert {k for k in base if base[k] != after[k]} == {"backend", "postgres"}


def test_a_swarm_sandbox_keeps_its_probe_intervals(cluster, target):
    """The Compose sandbox probes less often (idle CPU); a Swarm stack's routing and rolls wait on its probes."""
    _, data = rendered(cluster, target)
    intervals = {name: svc["healthcheck"]["interval"] for name, svc in data["services"].items() if "healthcheck" in svc}
    assert {intervals[s] for s in ("backend", "ai-service", "frontend-web", "frontend-patient")} == {"2s"}
    assert {intervals[s] for s in ("postgres", "redis", "influxdb", "minio")} == {"5s"}
    assert intervals["emqx"] == "10s"


def test_the_stack_file_is_valid_for_docker_stack_config(cluster, target, tmp_path):
    text, _ = rendered(cluster, target)
    (tmp_path / "stack.yaml").write_text(text)
    proc = subprocess.run(["docker", "stack", "config", "--compose-file", str(tmp_path / "stack.yaml")],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("this docker CLI has no `stack config`")
    assert proc.returncode == 0, proc.stderr


def test_the_compose_file_is_unchanged_by_the_swarm_branches():
    from deploy.stack.render import Target, render_compose

    s = load_settings("sandbox")
    text = render_compose(s, Target.of(s, "sandbox", "127.0.0.2"))
    assert "healthdeploy/entrypoint" not in text and "mode: host" not in text and "dnsrr" not in text


# -- the planner ------------------------------------------------------------------------------------------
def _node(name, nid, labels, state="ready", role="worker"):
    return sf.Node(nid, name, role, state, "active", "10.0.0." + nid[-1], labels)


def _service(name, definition, sid, replicas=2, inputs="", image="reg/x@sha256:" + "a" * 64, mode="replicated"):
    labels = {"healthdeploy.definition": definition, "healthdeploy.image-inputs": inputs}
    return sf.Service(sid, f"healthdeploy-cluster_{name}", name, labels, image, (), mode, replicas,
                      sf.UpdateStatus("completed"), True)


def _task(sid, node_id, slot, definition=""):
    return sf.Task(f"t{sid}{slot}{node_id}", sid, slot, node_id, "running", "running", "", "", "", ("10.252.0.9",),
                   "c", definition, "img")


def observed_live(desired, *, data_node_id="n1", crowd=False):
    nodes = (_node("node1", "n1", {"healthdeploy.data": "true"}, role="manager"),
             _node("node2", "n2", {"healthdeploy.app": "true", "healthdeploy.edge": "true"}),
             _node("node3", "n3", {"healthdeploy.app": "true", "healthdeploy.edge": "true"}))
    services, tasks = [], []
    for i, name in enumerate(desired.services):
        sid = f"s{i}"
        replicas = 1 if name in desired.infra else 2
        services.append(_service(name, desired.definitions[name], sid, replicas,
                                 desired.image_inputs.get(name, ""), mode="global" if name == "gateway" else "replicated"))
        if name in desired.infra:
            tasks.append(_task(sid, data_node_id, 1, desired.definitions[name]))
        else:
            tasks += [_task(sid, "n2", 1, desired.definitions[name]),
                      _task(sid, "n2" if crowd else "n3", 2, desired.definitions[name])]
    manager = sf.ManagerFacts(
        host=__import__("deploy.facts.host", fromlist=["HostFacts"]).HostFacts(
            docker="20.10.24", free_mb=9999, current="r0", releases=("r0",), has_bash=True),
        swarm=sf.SwarmInfo("active", "n1", True), live_files=dict(desired.files), nodes=nodes,
        services=tuple(services), tasks=tuple(tasks), secrets=frozenset(desired.secrets.values()),
        configs=frozenset(desired.configs))
    edges = {n: sf.NodeFacts(n, gateway_files=dict(desired.gateway_files)) for n in desired.edge_nodes}
    return SwarmObserved(manager, edges)


def desired_of(settings, target, build="backend-v1"):
    source = pl.collect_source(settings.app_source)
    source["src/backend/build_id"] = (build + "\n").encode()
    return swarm_desired_for(settings, target, source, "r1")


def test_nothing_changed_is_unchanged(cluster, target):
    desired, _ = desired_of(cluster, target)
    plan = plan_swarm(desired, observed_live(desired))
    assert plan.action == "unchanged" and not plan.steps


def test_a_backend_change_builds_migrates_and_updates_only_the_backend(cluster, target):
    live, _ = desired_of(cluster, target, "backend-v1")
    desired, _ = desired_of(cluster, target, "backend-v2")
    plan = plan_swarm(desired, observed_live(live))
    assert plan.action == "deploy" and plan.changes == {"backend": "source changed"}
    assert plan.builds == ("backend",)
    kinds = [s.kind for s in plan.steps]
    assert StepKind.DEPLOY_DATA not in kinds  # the data layer is not touched by an application change
    assert kinds.index(StepKind.BUILD) < kinds.index(StepKind.MIGRATE) < kinds.index(StepKind.DEPLOY_STACK) \
        < kinds.index(StepKind.VERIFY) < kinds.index(StepKind.SWITCH)
    assert any("not touched: postgres" in n for n in plan.notes)


def test_a_rotated_secret_is_a_new_secret_and_updates_its_services(cluster, target):
    live, _ = desired_of(cluster, target)
    rotated = load_settings("cluster", overrides={"REDIS_PASSWORD": "rotated-redis-password-77"})
    desired, payload = desired_of(rotated, target)
    plan = plan_swarm(desired, observed_live(live))
    create = plan.step(StepKind.CREATE_SECRETS)
    assert create is not None and all(name in payload.secrets for name in create.items)
    assert "rotated: " in create.reason and "redis" in create.reason
    assert set(plan.changes) == {"backend", "redis"}
    assert plan.step(StepKind.DEPLOY_DATA) is not None  # redis (stop-first) before the backend rolls


def test_preflight_refuses_a_moved_data_node_and_an_unreachable_edge(cluster, target):
    desired, _ = desired_of(cluster, target)
    observed = observed_live(desired, data_node_id="n2")  # postgres & co. run on node2, the data node is node1
    observed.nodes["node3"] = sf.NodeFacts("node3", reachable=False, error="connection refused")
    problems = swarm_preflight_problems(desired, observed)
    assert any(p.startswith("postgres runs on node2, but SWARM_NODES makes node1 the data node") for p in problems)
    assert any("edge node node3 is not reachable over SSH" in p for p in problems)


def test_crowded_tasks_are_spread_by_a_converge(cluster, target):
    desired, _ = desired_of(cluster, target)
    observed = observed_live(desired, crowd=True)
    assert set(crowded_services(desired, observed.manager)) == {"backend", "ai-service", "frontend-web",
                                                                "frontend-patient"}
    plan = plan_swarm(desired, observed)
    assert plan.action == "converge" and [s.kind for s in plan.steps] == [StepKind.REBALANCE, StepKind.VERIFY]


def test_node_labels_follow_swarm_nodes(cluster, target):
    desired, _ = desired_of(cluster, target)
    observed = observed_live(desired)
    nodes = list(observed.manager.nodes)
    nodes[2] = _node("node3", "n3", {"healthdeploy.data": "true"})  # a stale data label, no app/edge
    manager = observed.manager.__class__(**{**observed.manager.__dict__, "nodes": tuple(nodes)})
    plan = plan_swarm(desired, SwarmObserved(manager, observed.nodes))
    step = plan.step(StepKind.LABEL_NODES)
    assert step.items == ("node3: +app +edge -data",)


# -- facts ------------------------------------------------------------------------------------------------
def test_parsers_read_services_tasks_and_nodes():
    service = [{"ID": "s1", "Spec": {"Name": "st_backend", "Labels": {"healthdeploy.definition": "d1"},
                                     "TaskTemplate": {"ContainerSpec": {"Image": "r/b@sha256:1", "Args": ["python3"]}},
                                     "Mode": {"Replicated": {"Replicas": 2}}},
                "UpdateStatus": {"State": "rollback_completed", "StartedAt": "2026-12-01T10:00:00.123456789Z",
                                 "Message": "update rolled back"}, "PreviousSpec": {}}]
    parsed = sf.parse_services(json.dumps(service), "st")[0]
    assert parsed.service == "backend" and parsed.replicas == 2 and parsed.definition == "d1"
    assert parsed.update.state == "rollback_completed" and parsed.args == ("python3",)
    assert sf.parse_time("2026-12-01T10:00:00.123456789Z").microsecond == 123456
    task = [{"ID": "t1", "ServiceID": "s1", "Slot": 1, "NodeID": "n1", "DesiredState": "running",
             "Status": {"State": "running", "ContainerStatus": {"ContainerID": "c1"}},
             "Spec": {"ContainerSpec": {"Labels": {"healthdeploy.definition": "d1"}, "Image": "i"}},
             "NetworksAttachments": [{"Network": {"Spec": {"Name": "ingress"}}, "Addresses": ["10.0.0.5/24"]},
                                     {"Network": {"Spec": {"Name": "st_default"}}, "Addresses": ["10.252.0.7/24"]}]}]
    t = sf.parse_tasks(json.dumps(task) + "\n" + json.dumps([]), "st_default")[0]
    assert t.running and t.addresses == ("10.252.0.7",) and t.definition == "d1" and t.container_id == "c1"
    node = sf.parse_node("node2", "=== upstreams\n--- backend\n    server 10.252.0.7:5000 max_fails=0;\n"
                                  "    server 10.252.0.8:5000 backup;\n--- ai-service\n    server 127.0.0.1:9 down;\n"
                                  "=== containers\nabc st_gateway.x.y st_gateway tid running\n")
    assert node.upstreams == {"backend": ("10.252.0.7:5000",), "ai-service": ()}
    assert node.backups["backend"] == ("10.252.0.8:5000",)
    assert node.container_of("st_gateway").name == "st_gateway.x.y"


# -- commands ---------------------------------------------------------------------------------------------
def test_secrets_and_registry_passwords_travel_on_stdin_only():
    command = sc.secret_create("st_backend-env.abc", b"DATABASE_URL='postgresql://u:pw@db/x'\n", "st", "backend")
    assert "pw@db" not in command.render() and command.stdin.startswith(b"DATABASE_URL")
    login = sc.registry_login("reg.example:5000/health", "ci", b"registry-pass", "/srv/x/shared/docker")
    assert "registry-pass" not in login.render() and "--password-stdin" in login.render()
    assert login.stdin == b"registry-pass" and "reg.example:5000" in login.render()
    with pytest.raises(TypeError):
        sc.cmd("docker", "login", "-p", Secret("x"))
    deploy = sc.stack_deploy("st", "/r/stack.yaml", "/srv/x/shared/docker")
    assert "--with-registry-auth" in deploy.render() and "--resolve-image never" in deploy.render()


def test_entrypoint_loads_the_secret_file_and_holds_the_stop_signal(tmp_path):
    import os
    import signal
    import time

    script = tmp_path / "entrypoint"
    script.write_bytes(sw.ENTRYPOINT_SCRIPT)
    secrets = tmp_path / "secrets.env"
    secrets.write_text("FOO='from secret'\n")
    out = subprocess.run(["sh", str(script), "sh", "-c", 'echo "$FOO/${HEALTHDEPLOY_ENV_FILE:-unset}"'],
                         env={**os.environ, "HEALTHDEPLOY_ENV_FILE": str(secrets)}, capture_output=True, text=True)
    assert out.stdout.strip() == "from secret/unset"
    marker = tmp_path / "got"
    proc = subprocess.Popen(["sh", str(script), "sh", "-c", f"trap 'echo term > {marker}; exit 0' TERM; "
                             "while :; do sleep 0.1; done"], env={**os.environ, "HEALTHDEPLOY_STOP_DELAY": "1"},
                            stderr=subprocess.PIPE)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert not marker.exists()  # held back
    assert proc.wait(timeout=5) == 0
    assert marker.read_text().strip() == "term" and time.monotonic() - started >= 1.0


def test_the_migration_job_runs_without_the_image_health_check():
    """Swarm kills an unhealthy task: the backend image's probe (a server the job never starts) must not run."""
    from deploy.commands.swarm import job_create

    words = job_create("hd_migrate-1", "hd", "hd_default", "reg/backend@sha256:ab", "hd_backend-secrets", "10001",
                       "python3 /app/app.py migrate", ("RELEASE=r1",), "node.labels.healthdeploy.app==true")
    words = __import__("shlex").split(words.render())
    assert words[:9] == ["docker", "service", "create", "--detach", "--name", "hd_migrate-1", "--mode",
                         "replicated-job", "--restart-condition"]
    assert "--no-healthcheck" in words and words.index("--no-healthcheck") < words.index("reg/backend@sha256:ab")


def test_the_migration_job_waits_until_its_node_resolves_the_data_services(tmp_path):
    """Swarm's DNS on the job's node learns the data node's tasks by gossip (seen: 65 s late under load): the job
    waits for the names (bounded), says so, then runs the migration; a name that never resolves does not stop it."""
    import shlex
    import shutil

    from deploy.commands.swarm import job_create

    words = shlex.split(job_create("hd_migrate-1", "hd", "hd_default", "reg/backend@sha256:ab", "hd_backend-secrets",
                                   "1001", "echo migrated", (), "node.labels.healthdeploy.app==true",
                                   names=("postgres", "redis")).render())
    assert "HEALTHDEPLOY_NAMES=postgres redis" in words
    shell = words[words.index("reg/backend@sha256:ab") + 1:]
    assert shell[0] == "-c" and shell[2] == "echo migrated"
    (tmp_path / "secrets.env").write_text("")
    (tmp_path / "getent").write_text(f'#!/bin/sh\nn=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/n\n'
                                     '[ "$2" != postgres ] || [ "$n" -ge "$LATE" ]\n')
    (tmp_path / "getent").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HEALTHDEPLOY_ENV_FILE": str(tmp_path / "secrets.env"),
           "HEALTHDEPLOY_NAMES": "postgres redis"}
    late = subprocess.run(["sh", *shell], env={**env, "LATE": "2"}, capture_output=True, text=True, timeout=30)
    assert late.returncode == 0 and late.stdout.strip() == "migrated"
    assert __import__("re").search(r"waited [23]s for this node to resolve postgres redis", late.stderr), late.stderr
    (tmp_path / "n").unlink()
    never = subprocess.run(["sh", *shell], env={**env, "LATE": "999", "HEALTHDEPLOY_NAMES_WAIT": "1"},
                           capture_output=True, text=True, timeout=30)
    assert never.stdout.strip() == "migrated" and "postgres does not resolve on this node" in never.stderr
    (tmp_path / "getent").unlink()  # an image without getent: no wait at all
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("sh", "date", "sleep"):
        (bare / tool).symlink_to(shutil.which(tool))
    plain = subprocess.run([str(bare / "sh"), *shell], env={**env, "PATH": str(bare)}, capture_output=True,
                           text=True, timeout=30)
    assert plain.stdout.strip() == "migrated" and plain.stderr == ""


class GatewaySync:
    """gateway.sh's sync, one round at a time (HEALTHDEPLOY_SYNC_ONCE=1), against a fake getent whose answers
    (Swarm DNS: the healthy tasks, in rotating order) the test sets per service; every process it starts is
    counted, so the test sees what a round costs."""

    def __init__(self, tmp_path):
        import os

        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.answers = tmp_path / "dns"
        self.answers.mkdir()
        self.spawned = tmp_path / "spawned"
        for name in ("getent", "timeout"):
            body = ('[ "$1" = ahostsv4 ] || exit 2\nf="' + str(self.answers) + '/$2"\n[ -s "$f" ] || exit 2\n'
                    'for ip in $(cat "$f"); do printf "%s      STREAM %s\\n%s      DGRAM  \\n%s      RAW    \\n" '
                    '"$ip" "$2" "$ip" "$ip"; done') if name == "getent" else 'shift; exec "$@"'
            (self.bin / name).write_text(f"#!/bin/sh\necho {name} >> {self.spawned}\n{body}\n")
            (self.bin / name).chmod(0o755)
        (tmp_path / "gw").mkdir()
        (tmp_path / "gw" / "nginx.conf").write_text("")
        self.script = tmp_path / "gateway.sh"
        self.script.write_bytes(sw.GATEWAY_SCRIPT.replace(b"state=/tmp/healthdeploy-gateway",
                                                          b"state=" + str(tmp_path / "state").encode()))
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "HEALTHDEPLOY_SYNC_ONCE": "1",
                    "HEALTHDEPLOY_GATEWAY_CONF": str(tmp_path / "gw" / "nginx.conf"), "HEALTHDEPLOY_DRAIN_TICKS": "2",
                    "HEALTHDEPLOY_SERVICES": "backend=backend:5000 ai-service=ai_service:8001"}

    def dns(self, service: str, *ips: str) -> None:
        (self.answers / service).write_text(" ".join(ips))

    def round(self) -> list[str]:
        """One round; the log lines it wrote."""
        self.spawned.unlink(missing_ok=True)
        proc = subprocess.run(["sh", str(self.script)], env=self.env, capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stderr.splitlines() if line.startswith("gateway-sync:")]

    def upstream(self, service: str) -> list[str]:
        text = (self.tmp / "gw" / "upstreams" / f"{service}.conf").read_text()
        return [line.strip() for line in text.splitlines() if line.strip().startswith("server ")]

    def processes(self) -> int:
        return len(self.spawned.read_text().split()) if self.spawned.exists() else 0


def test_gateway_sync_follows_the_tasks_keeps_leaving_ones_as_backups_and_forks_only_to_look_up(tmp_path):
    g = GatewaySync(tmp_path)
    g.dns("backend", "10.0.0.5", "10.0.0.4")
    g.dns("ai-service", "10.0.0.9")
    assert len(g.round()) == 2  # both upstream files written
    assert g.upstream("backend") == ["server 10.0.0.5:5000 max_fails=0;", "server 10.0.0.4:5000 max_fails=0;"]
    assert g.upstream("ai-service") == ["server 10.0.0.9:8001 max_fails=0;"]
    # The same tasks in DNS's rotated order: nothing rewritten (no reload); only the lookups ran.
    g.dns("backend", "10.0.0.4", "10.0.0.5")
    assert g.round() == []
    assert g.processes() == 4  # timeout + getent per service, nothing else of ours forks
    # A roll: a new task healthy, then the old one leaves DNS. It stays a backup for DRAIN_TICKS=2 rounds.
    g.dns("backend", "10.0.0.4", "10.0.0.5", "10.0.0.6")
    assert g.round() == ["gateway-sync: backend: tasks [10.0.0.5 10.0.0.4 10.0.0.6] leaving []"]
    g.dns("backend", "10.0.0.6", "10.0.0.4")
    assert g.round() == ["gateway-sync: backend: tasks [10.0.0.4 10.0.0.6] leaving [10.0.0.5]"]
    assert g.upstream("backend") == ["server 10.0.0.4:5000 max_fails=0;", "server 10.0.0.6:5000 max_fails=0;",
                                     "server 10.0.0.5:5000 backup;"]
    assert g.round() == []  # one round left: still a backup
    assert g.round() == ["gateway-sync: backend: tasks [10.0.0.4 10.0.0.6] leaving []"]
    assert "backup" not in " ".join(g.upstream("backend"))
    # A failed or empty lookup keeps the last known tasks; no healthy task at all was never seen here.
    g.dns("backend")
    assert g.round() == [] and len(g.upstream("backend")) == 2
    # A leaving task that comes back is a task again, not a backup too.
    g.dns("backend", "10.0.0.4")
    g.round()
    g.dns("backend", "10.0.0.4", "10.0.0.6")
    assert g.round() == ["gateway-sync: backend: tasks [10.0.0.4 10.0.0.6] leaving []"]
    # A write that failed (here: its temporary file's name taken by a directory) is tried again next round.
    blocker = tmp_path / "gw" / "upstreams" / ".backend.conf.tmp"
    blocker.mkdir()
    g.dns("backend", "10.0.0.4", "10.0.0.7")
    assert "could not write" in g.round()[-1]
    blocker.rmdir()
    assert g.round() == ["gateway-sync: backend: tasks [10.0.0.4 10.0.0.7] leaving [10.0.0.6]"]


def test_preflight_refuses_a_deploy_path_that_holds_a_compose_release(cluster, target):
    import dataclasses

    desired, _ = desired_of(cluster, target)
    observed = observed_live(desired)
    compose = {"compose.yaml": "ab" * 32, "MANIFEST": "cd" * 32, "src/backend/app.py": "ef" * 32}
    observed = dataclasses.replace(observed, manager=dataclasses.replace(observed.manager, live_files=compose))
    problems = swarm_preflight_problems(desired, observed)
    assert "node1: its DEPLOY_PATH holds a TARGET=compose release, not one of this stack: give this environment a " \
           "DEPLOY_PATH of its own" in problems
    observed = dataclasses.replace(observed, manager=dataclasses.replace(observed.manager,
                                                                         live_files={**compose, "stack.yaml": "01" * 32}))
    assert not any("TARGET=compose" in p for p in swarm_preflight_problems(desired, observed))  # a Swarm release


# -- when a service counts as back (after an undo) ---------------------------------------------------------
def _backend_service(state: str, definition: str = "old", replicas: int = 2):
    from deploy.facts import swarm as sf

    return sf.Service(id="s1", name="hd_backend", service="backend", labels={"healthdeploy.definition": definition},
                      image="img", args=(), mode="replicated", replicas=replicas,
                      update=sf.UpdateStatus(state=state, started="2026-12-02T10:00:05Z"), has_previous=True)


def _backend_task(n: int, definition: str, desired: str = "running", state: str = "running"):
    from deploy.facts import swarm as sf

    return sf.Task(id=f"t{n}", service_id="s1", slot=n, node_id=f"n{n}", desired=desired, state=state, error="",
                   message="", timestamp="2026-12-02T10:00:06Z", addresses=(), container_id=f"c{n}",
                   definition=definition, image="img")


def test_a_service_rolling_back_counts_as_back_only_when_no_update_is_under_way():
    from deploy.execute.swarm import _converged
    from deploy.facts import swarm as sf

    started = sf.parse_time("2026-12-02T10:00:00Z")
    two_old = [_backend_task(1, "old"), _backend_task(2, "old")]
    args = (started, (), (), None)
    # Swarm's own rollback, under way: the old definition is in the spec, both tasks run it, still not back
    verdict = _converged("backend", _backend_service("rollback_started"), two_old, "old", *args, rolling_back=True)
    assert verdict == "Swarm is still rolling back"
    # ... done: back (a deploy, not rolling back, reads the same state as the update having failed)
    assert _converged("backend", _backend_service("rollback_completed"), two_old, "old", *args, rolling_back=True) is True
    assert _converged("backend", _backend_service("rollback_completed"), two_old, "old", *args).startswith("failed:")
    # the stack file put back started an update of its own: not back while it runs
    assert _converged("backend", _backend_service("updating"), two_old, "old", *args, rolling_back=True) \
        == "Swarm is still updating"
    # completed, but a start-first task more than the replicas still wanted running: not back
    three = two_old + [_backend_task(3, "old", state="starting")]
    assert _converged("backend", _backend_service("completed"), three, "old", *args, rolling_back=True) != True  # noqa: E712
    assert _converged("backend", _backend_service("completed"), two_old, "old", *args, rolling_back=True) is True
