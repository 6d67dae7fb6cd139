"""Open TCP connections to a container's port (in-flight requests, keep-alive and WebSocket connections),
read from the container's own /proc/net/tcp: no tool needs to be in the image."""

from __future__ import annotations

from deploy.commands.base import Command, script

READ_TCP = 'for c in "$@"; do printf "=== %s\\n" "$c"; docker exec "$c" cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; done; exit 0'


def tcp_tables(containers: tuple[str, ...]) -> Command:
    return script(READ_TCP, *containers, description="count open connections", readonly=True,
                  intent=("connections", *containers))


def parse_established(text: str, port: int) -> dict[str, int]:
    """``{container: established connections whose local port is ``port``}``."""
    counts: dict[str, int] = {}
    name = None
    want = f"{port:04X}"
    for line in text.splitlines():
        if line.startswith("=== "):
            name = line[4:].strip()
            counts[name] = 0
            continue
        fields = line.split()
        if name is None or len(fields) < 4 or fields[0] == "sl":
            continue
        local, state = fields[1], fields[3]
        if state == "01" and local.rsplit(":", 1)[-1].upper() == want:
            counts[name] += 1
    return counts
