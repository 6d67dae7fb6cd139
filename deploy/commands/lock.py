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

LOCK_ACQUIRE = r"""
mkdir "$1" 2>/dev/null || { echo "held"; cat "$1/info.json" 2>/dev/null; exit 0; }
s=$(cat "/proc/$$/stat"); s=${s##*) }; set -- "$1" $s
echo "$$ $(cat /proc/sys/kernel/random/boot_id 2>/dev/null) ${21}" > "$1/holder.pid"
echo acquired
exec cat > /dev/null
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
