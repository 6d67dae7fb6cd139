"""The host lock: one for everything that changes a host (deploy, rollback, restore, backup).

``mkdir`` is atomic: exactly one operation creates the directory. The holder is a process on the host that
lives as long as our SSH channel (it exits when its stdin closes). Its pid file records the pid, the boot id
and the process start time (see ``facts.lock``), so a lock whose holder is gone is provably stale, across
reboots and pid reuse.
"""

from __future__ import annotations

from deploy.facts.lock import LOCK_STATE

from .base import Command, and_then, cmd, script
from .files import write_file
from .journal import RUN_JOURNAL_FUNCTION
from .presence import LEASE_S, OPERATOR_WAIT_FUNCTION, with_heartbeat

# Every acquisition leaves its holder's identity (pid, boot id, start time: unique) in "$1.last", the one before in
# "$1/previous": equal to the "$1.last" a read-only observation saw, they prove that no operation held the lock in
# between, so what it observed still holds under the lock (facts.lock.unheld_since).
# The holder lives as long as we are there: our channel open and our heartbeat arriving (commands.presence;
# $2 is the lease). When it ends, either we released the lock (its directory is gone, or already another's)
# or we vanished mid-operation (killed, crashed, connection dropped, cut off or frozen for the lease): then the holder runs
# the operation's undo journal itself (commands killed by their watchdogs end first), records what it did in
# the audit log, and releases the lock; if an undo step fails, the lock stays (stale) for an operator to see.
LOCK_ACQUIRE = RUN_JOURNAL_FUNCTION + OPERATOR_WAIT_FUNCTION + r"""
mkdir "$1" 2>/dev/null || { echo "held"; cat "$1/info.json" 2>/dev/null; exit 0; }
lock="$1"; lease="$2"
s=$(cat "/proc/$$/stat"); s=${s##*) }; set -- "$1" $s
me="$$ $(cat /proc/sys/kernel/random/boot_id 2>/dev/null) ${21}"
echo "$me" > "$lock/holder.pid"
cp "$lock.last" "$lock/previous" 2>/dev/null || : > "$lock/previous"
cp "$lock/holder.pid" "$lock.last"
echo acquired
operator_wait "$lease"; silent=$?
# Only our own lock: released by us, it may be someone else's by the time we look (a new one taken at once).
[ "$(cat "$lock/holder.pid" 2>/dev/null)" = "$me" ] || exit 0
reason="the operator vanished mid-operation"
[ "$silent" = 1 ] && reason="the operator was silent for the lease (${lease}s: cut off or frozen); its connection was ended"
audit="$(dirname "$lock")/shared/audit.log"
[ -d "$(dirname "$audit")" ] || audit=/dev/null
if [ -d "$lock/undo" ] && [ -n "$(ls -A "$lock/undo" 2>/dev/null)" ]; then
  sleep 3
  out=$(run_journal "$lock")
  printf '%s\n' "$out" > "$lock/undone-by-host.log"
  printf '{"event": "undo-by-host", "ts": "%s", "reason": "%s", "steps": %s}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$reason" "$(printf '%s\n' "$out" | wc -l)" >> "$audit"
  case "$out" in *"failed "*) exit 1 ;; esac
elif [ "$silent" = 1 ]; then
  printf '{"event": "lock-expired", "ts": "%s", "reason": "%s"}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$reason" >> "$audit"
fi
rm -rf -- "$lock"
"""

# Removes the lock only if it is still stale at that moment (not a lock someone just took).
LOCK_BREAK = LOCK_STATE + r"""
if [ "$(lock_state "$1")" = stale ]; then rm -rf -- "$1"; echo broken; else lock_state "$1"; fi
"""


def lock_hold(lock_dir: str, lease_s: int = LEASE_S) -> Command:
    return with_heartbeat(script(LOCK_ACQUIRE, lock_dir, str(lease_s), description="take the host lock",
                                 intent=("lock-hold",)))


def lock_info_write(lock_dir: str, info: bytes) -> Command:
    """Writes the holder's details (atomically), then prints the lock's previous holder (LOCK_ACQUIRE): empty
    when unknown. One round trip."""
    previous = script('cat "$1/previous" 2>/dev/null; exit 0', lock_dir, description="read the previous holder")
    return and_then(write_file(f"{lock_dir}/info.json", info, "0644"), previous,
                    description="record the lock holder's details").tagged("lock-info")


def lock_break(lock_dir: str) -> Command:
    return script(LOCK_BREAK, lock_dir, description="break a stale host lock", intent=("lock-break",))


def lock_release(lock_dir: str) -> Command:
    return cmd("rm", "-rf", "--", lock_dir, description="release the host lock", intent=("lock-release",))
