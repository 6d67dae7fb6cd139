"""Builds off the serving host (BUILD_ON, docs/build.md) without sshd or Docker: the settings, the planner's BUILD and
SHIP steps, the command builders, and the whole fleet orchestration against models of the hosts and of a build host
(recording executors): one build per deploy on the build side, a ship per host, nothing built on any host; a build
failure changes no host; a ship failure on host B leaves B as it was (and A, already switched, on the new release).
"""

from __future__ import annotations

import copy
import hashlib
import io
import shutil
import subprocess
import tarfile
import time

import pytest

from deploy.cli import Runtime
from deploy.cli.deploy import deploy
from deploy.cli.render import plan_lines
from deploy.commands import docker as dk
from deploy.core.console import Console
from deploy.core.errors import HealthdeployError, RemoteCommandError, SettingsError
from deploy.core.settings import PROJECT_ROOT, load_settings
from deploy.execute import registry as reg
from deploy.execute.executor import Result
from deploy.execute.fleet import FleetStopped
from deploy.execute.recording import RecordingHost
from deploy.plan.deploy import plan_deploy
from deploy.plan.desired import desired_for
from deploy.plan.steps import StepKind
from deploy.stack import payload as pl
from deploy.stack.render import Target, build_override, image_prefix
from fakes import World

APP = PROJECT_ROOT / "deploy" / "sandbox" / "app"
FAST = {"DRAIN_SECONDS": "0", "DRAIN_LIMIT": "0", "HEALTH_TIMEOUT": "5"}
OK = Result(0, b"", b"")


def settings(app, **overrides):
    return load_settings("sandbox", overrides={**FAST, "HOSTS": "h1", "APP_SOURCE": str(app), **overrides})


