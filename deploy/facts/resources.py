"""Free disk (the Docker root and the deploy path) and available memory: what a drill or a restore beside the
live data needs before it starts (plan/restore.py resource_problems compares)."""

from __future__ import annotations

from dataclasses import dataclass

from deploy.commands.base import Command, script
from deploy.facts.host import parse_key_values

RESOURCES = r"""
p="$1"; while [ ! -d "$p" ]; do p=$(dirname "$p"); done
root=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null); root=${root:-/var/lib/docker}
[ -d "$root" ] || root=/
echo "docker_root=$root"
echo "docker_free_mb=$(df -Pm "$root" | awk 'NR==2 {print $4}')"
echo "deploy_free_mb=$(df -Pm "$p" | awk 'NR==2 {print $4}')"
echo "mem_available_mb=$(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo 2>/dev/null)"
"""


@dataclass(frozen=True)
class Resources:
    docker_root: str = ""
    docker_free_mb: int = 0
    deploy_free_mb: int = 0
    mem_available_mb: int = 0

    @classmethod
    def parse(cls, text: str) -> "Resources":
        v = parse_key_values(text)

        def number(key: str) -> int:
            try:
                return int(v.get(key, "") or 0)
            except ValueError:
                return 0
        return cls(v.get("docker_root", ""), number("docker_free_mb"), number("deploy_free_mb"),
                   number("mem_available_mb"))


def resources(deploy_path: str) -> Command:
    return script(RESOURCES, deploy_path, description="read free disk and memory", readonly=True,
                  intent=("resources", deploy_path))
