"""Host facts for preflight and release bookkeeping: engine versions, free disk, releases, boot id."""

from __future__ import annotations

from dataclasses import dataclass

from deploy.commands.base import Command, script

HOST_FACTS = r"""
base="$1"
p="$base"; while [ ! -d "$p" ]; do p=$(dirname "$p"); done
echo "docker=$(docker version --format '{{.Server.Version}}' 2>/dev/null)"
echo "compose=$(docker compose version --short 2>/dev/null)"
echo "free_mb=$(df -Pm "$p" | awk 'NR==2 {print $4}')"
echo "current=$(basename "$(readlink "$base/current" 2>/dev/null)" 2>/dev/null)"
echo "releases=$(ls -1 "$base/releases" 2>/dev/null | grep -v '^\.' | tr '\n' ' ')"
echo "bash=$(command -v bash)"
echo "user=$(id -un)"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
echo "mem_free_mb=$(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo 2>/dev/null)"
"""


def host_facts(deploy_path: str) -> Command:
    return script(HOST_FACTS, deploy_path, description="read host facts", readonly=True)


def version_tuple(text: str) -> tuple[int, ...]:
    """'20.10.24+dfsg1' -> (20, 10, 24); 'v2.40.3' -> (2, 40, 3)."""
    parts = []
    for piece in text.strip().lstrip("v").split("+")[0].split("-")[0].split("."):
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


def parse_key_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class HostFacts:
    docker: str = ""
    compose: str = ""
    free_mb: int = 0
    current: str = ""
    releases: tuple[str, ...] = ()
    has_bash: bool = False
    user: str = ""
    boot_id: str = ""
    mem_free_mb: int = 0

    @classmethod
    def parse(cls, text: str) -> "HostFacts":
        v = parse_key_values(text)
        return cls(v.get("docker", ""), v.get("compose", ""), _int(v.get("free_mb")), v.get("current", ""),
                   tuple(sorted((v.get("releases") or "").split())), bool(v.get("bash")), v.get("user", ""),
                   v.get("boot_id", ""), _int(v.get("mem_free_mb")))


def current_release(deploy_path: str) -> Command:
    """Just the live release id (what a backup records): no docker/compose start-up like host_facts."""
    return script('basename "$(readlink "$1/current" 2>/dev/null)" 2>/dev/null; exit 0', deploy_path,
                  description="read the live release", readonly=True)
