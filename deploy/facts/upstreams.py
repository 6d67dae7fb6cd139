"""Gateway upstream facts: which container addresses each upstream file lists."""

from __future__ import annotations

import re

from deploy.commands.base import Command, script
from deploy.core.services import APP_SERVICES, UPSTREAM_NAMES

READ_UPSTREAMS = 'cat "$1"/*.conf 2>/dev/null || true'

_BLOCK = re.compile(r"upstream (\w+) \{(.*?)\}", re.S)
_SERVER = re.compile(r"^\s*server ([0-9a-fA-F.:]+):\d+(?P<opts>[^;]*);", re.M)


def read_upstreams(directory: str) -> Command:
    return script(READ_UPSTREAMS, directory, description="read upstream files", readonly=True)


def parse_upstreams(text: str) -> dict[str, frozenset[str]]:
    """``{service: addresses}`` of the active (not ``backup``, not ``down``) servers of each upstream file;
    a service whose file is missing is absent."""
    by_name = {UPSTREAM_NAMES[s]: s for s in APP_SERVICES}
    listed: dict[str, frozenset[str]] = {}
    for block in _BLOCK.finditer(text):
        service = by_name.get(block.group(1))
        if service is None:
            continue
        active = {m.group(1) for m in _SERVER.finditer(block.group(2))
                  if " backup" not in m.group("opts") and " down" not in m.group("opts")
                  and m.group(1) != "127.0.0.1"}
        listed[service] = frozenset(active)
    return listed
