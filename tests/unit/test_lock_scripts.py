"""The lock scripts run by a local `sh` (they are plain POSIX shell): free, held, stale, break."""

import json
import os
import subprocess

from deploy.commands import lock as lk
from deploy.facts.lock import lock_status, parse_lock


def sh(command):
    return subprocess.run(["sh", "-c", command.render()], capture_output=True, text=True, input="")


def test_free_held_stale_and_break(tmp_path):
    lock = tmp_path / ".lock"
    status = sh(lock_status(str(lock)))
    assert status.returncode == 0 and parse_lock(status.stdout).state == "free"
    lock.mkdir()
    (lock / "holder.pid").write_text(str(os.getpid()))  # alive
    (lock / "info.json").write_text(json.dumps({"who": "alice@laptop", "release": "r1"}))
    state = parse_lock(sh(lock_status(str(lock))).stdout)
    assert state.state == "held" and state.info["who"] == "alice@laptop"
    assert sh(lk.lock_break(str(lock))).stdout.strip() == "held" and lock.exists()  # never breaks a live lock
    (lock / "holder.pid").write_text("999999999")  # gone
    assert parse_lock(sh(lock_status(str(lock))).stdout).state == "stale"
    assert sh(lk.lock_break(str(lock))).stdout.strip() == "broken" and not lock.exists()


def test_a_lock_being_taken_right_now_is_held(tmp_path):
    lock = tmp_path / ".lock"
    lock.mkdir()  # the directory exists, its pid file is not written yet
    assert parse_lock(sh(lock_status(str(lock))).stdout).state == "held"


def test_acquire_prints_held_with_the_owner(tmp_path):
    lock = tmp_path / ".lock"
    lock.mkdir()
    (lock / "info.json").write_text(json.dumps({"who": "bob"}))
    out = sh(lk.lock_hold(str(lock)))
    assert out.stdout.splitlines()[0] == "held" and '"who": "bob"' in out.stdout
