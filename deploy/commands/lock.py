"""The host lock: one for everything that changes a host (deploy, rollback, restore, backup).

``mkdir`` is atomic: exactly one operation creates the directory. The holder is a process on the host that
lives as long as our SSH channel (it exits when its stdin closes). Its pid file records the pid, the boot id
and the process start time (see ``facts.lock``), so a lock whose holder is gone is provably stale, across
reboots and pid reuse.
"""

from __future__ import annotations

from deploy.facts.lock import LOCK_STATE

from .base import Command, cmd, script
from .files import write_file
from .journal import RUN_JOURNAL_FUNCTION

# The holder lives as long as our channel. When the channel closes, either we released the lock (its
# directory is gone) or we vanished mid-operation (killed, crashed, connection dropped): then the holder runs
# the operation's undo journal itself (commands killed by their watchdogs end first), records what it did in
# the audit log, and releases the lock; if an undo step fails, the lock stays (stale) for an operator to see.
LOCK_ACQUIRE = RUN_JOURNAL_FUNCTION + r"""
mkdir "$1" 2>/dev/null || { echo "held"; cat "$1/info.json" 2>/dev/null; exit 0; }
lock="$1"
s=$(cat "/proc/$$/stat"); s=${s##*) }; set -- "$1" $s
echo "$$ $(cat /proc/sys/kernel/random/boot_id 2>/dev/null) ${21}" > "$lock/holder.pid"
echo acquired
cat > /dev/null
[ -d "$lock" ] || exit 0
if [ -d "$lock/undo" ] && [ -n "$(ls -A "$lock/undo" 2>/dev/null)" ]; then
  sleep 3
  out=$(run_journal "$lock")
  printf '%s\n' "$out" > "$lock/undone-by-host.log"
  audit="$(dirname "$lock")/shared/audit.log"
  if [ -d "$(dirname "$audit")" ]; then
    printf '{"event": "undo-by-host", "ts": "%s", "reason": "the operator vanished mid-operation", "steps": %s}\n' \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(printf '%s\n' "$out" | wc -l)" >> "$audit"
  fi
  case "$out" in *"failed "*) exit 1 ;; esac
fi
rm -rf -- "$lock"
"""

# Removes the lock only if it is still stale at that moment (not a lock someone just took).
LOCK_BREAK = LOCK_STATE + r"""
if [ "$(lock_state "$1")" = stale ]; then rm -rf -- "$1"; echo broken; else lock_state "$1"; fi
"""


def lock_hold(lock_dir: str) -> Command:
    return script(LOCK_ACQUIRE, lock_dir, description="take the host lock", intent=("lock-hold",))


def lock_info_write(lock_dir: str, info: bytes) -> Command:
    return write_file(f"{lock_dir}/info.json", info, "0644")


def lock_break(lock_dir: str) -> Command:
    return script(LOCK_BREAK, lock_dir, description="break a stale host lock", intent=("lock-break",))


def lock_release(lock_dir: str) -> Command:
    return cmd("rm", "-rf", "--", lock_dir, description="release the host lock", intent=("lock-release",))
