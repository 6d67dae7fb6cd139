"""Is the operator still there? The host side of a held command (the lock's holder, the restore guard).

A held command waits on its stdin. Our executor sends it one byte every ``HEARTBEAT_S`` while it holds it.
The holder takes the operator as gone when its stdin closes (our process died, the connection was closed),
and also when no byte came for ``LEASE_S``. The second case covers what a channel never reports: the network
cut between us and the host, or our process frozen (Ctrl-Z, a suspended laptop). Without a lease the lock
would stay held until the host's TCP gives up. With Debian's sshd defaults (no ClientAliveInterval,
TCPKeepAlive after 2 hours) that is hours, and `--break-lock` refuses a lock whose holder lives.

A holder whose lease ran out first ends the SSH connection it belongs to. It kills the nearest `sshd`
ancestor, the per-connection process. So an operator that comes back after the lease cannot go on
changing the host without the lock: every one of its channels is gone, and its next command fails as a
lost connection. This fences a late operator. Commands still running in that connection are ended by
their watchdogs when their stdin closes.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Command

# The lease is twice the time in which our side declares a silent host lost (execute.ssh.DEAD_AFTER_S).
# So an operator cut off gives up before the host does, and ten heartbeats in a row must be lost first.
LEASE_S = 30
HEARTBEAT_S = 3.0

# operator_wait LEASE: returns 0 when stdin closed, 1 when the lease ran out (the connection is ended first).
# `timeout` runs `head -c 1`, which reads exactly one byte. It prints " <status>" after it: " 0" alone is
# end of file, "<byte> 0" a heartbeat, " 124" the lease run out. Without `timeout` (not coreutils) there is
# no lease: it waits for stdin to close, as before.
OPERATOR_WAIT_FUNCTION = r"""operator_fence() {
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do
  comm=$(cat "/proc/$p/comm" 2>/dev/null) || return 0
  case "$comm" in sshd|sshd-session) kill -s TERM "$p" 2>/dev/null; return 0 ;; esac
  pp=""
  while read -r key value; do [ "$key" = "PPid:" ] && { pp=$value; break; }; done < "/proc/$p/status"
  p=$pp
done
}
operator_wait() {
if ! command -v timeout >/dev/null 2>&1; then cat >/dev/null 2>&1; return 0; fi
while :; do
  beat=$(timeout "$1" head -c 1 2>/dev/null; echo " $?")
  case "$beat" in
    " 0") return 0 ;;
    *" 124") operator_fence; return 1 ;;
    ?" 0") ;;
    *) return 0 ;;
  esac
done
}
"""


def with_heartbeat(command: Command) -> Command:
    """The executor that holds ``command`` sends it a byte every HEARTBEAT_S (see the module docstring)."""
    return replace(command, heartbeat_s=HEARTBEAT_S)
