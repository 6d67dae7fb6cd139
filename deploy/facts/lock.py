"""The host lock's state: free, held (its holder process lives) or stale (provably gone).

The holder is a process on the host that lives as long as our SSH channel. Its pid file records the pid,
the host's boot id and the process's start time, so a lock survives neither a reboot (another boot id)
nor pid reuse (same pid, another start time): both read as stale, and ``--break-lock`` may remove it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from deploy.commands.base import Command, script

# /proc/<pid> rather than kill -0: a holder of another user is alive even though we may not signal it.
# A lock directory younger than a minute without its pid file is being taken right now: held.
# The start time is field 22 of /proc/<pid>/stat, counted after the ")" that ends the command name.
LOCK_STATE = r"""
proc_start() { s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; echo "${20}"; }
lock_state() {
  [ -d "$1" ] || { echo free; return; }
  pid=""; boot=""; start=""
  [ -f "$1/holder.pid" ] && read -r pid boot start < "$1/holder.pid"
  if [ -z "$pid" ]; then
    if [ -n "$(find "$1" -maxdepth 0 -mmin -1 2>/dev/null)" ]; then echo held; else echo stale; fi
    return
  fi
  if [ -n "$boot" ] && [ "$boot" != "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)" ]; then echo stale; return; fi
  [ -d "/proc/$pid" ] || { echo stale; return; }
  if [ -n "$start" ] && [ "$start" != "$(proc_start "$pid")" ]; then echo stale; return; fi
  echo held
}
"""

LOCK_STATUS = LOCK_STATE + r"""
lock_state "$1"
cat "$1/info.json" 2>/dev/null
exit 0
"""


def lock_status(lock_dir: str) -> Command:
    return script(LOCK_STATUS, lock_dir, description="read the host lock", readonly=True, intent=("lock-status",))


@dataclass(frozen=True)
class LockState:
    state: str  # free, held, stale
    info: dict

    def describe(self) -> str:
        if self.state == "free":
            return "free"
        i = self.info
        what = i.get("operation", "deploy")
        who = (f"{i.get('who', '?')} since {i.get('since', '?')} for release {i.get('release', '?') or '-'}"
               + (f" ({what})" if what != "deploy" else "") + f" (pid {i.get('pid', '?')} on {i.get('machine', '?')})")
        return f"{self.state}: {who}"


def unheld_since(observed, previous_holder: str) -> bool:
    """True when no operation held the host lock between an observation (``Observed``: the lock free, its last
    holder ``lock_last``) and our acquisition, whose previous holder was ``previous_holder``: every change to a
    host is made under its lock, so the observation still holds. Unknown (empty) proves nothing."""
    return observed.lock.state == "free" and bool(previous_holder) and previous_holder == observed.lock_last


def parse_lock(text: str) -> LockState:
    first, _, rest = text.strip().partition("\n")
    try:
        info = json.loads(rest) if rest.strip() else {}
    except json.JSONDecodeError:
        info = {}
    return LockState(first.strip() or "free", info if isinstance(info, dict) else {})
