"""Published-port facts: where a container's port is reachable from the host itself."""

from __future__ import annotations

from deploy.commands.base import Command, cmd


def published_port(container: str, port: int) -> Command:
    return cmd("docker", "port", container, f"{port}/tcp", description=f"published address of {port}/tcp",
               readonly=True, intent=("port", container, port))


def parse_published_port(text: str) -> tuple[str, int] | None:
    """``docker port`` output -> the address to reach from the host itself (loopback preferred)."""
    best = None
    for line in text.splitlines():
        address, _, port = line.strip().rpartition(":")
        if not port.isdigit():
            continue
        address = address.strip("[]")
        if address in ("0.0.0.0", "127.0.0.1", ""):
            return "127.0.0.1", int(port)
        if address in ("::", "::1"):
            best = best or ("::1", int(port))
        else:
            best = best or (address, int(port))
    return best
