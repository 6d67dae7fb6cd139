"""The lock scripts run by a local `sh` (they are plain POSIX shell): free, held, stale, break."""

import json
import os
import shutil
import signal
import subprocess
import time

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


# -- the lease (commands.presence): a holder whose operator is silent gives up, a heartbeat keeps it ----------
def _holder(lock, lease_s, **popen):
    return subprocess.Popen(["sh", "-c", lk.lock_hold(str(lock), lease_s=lease_s).render()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, **popen)


def _wait_gone(path, seconds):
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def test_a_silent_operator_loses_the_lock_after_the_lease_and_the_host_undoes(tmp_path):
    lock, marker = tmp_path / ".lock", tmp_path / "undone"
    (tmp_path / "shared").mkdir()
    holder = _holder(lock, 1)
    assert holder.stdout.readline().strip() == "acquired"
    (lock / "undo").mkdir()
    (lock / "undo" / "1000.sh").write_text(f"# put the old release back\ntouch {marker}\n")
    started = time.monotonic()
    # stdin stays open (a cut network or a frozen operator never closes it): only the lease can end this.
    assert _wait_gone(lock, 15), "the holder kept a lock whose operator went silent"
    assert marker.exists() and time.monotonic() - started >= 1  # the undo ran, not before the lease
    record = json.loads((tmp_path / "shared" / "audit.log").read_text())
    assert record["event"] == "undo-by-host" and record["steps"] == 1 and "silent for the lease (1s" in record["reason"]
    holder.stdin.close()
    assert holder.wait(5) == 0


def test_a_heartbeat_keeps_the_lock_and_a_clean_release_undoes_nothing(tmp_path):
    lock, marker = tmp_path / ".lock", tmp_path / "undone"
    holder = _holder(lock, 1)
    assert holder.stdout.readline().strip() == "acquired"
    (lock / "undo").mkdir()
    (lock / "undo" / "1000.sh").write_text(f"# put the old release back\ntouch {marker}\n")
    for _ in range(12):  # 3 s of heartbeats, three leases long
        holder.stdin.write(".")
        holder.stdin.flush()
        time.sleep(0.25)
    assert lock.exists() and parse_lock(sh(lock_status(str(lock))).stdout).state == "held"
    subprocess.run(["rm", "-rf", str(lock)], check=True)  # the operator's release, then its channel closes
    holder.stdin.close()
    assert holder.wait(5) == 0 and not marker.exists()


def test_a_lease_run_out_ends_the_ssh_connection_it_belongs_to(tmp_path):
    """The nearest ancestor named sshd (the per-connection process) is ended, so a late operator is fenced."""
    fake_sshd = tmp_path / "sshd"
    (tmp_path / "shared").mkdir()
    shutil.copy("/bin/sh", fake_sshd)  # its comm is "sshd"
    lock = tmp_path / ".lock"
    holder_line = lk.lock_hold(str(lock), lease_s=1).render()
    connection = subprocess.Popen([str(fake_sshd), "-c", f"{holder_line}; sleep 60"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
    try:
        assert connection.stdout.readline().strip() == "acquired"
        assert connection.wait(15) == -signal.SIGTERM  # the lease ran out: the connection was ended
        assert _wait_gone(lock, 10)  # and the holder, detached from it, still released the lock
        assert json.loads((tmp_path / "shared" / "audit.log").read_text())["event"] == "lock-expired"
    finally:
        connection.kill()


def test_the_restore_guard_undoes_when_its_operator_is_silent_for_the_lease(tmp_path):
    from deploy.commands import restore as rs
    journal, marker = tmp_path / "restore", tmp_path / "writers-back"
    journal.mkdir()
    (journal / "armed").write_text("armed\n")
    (journal / "undo.sh").write_text(f"touch {marker}\n")
    guard = subprocess.Popen(["sh", "-c", rs.guard_hold(str(journal), lease_s=1).render()], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert guard.stdout.readline().strip() == "acquired"
    assert guard.wait(15) == 0  # stdin still open: the lease ended it
    assert marker.exists() and "HEALTHDEPLOY-RECOVERED" in (journal / "recovery.log").read_text()
    assert not (journal / "armed").exists()
    guard.stdin.close()


def test_each_acquisition_names_the_one_before_so_an_observation_can_be_proved_current(tmp_path):
    """Under a real sh: a holder leaves its identity in .lock.last; the next one reads it back as its previous
    holder (printed by the details write). Equal to what an observation saw: nobody held the lock in between."""
    from types import SimpleNamespace

    from deploy.facts.lock import LockState, unheld_since

    lock = tmp_path / ".lock"

    def take():
        holder = _holder(lock, 30)
        assert holder.stdout.readline().strip() == "acquired"
        write = lk.lock_info_write(str(lock), b'{"who": "me"}')
        out = subprocess.run(["sh", "-c", write.render()], input=write.stdin, capture_output=True)
        assert out.returncode == 0 and json.loads((lock / "info.json").read_text()) == {"who": "me"}
        return holder, out.stdout.decode().strip()

    def release(holder):
        shutil.rmtree(lock)
        holder.stdin.close()
        assert holder.wait(5) == 0

    first, previous = take()
    assert previous == ""  # never taken before: unknown, proves nothing
    seen = SimpleNamespace(lock=LockState("free", {}), lock_last="")
    release(first)
    seen.lock_last = (tmp_path / ".lock.last").read_text().strip()  # what an observation reads now
    assert len(seen.lock_last.split()) == 3 and not unheld_since(seen, previous)  # pid, boot id, start time
    second, previous = take()
    assert previous == seen.lock_last and unheld_since(seen, previous)
    release(second)
    third, previous = take()  # someone else (the second) held it since `seen`
    assert previous != seen.lock_last and not unheld_since(seen, previous)
    release(third)
    assert not unheld_since(SimpleNamespace(lock=LockState("stale", {}), lock_last=previous), previous)


def test_a_released_holder_never_touches_the_lock_taken_after_it(tmp_path):
    """CI once saw it: our release removes the lock directory, then closes the holder's stdin; a lock taken in
    between by someone else (here a stale one a test planted) was removed by our late holder as if it were its own."""
    lock = tmp_path / ".lock"
    holder = _holder(lock, 30)
    assert holder.stdout.readline().strip() == "acquired"
    shutil.rmtree(lock)  # our release
    lock.mkdir()  # the next lock, taken before our holder noticed
    (lock / "holder.pid").write_text("999999999 other-boot 1\n")
    (lock / "undo").mkdir()
    (lock / "undo" / "1000.sh").write_text(f"touch {tmp_path}/undone\n")
    holder.stdin.close()
    assert holder.wait(10) == 0
    assert (lock / "holder.pid").read_text() == "999999999 other-boot 1\n" and not (tmp_path / "undone").exists()
