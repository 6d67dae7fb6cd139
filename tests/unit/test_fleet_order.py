"""The order of a shared-topology deploy (one data host, two application hosts) without sshd: the data host's
steps and the first batch's preparation run at once, the migration waits for both, and a data host that fails
leaves the application hosts as they were (their preparation undone). Recording executors over models of the hosts.
"""

from __future__ import annotations

import io
import shutil
import threading

import pytest

from deploy.cli import Runtime
from deploy.cli.deploy import deploy
from deploy.core.console import Console
from deploy.core.errors import HealthdeployError
from deploy.core.settings import PROJECT_ROOT, load_settings
from deploy.execute.recording import RecordingHost
from deploy.stack.render import Target, image_prefix
from fakes import World

APP = PROJECT_ROOT / "deploy" / "sandbox" / "app"
HOSTS = ("d1", "a1", "a2")
OVERRIDES = {"DRAIN_SECONDS": "0", "DRAIN_LIMIT": "0", "HEALTH_TIMEOUT": "5", "HOSTS": ",".join(HOSTS),
             "ROLES": "d1=data,a1=app,a2=app", "BATCH_SIZE": "2", "DATA_ADDRESS": "10.0.0.9"}


class OrderedWorld(World):
    """A host's model that also writes every command into one log shared by all hosts, in the order they came."""

    log: list
    gate: object = None  # called before each answer (a test makes the data host wait for an app host's build)

    def answer(self, command):
        if self.gate is not None:
            self.gate(command)
        self.log.append((self.alias, command.intent or (command.description,)))
        return super().answer(command)


class Shared:
    def __init__(self, tmp_path):
        shutil.copytree(APP, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
        self.app = tmp_path / "app"
        self.log: list = []
        self.extra: dict = {}
        s = self.settings()
        self.worlds = {}
        for alias in HOSTS:
            t = Target.of(s, alias, "10.0.0.1")
            world = OrderedWorld(t.deploy_path, t.project, image_prefix(s, t))
            world.alias, world.log = alias, self.log
            self.worlds[alias] = world
        self.fail: dict = {}

    def settings(self):
        return load_settings("sandbox", overrides={**OVERRIDES, "APP_SOURCE": str(self.app), **self.extra})

    def deploy(self) -> int:
        def connect(s, alias):
            return RecordingHost(self.worlds[alias], alias=alias, fail_when=self.fail.get(alias))

        return deploy(Runtime(self.settings(), Console(out=io.StringIO(), err=io.StringIO()), connect), [])

    def state(self, alias):
        w = self.worlds[alias]
        files = {p: d for p, d in w.files.items() if not p.endswith("/audit.log") and "/.lock" not in p}
        return w.current, files, dict(w.images), [(c.service, c.id, c.image, c.state) for c in w.containers]

    def index(self, alias, kind) -> int:
        return next(i for i, (a, intent) in enumerate(self.log) if a == alias and intent[0] == kind)


def change_backend(app, build: str) -> None:
    (app / "backend" / "build_id").write_text(build + "\n")


def test_the_data_host_and_the_first_batch_prepare_at_once_and_the_migration_waits_for_both(tmp_path):
    fleet = Shared(tmp_path)
    built = threading.Event()

    def data_waits_for_a_build(command):  # before the data host's release goes live, an app host has built
        if command.intent and command.intent[0] == "switch":
            assert built.wait(5), "the data host's steps ran before any application host began its preparation"

    def app_builds(command):
        if command.intent and command.intent[0] == "build":
            built.set()

    fleet.worlds["d1"].gate = data_waits_for_a_build
    fleet.worlds["a1"].gate = fleet.worlds["a2"].gate = app_builds
    assert fleet.deploy() == 0  # the first deploy: the data host starts the data services, the app hosts build
    migrations = [i for i, (a, intent) in enumerate(fleet.log) if intent[:2] == ("run", "backend")]
    assert len(migrations) == 1, "one migration for the shared database"
    assert migrations[0] > fleet.index("d1", "switch"), "migrated before the data host's steps were done"
    for alias in ("a1", "a2"):
        assert migrations[0] > fleet.index(alias, "build"), alias
        assert fleet.index(alias, "switch") > migrations[0], alias
    assert fleet.worlds["d1"].current == fleet.worlds["a1"].current == fleet.worlds["a2"].current != ""


def test_a_data_host_that_fails_beside_the_preparation_leaves_the_application_hosts_as_they_were(tmp_path):
    fleet = Shared(tmp_path)
    assert fleet.deploy() == 0
    before = {a: fleet.state(a) for a in ("a1", "a2")}
    change_backend(fleet.app, "v2")  # the app hosts build ...
    fleet.extra["REDIS_IMAGE"] = "redis:7.2-alpine"  # ... while the data host recreates Redis, then fails
    fleet.fail["d1"] = lambda c: c.intent[:1] == ("switch",)
    fleet.log.clear()
    with pytest.raises(HealthdeployError) as caught:
        fleet.deploy()
    outcomes = {o.host: (o.result, o.message) for o in caught.value.outcomes}
    assert outcomes["d1"][0] == "failed"
    assert outcomes["a1"] == outcomes["a2"] == ("skipped", "undone: d1 failed")  # not failed themselves
    assert fleet.index("d1", "recreate") >= 0
    assert not any(intent[0] in ("run", "switch") for alias, intent in fleet.log if alias != "d1")
    for alias in ("a1", "a2"):
        assert fleet.index(alias, "build") >= 0  # it had prepared (beside the data host) ...
        current, files, images, containers = fleet.state(alias)  # ... and undid it (a built image stays, as cache)
        assert (current, files, containers) == (before[alias][0], before[alias][1], before[alias][3]), alias
        assert images.items() >= before[alias][2].items(), alias


def test_a_host_is_observed_again_under_the_lock_only_if_another_operation_held_it_since(tmp_path):
    fleet = Shared(tmp_path)
    assert fleet.deploy() == 0  # the hosts' first lock: no previous holder to compare, observed again

    def observes():
        return {a: sum(1 for alias, intent in fleet.log if alias == a and intent[0] == "observe") for a in HOSTS}

    assert observes() == {a: 2 for a in HOSTS}
    fleet.log.clear()
    change_backend(fleet.app, "v2")
    assert fleet.deploy() == 0
    assert observes() == {a: 1 for a in HOSTS}  # nobody held a lock since the read-only look: it still holds

    # On a2, another operation takes and releases the lock between our read-only look and our lock, and stops
    # the backend meanwhile: a2 is observed again, and its plan starts the backend it stopped.
    world = fleet.worlds["a2"]
    hold = world.hold

    def intruder_first(command):
        world.hold = hold
        assert hold(command)[0] == "acquired"
        for c in world.containers:
            if c.service == "backend":
                c.state = "exited"
        world.on_lock_release(command)
        return hold(command)

    world.hold = intruder_first
    fleet.log.clear()
    change_backend(fleet.app, "v3")
    assert fleet.deploy() == 0
    assert observes() == {"d1": 1, "a1": 1, "a2": 2}
    assert [c.state for c in world.containers if c.service == "backend"] == ["running"]