@pytest.fixture
def app(tmp_path):
    shutil.copytree(APP, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "app"


# -- settings ---------------------------------------------------------------------------------------------
def test_build_on_defaults_to_the_operator_in_production_and_to_the_host_in_the_sandbox(app):
    assert settings(app).build_side == "host"
    assert settings(app, ENV_KIND="staging", STACK_VARIANT="sandbox").build_side == "operator"
    assert settings(app, BUILD_ON="builder1").build_side == "builder1"


def test_production_refuses_to_build_on_a_serving_host(app):
    with pytest.raises(SettingsError) as caught:
        load_settings("sandbox", overrides={"HOSTS": "web1", "APP_SOURCE": str(app), "ENV_KIND": "production",
                                            "BUILD_ON": "web1"})
    assert any(p.key == "BUILD_ON" and "patients are served" in p.message for p in caught.value.problems)
    with pytest.raises(SettingsError) as caught:
        settings(app, BUILD_ON="not a host;rm")
    assert [p.key for p in caught.value.problems] == ["BUILD_ON"]


# -- the planner ------------------------------------------------------------------------------------------
def plan_for(app, world=None, **overrides):
    s = settings(app, **overrides)
    target = Target.of(s, "h1", "10.0.0.1")
    world = world or World(target.deploy_path, target.project, image_prefix(s, target))
    host = RecordingHost(world)
    from deploy.execute.session import Session

    session = Session(host, s, target, Console(out=io.StringIO(), err=io.StringIO()))
    desired, _ = desired_for(s, target, pl.collect_source(str(app)), "20260101T000000Z-r1", True)
    return plan_deploy(desired, session.observe())


def test_build_on_the_host_is_one_build_step_there_and_no_ship(app):
    plan = plan_for(app)
    build = plan.step(StepKind.BUILD)
    assert build.target == "host" and build.items == ("backend", "ai-service", "frontend-web", "frontend-patient")
    assert not plan.has(StepKind.SHIP) and plan.builds_off_host == ("", ())


def test_build_off_the_host_is_a_build_there_and_a_ship_here_in_the_same_place(app):
    on_host = [s.kind for s in plan_for(app).steps]
    plan = plan_for(app, BUILD_ON="operator")
    kinds = [s.kind for s in plan.steps]
    assert kinds.index(StepKind.SHIP) == kinds.index(StepKind.BUILD) + 1
    assert [k for k in kinds if k is not StepKind.SHIP] == on_host  # everything else is the same plan
    build, ship = plan.step(StepKind.BUILD), plan.step(StepKind.SHIP)
    assert build.target == ship.target == "operator" and build.items == ship.items
    assert plan.builds_off_host == ("operator", build.items)
    lines = plan_lines(plan)
    assert "would rebuild: backend, ai-service, frontend-web, frontend-patient (on operator, then shipped to this host)" in lines
    assert any(line.startswith("would build images on operator: backend") for line in lines)
    assert any(line.startswith("would ship images built on operator: backend") and "only the layers this host lacks" in line
               for line in lines)


# -- command builders --------------------------------------------------------------------------------------
def test_ship_and_push_commands_take_values_as_arguments_and_refuse_anything_but_digests():
    ship = dk.ship_images("127.0.0.1:40001", (("sha256:" + "a" * 64, "healthdeploy/prod/backend", "sha256:" + "b" * 64,
                                               "healthdeploy/healthdeploy-prod/backend:R1"),))
    words = ship.parts[0]
    assert words[:2] == ("sh", "-c") and words[2] == dk.SHIP_IMAGES and words[4:] == (
        "127.0.0.1:40001", "sha256:" + "a" * 64, "healthdeploy/prod/backend", "sha256:" + "b" * 64,
        "healthdeploy/healthdeploy-prod/backend:R1")
    assert ship.intent[0] == "ship" and not ship.readonly and ship.timeout == dk.BUILD_TIMEOUT
    with pytest.raises(ValueError):
        dk.ship_images("127.0.0.1:1", (("latest", "r", "sha256:b", "t:1"),))
    push = dk.push_images("127.0.0.1:5000", (("healthdeploy/build-prod/backend:R1", "healthdeploy/prod/backend"),))
    assert push.parts[0][4:] == ("127.0.0.1:5000", "healthdeploy/build-prod/backend:R1", "healthdeploy/prod/backend")
    out = ("noise\nHEALTHDEPLOY-PUSHED healthdeploy/build-prod/backend:R1 sha256:aa sha256:bb\n"
           "HEALTHDEPLOY-PUSHED broken line\n")
    assert dk.parse_pushed(out) == {"healthdeploy/build-prod/backend:R1": ("sha256:aa", "sha256:bb")}
    assert dk.parse_shipped("x\nHEALTHDEPLOY-SHIPPED a/b:1\n") == ["a/b:1"]


def test_the_build_compose_file_only_renames_the_images():
    build = dk.compose_build("p", "/c/compose.yaml", "/c/release.env", ("backend",), "/c/compose.build.yaml")
    assert build.parts[0] == ("docker", "compose", "--project-name", "p", "--file", "/c/compose.yaml", "--env-file",
                              "/c/release.env", "--file", "/c/compose.build.yaml", "build", "backend")
    import yaml

    assert yaml.safe_load(build_override("healthdeploy/build-prod", "R1", ("backend", "ai-service"))) == {
        "services": {"backend": {"image": "healthdeploy/build-prod/backend:R1"},
                     "ai-service": {"image": "healthdeploy/build-prod/ai-service:R1"}}}


def test_registry_config_is_loopback_only_and_read_only_for_the_hosts(tmp_path):
    import yaml

    rw = yaml.safe_load(reg.config_text(tmp_path, 41000, readonly=False))
    ro = yaml.safe_load(reg.config_text(tmp_path, 41001, readonly=True))
    assert rw["http"]["addr"] == "127.0.0.1:41000" and ro["http"]["addr"] == "127.0.0.1:41001"
    assert "maintenance" not in rw["storage"] and ro["storage"]["maintenance"] == {"readonly": {"enabled": True}}
    assert rw["storage"]["filesystem"]["rootdirectory"] == str(tmp_path) and rw["storage"]["delete"] == {"enabled": False}


# -- the fleet: models of two hosts and a build host -----------------------------------------------------------
class BuilderWorld:
    """A build host: reports Docker and Compose, keeps the context it receives, builds (or fails), pushes."""

    def __init__(self):
        self.context: dict[str, bytes] = {}
        self.images: dict[str, str] = {}
        self.events: list[tuple] = []
        self.fail_build = False
        self.tunnel_bytes = 0

    def answer(self, command):
        self.events.append(command.intent or (command.description,))
        if command.description == "read host facts":
            return Result(0, b"docker=20.10.24\ncompose=2.40.3\nfree_mb=9000\n", b"")
        kind = command.intent[0] if command.intent else ""
        if kind == "build":
            if self.fail_build:
                return Result(1, b"", b"#7 ERROR: process \"/bin/sh -c useradd\" did not complete successfully")
            names = build_tags(self.context["compose.build.yaml"])
            for service in command.intent[1:]:
                content = self.context.get(f"src/{service}/build_id", b"") + self.context.get("src/app.py", b"")
                self.images[names[service]] = "sha256:" + hashlib.sha256(service.encode() + content).hexdigest()
        elif kind == "push":
            words = command.intent[2:]
            lines = [f"HEALTHDEPLOY-PUSHED {src} {self.images[src]} sha256:{hashlib.sha256(self.images[src].encode()).hexdigest()}"
                     for src in words[0::2]]
            return Result(0, ("\n".join(["abc: Pushed", "def: Layer already exists", *lines]) + "\n").encode(), b"")
        elif command.description == "list release images":
            return Result(0, "".join(f"{r} {i}\n" for r, i in self.images.items()).encode(), b"")
        elif kind == "rmi":
            for ref in command.intent[1:]:
                self.images.pop(ref, None)
        return OK

    def receive(self, command, data):
        self.events.append(command.intent)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            self.context = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        return OK

    def hold(self, command):
        raise AssertionError("nothing is locked on the build host")


def build_tags(override: bytes) -> dict[str, str]:
    import yaml

    return {s: v["image"] for s, v in yaml.safe_load(override)["services"].items()}


class FakeRegistry:
    """Stands in for docker-registry: records which instance ran."""

    runs: list[str] = []

    def __init__(self, root, readonly):
        self.readonly, self.port, self.pid = readonly, 41001 if readonly else 41000, 0

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        FakeRegistry.runs.append("ro" if self.readonly else "rw")
        return self

    def stop(self):
        FakeRegistry.runs.append("stop-" + ("ro" if self.readonly else "rw"))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Fleet:
    """Two application hosts (TOPOLOGY=cells) and a build host, deployed to through cli.deploy.deploy."""

    def __init__(self, app, tmp_path, monkeypatch, **overrides):
        monkeypatch.setattr(reg, "ShipRegistry", FakeRegistry)
        monkeypatch.setattr(reg, "locate", lambda: "/usr/bin/docker-registry")
        FakeRegistry.runs = []
        self.app = app
        self.overrides = {"HOSTS": "h1,h2", "TOPOLOGY": "cells", "BUILD_ON": "builder", "BUILD_CACHE": str(tmp_path / "cache"),
                          **overrides}
        s = self.settings()
        self.worlds = {}
        for alias in ("h1", "h2"):
            t = Target.of(s, alias, "10.0.0.1")
            self.worlds[alias] = World(t.deploy_path, t.project, image_prefix(s, t))
        self.builder = BuilderWorld()
        self.fail: dict[str, object] = {}

    def settings(self):
        return settings(self.app, **self.overrides)

    def deploy(self):
        self.hosts: dict[str, RecordingHost] = {}

        def connect(s, alias):
            world = self.builder if alias == "builder" else self.worlds[alias]
            host = RecordingHost(world, alias=alias, fail_when=self.fail.get(alias))
            self.hosts[alias] = host
            return host

        runtime = Runtime(self.settings(), Console(out=io.StringIO(), err=io.StringIO()), connect)
        return deploy(runtime, [])

    def state(self, alias):
        """What a host has, minus its audit log and the lock (which every deploy touches)."""
        w = self.worlds[alias]
        files = {p: d for p, d in w.files.items() if not p.endswith("/audit.log") and "/.lock" not in p}
        return w.current, files, dict(w.images), [(c.service, c.id, c.image, c.state) for c in w.containers]


def mutations(host: RecordingHost, deploy_path: str) -> list[tuple]:
    """What a host was asked to change, apart from taking and releasing its lock and writing its audit log."""
    lock = {("mkdir", deploy_path), ("lock-hold",), ("lock-info",), ("lock-release",)}
    return [c.intent for c in host.commands if not c.readonly and c.intent not in lock and c.intent[:1] != ("append",)
            and not (c.intent[:1] == ("write",) and c.intent[1].endswith("/.lock/info.json"))]


def test_a_deploy_builds_once_on_the_build_host_and_ships_to_each_host(app, tmp_path, monkeypatch):
    fleet = Fleet(app, tmp_path, monkeypatch)
    assert fleet.deploy() == 0
    builds = [e for e in fleet.builder.events if e[0] == "build"]
    assert builds == [("build", "backend", "ai-service", "frontend-web", "frontend-patient")]  # once, for both hosts
    assert [e[0] for e in fleet.builder.events].count("push") == 1
    assert FakeRegistry.runs == ["rw", "stop-rw", "ro", "stop-ro"]  # hosts only ever see the read-only one
    assert fleet.hosts["builder"].tunnels == [("127.0.0.1", 41000, fleet.hosts["builder"].tunnels[0][2])]
    built = {tag.split("/")[-1].split(":")[0]: image for tag, image in fleet.builder.images.items()}
    for alias in ("h1", "h2"):
        host, world = fleet.hosts[alias], fleet.worlds[alias]
        assert "build" not in [i[0] for i in host.intents()]  # nothing is built where patients are served
        assert [t[1] for t in host.tunnels] == [41001]
        assert world.current
        for service, image in built.items():
            assert world.images[f"{world.prefix}/{service}:{world.current}"] == image
            assert {c.image for c in world.running(service)} == {image}
    order = [e[0] for e in fleet.builder.events]
    assert order.index("extract") < order.index("build") < order.index("rmtree") < order.index("push")  # context removed


def test_an_unchanged_image_is_tagged_on_the_host_and_nothing_is_built_or_shipped(app, tmp_path, monkeypatch):
    fleet = Fleet(app, tmp_path, monkeypatch)
    fleet.deploy()
    fleet.overrides["JWT_EXPIRES_IN"] = "1d"  # settings only: no image changes
    fleet.builder.events.clear()
    assert fleet.deploy() == 0
    assert not {"build", "push"} & {e[0] for e in fleet.builder.events}
    for alias in ("h1", "h2"):
        intents = [i[0] for i in fleet.hosts[alias].intents()]
        assert "ship" not in intents and "tag" in intents


def test_a_build_failure_changes_nothing_on_any_host(app, tmp_path, monkeypatch):
    fleet = Fleet(app, tmp_path, monkeypatch)
    fleet.deploy()
    before = {a: fleet.state(a) for a in ("h1", "h2")}
    (app / "backend" / "build_id").write_text("backend-broken\n")
    fleet.builder.fail_build = True
    runs = len(FakeRegistry.runs)
    with pytest.raises(FleetStopped) as caught:
        fleet.deploy()
    assert "image build on builder failed; no host was changed" in caught.value.message
    assert "did not complete successfully" in (caught.value.hint or "")
    assert all(o.result == "skipped" for o in caught.value.outcomes)
    for alias in ("h1", "h2"):
        assert fleet.state(alias) == before[alias]
        assert mutations(fleet.hosts[alias], fleet.worlds[alias].deploy_path) == [], alias
    assert FakeRegistry.runs[runs:] == []  # nothing was pushed, no host pulled


@pytest.mark.parametrize("at", ["ship", "after the ship", "after the tag"])
def test_a_ship_failure_on_host_b_leaves_b_as_it_was(app, tmp_path, monkeypatch, at):
    fleet = Fleet(app, tmp_path, monkeypatch)
    fleet.deploy()
    before_b = fleet.state("h2")
    (app / "backend" / "build_id").write_text("backend-v2\n")
    if at == "ship":
        fleet.fail["h2"] = lambda c: c.intent[:1] == ("ship",)
    elif at == "after the ship":  # the images arrived and were tagged, then the host failed
        fleet.fail["h2"] = lambda c: c.intent[:1] == ("image-ids",) and any(":2026" in w for w in c.intent[1:]) \
            and any(e[0] == "ship" for e in fleet.worlds["h2"].events)
    else:  # the unchanged services' live images got the new release's tags too, then the host failed
        fleet.fail["h2"] = lambda c: c.intent[:1] == ("image-ids",) and any(e[0] == "tag" for e in fleet.worlds["h2"].events)
    with pytest.raises(FleetStopped) as caught:
        fleet.deploy()
    outcomes = {o.host: o.result for o in caught.value.outcomes}
    assert outcomes == {"h1": "deployed", "h2": "failed"}
    assert fleet.state("h2") == before_b  # no new tag, no release dir, same containers
    w1 = fleet.worlds["h1"]
    assert w1.current != before_b[0] and {c.image for c in w1.running("backend")} == {
        fleet.builder.images[f"healthdeploy/build-sandbox/backend:{w1.current}"]}


# -- the operator's machine as an executor -------------------------------------------------------------------
def test_local_host_runs_commands_as_argv_with_lines_errors_and_deadlines(tmp_path):
    from deploy.commands.base import cmd, script
    from deploy.core.errors import RemoteCommandError
    from deploy.core.secret import Secret
    from deploy.execute.local import LocalHost

    host = LocalHost(secrets=(Secret("s3cr3t-value"),))
    lines = []
    result = host.run(script('echo "$1"; echo err >&2; echo s3cr3t-value', "a b; rm -rf /", description="t"),
                      on_line=lines.append)
    assert result.text.splitlines()[0] == "a b; rm -rf /"  # an argument, never shell text
    assert sorted(lines) == ["***", "a b; rm -rf /", "err"]  # secrets are redacted from what is shown
    with pytest.raises(RemoteCommandError) as caught:
        host.run(script("echo nope >&2; exit 3", description="fails"))
    assert caught.value.exit_status == 3 and "fails on this machine failed with exit status 3: nope" in caught.value.message
    marker = tmp_path / "child-alive"
    started = time.monotonic()
    with pytest.raises(HealthdeployError, match="did not finish within 1s"):
        host.run(script('(sleep 3; touch "$1") & sleep 30', str(marker), description="slow", timeout=1))
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists()  # the whole process group was killed at the deadline
    out = host.stream_from_file(cmd("tar", "-x", "-f", "-", "-C", str(tmp_path), description="unpack"),
                                io.BytesIO(pl.tar_of({"x/y.txt": b"hi"}, ("x/y.txt",))))
    assert (tmp_path / "x" / "y.txt").read_bytes() == b"hi" and out.sha256 == out.remote_sha256


def test_undoing_a_ship_removes_its_tags_and_any_reference_a_cut_pull_left(tmp_path):
    """A ship cut between `docker pull` and the removal of the pull's own reference leaves the image untagged under
    127.0.0.1:<port>/<repo>@<digest>: the undo removes it (any port), and nothing of another repository or registry."""
    calls = tmp_path / "calls"
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho \"$*\" >> " + str(calls) + "\n"
                    "[ \"$1\" = images ] && printf '%s\\n' "
                    "'127.0.0.1:43027/healthdeploy/prod/backend@sha256:aa' "
                    "'127.0.0.1:5000/healthdeploy/prod/backend-extra@sha256:bb' "
                    "'registry.example/healthdeploy/prod/backend@sha256:cc' "
                    "'healthdeploy/hd-prod/backend@<none>'\nexit 0\n")
    fake.chmod(0o755)
    undo = dk.unship_images(("healthdeploy/hd-prod/backend:R2",), ("healthdeploy/prod/backend",))
    assert undo.intent[0] == "unship" and not undo.readonly
    proc = subprocess.run(list(undo.parts[0]), env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [
        "image rm healthdeploy/hd-prod/backend:R2",
        "images --digests --format {{.Repository}}@{{.Digest}}",
        "image rm 127.0.0.1:43027/healthdeploy/prod/backend@sha256:aa",
    ]
    assert "forget_pull_refs $repos" in dk.SHIP_IMAGES  # each ship starts by the same clean-up


def test_a_lock_refused_on_one_host_releases_the_others_and_changes_nothing(app, tmp_path, monkeypatch):
    """The hosts' locks are taken at once; h2's refused: h1's is released again, neither host changed."""
    fleet = Fleet(app, tmp_path, monkeypatch)
    fleet.deploy()
    before = {a: fleet.state(a) for a in ("h1", "h2")}
    (app / "backend" / "build_id").write_text("backend-v2\n")
    fleet.fail["h2"] = lambda c: c.intent[:1] == ("lock-hold",)
    with pytest.raises(RemoteCommandError, match="injected"):
        fleet.deploy()
    h1 = [c.intent for c in fleet.hosts["h1"].commands]
    assert ("lock-hold",) in h1 and h1.index(("lock-release",)) > h1.index(("lock-hold",))
    for alias in ("h1", "h2"):
        assert fleet.state(alias) == before[alias]
        assert mutations(fleet.hosts[alias], fleet.worlds[alias].deploy_path) == [], alias
