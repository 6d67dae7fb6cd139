"""Read-only probe command builders for `health` (every one of them is a fact: readonly=True)."""

from __future__ import annotations

from .base import Command, cmd

# Runs inside the gateway container: HTTP GETs and TCP connects, one line of result per target,
# so a whole host is probed in one round trip. Works with busybox (alpine) and Debian userlands.
# GET with curl, or wget: GNU wget retries 20 times unless told (-t 1); busybox wget has no -t.
HTTP_GET_FUNCTION = r"""
tries=""; wget --version 2>/dev/null | grep -q GNU && tries="-t 1"
http_get() { curl -fsS --max-time "$timeout_s" -o /dev/null "$1" 2>/dev/null || wget -q $tries -T "$timeout_s" -O /dev/null "$1" 2>/dev/null; }
"""

PROBE_SCRIPT = r"""
timeout_s="$1"; shift
""" + HTTP_GET_FUNCTION + r"""
tcp_open() {
  if command -v bash >/dev/null 2>&1; then timeout "$timeout_s" bash -c ":> /dev/tcp/$1/$2" 2>/dev/null && return 0; fi
  if command -v nc >/dev/null 2>&1; then nc -z -w "$timeout_s" "$1" "$2" 2>/dev/null && return 0; fi
  return 1
}
while [ $# -ge 3 ]; do
  kind="$1"; name="$2"; target="$3"; shift 3
  if [ "$kind" = http ]; then
    if http_get "$target"; then echo "ok $name"; else echo "fail $name"; fi
  else
    host="${target%:*}"; port="${target##*:}"
    if tcp_open "$host" "$port"; then echo "ok $name"; else echo "fail $name"; fi
  fi
done
"""


def probes_in(container: str, targets: list[tuple[str, str, str]], timeout: int = 3) -> Command:
    """``targets``: (kind http|tcp, name, url or host:port)."""
    words: list[str] = []
    for kind, name, target in targets:
        words += [kind, name, target]
    return cmd("docker", "exec", container, "sh", "-c", PROBE_SCRIPT, "sh", str(timeout), *words,
               description="probe services from the gateway", readonly=True)


def probes_on_host(targets: list[tuple[str, str, str]], timeout: int = 3) -> Command:
    """The same probes run on the host itself (through the ports it publishes)."""
    words: list[str] = []
    for kind, name, target in targets:
        words += [kind, name, target]
    return cmd("sh", "-c", PROBE_SCRIPT, "sh", str(timeout), *words,
               description="probe published ports", readonly=True)


def listening_sockets() -> Command:
    """TCP listeners of the host (iproute2's `ss`)."""
    return cmd("ss", "-H", "-l", "-t", "-n", description="list listening sockets", readonly=True)
