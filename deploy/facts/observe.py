"""Everything a deploy, rollback or restore plan needs to know about one host, read in ONE round trip.

``observe(...)`` is one read-only script that prints sections (``=== name``); ``parse_observation``
turns them into an ``Observed``. It runs under the host lock, so what the plan sees is what it changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from deploy.commands.base import Command, script
from deploy.facts.containers import PROJECT_CONTAINERS, Container, parse_containers, stack_only
from deploy.facts.files import FILE_HASHES, parse_hashes
from deploy.facts.host import HOST_FACTS, HostFacts
from deploy.facts.images import PROJECT_IMAGES, parse_image_ids
from deploy.facts.lock import LOCK_STATE, LockState, parse_lock
from deploy.facts.upstreams import READ_UPSTREAMS, parse_upstreams

SECTION = "=== "

# $1 deploy path, $2 compose project, $3 image prefix. Each section is one fact's own script, run as a
# function so `exit` inside it ends only that section.
OBSERVE = ("host_facts() {\n" + HOST_FACTS + "\n}\n"
           "file_hashes() {\n" + FILE_HASHES + "\n}\n"
           "project_containers() {\n" + PROJECT_CONTAINERS + "\n}\n"
           "project_images() {\n" + PROJECT_IMAGES + "\n}\n"
           "read_upstreams() {\n" + READ_UPSTREAMS + "\n}\n" + LOCK_STATE + r"""
base="$1"; project="$2"; prefix="$3"
echo "=== host"; host_facts "$base"
echo "=== lock"; lock_state "$base/.lock"; cat "$base/.lock/info.json" 2>/dev/null; echo
echo "=== lock-last"; cat "$base/.lock.last" 2>/dev/null
current=$(readlink "$base/current" 2>/dev/null)
echo "=== live-files"; [ -n "$current" ] && ( file_hashes "$base/$current" )
echo "=== release-env"; [ -n "$current" ] && cat "$base/$current/release.env" 2>/dev/null
echo "=== secrets-env"; ( cd "$base/shared/env" 2>/dev/null && for f in *.env; do [ -f "$f" ] && sha256sum "$f" | sed 's|  |  env/|'; done )
echo "=== secrets-tls"; ( cd "$base/shared/gateway/tls" 2>/dev/null && for f in *.pem; do [ -f "$f" ] && sha256sum "$f" | sed 's|  |  tls/|'; done )
echo "=== secret-versions"; ls -1 "$base/shared/env/.versions" 2>/dev/null
echo "=== secret-version-files"; ( cd "$base/shared/env/.versions" 2>/dev/null && find . -mindepth 3 -maxdepth 3 -type f -name '*.env' -print0 | xargs -0 -r sha256sum | sed "s| \./| |" )
echo "=== releases-meta"; for r in "$base"/releases/*/; do [ -d "$r" ] || continue; n=$(basename "$r")
  echo "--- $n"; cat "$r/release.env" 2>/dev/null; ( cd "$r" && for f in env/*.env gateway/nginx.conf; do [ -f "$f" ] && sha256sum "$f" | sed 's/^/# /'; done ); done
echo "=== gateway-conf"; ( file_hashes "$base/shared/gateway" nginx.conf )
echo "=== upstreams"; ( read_upstreams "$base/shared/gateway/upstreams" )
echo "=== state"; cat "$base/shared/state.json" 2>/dev/null; echo
echo "=== images"; ( project_images "$prefix" )
echo "=== containers"; ( project_containers "$project" )
exit 0
""")


def observe(deploy_path: str, project: str, image_prefix: str) -> Command:
    return script(OBSERVE, deploy_path, project, image_prefix, description="observe the host", readonly=True,
                  intent=("observe",))


@dataclass(frozen=True)
class Observed:
    """What runs on a host and what is installed there, as one value (the planner's input)."""

    host: HostFacts = field(default_factory=HostFacts)
    lock: LockState = field(default_factory=lambda: LockState("free", {}))
    lock_last: str = ""  # the identity of the lock's last holder (commands.lock): "" when never taken or unknown
    live_files: Mapping[str, str] = field(default_factory=dict)  # files of the live release, as they are
    release_env: Mapping[str, str] = field(default_factory=dict)  # RELEASE_ID, ENV_DIGEST_*, ... of the live one
    secrets: Mapping[str, str] = field(default_factory=dict)  # installed env/<svc>.env and tls/<file> -> sha256
    secret_versions: tuple[str, ...] = ()
    gateway_conf: str = ""  # sha256 of the installed gateway config ("" when absent)
    upstreams: Mapping[str, frozenset[str]] = field(default_factory=dict)
    containers: tuple[Container, ...] = ()
    images: Mapping[str, str] = field(default_factory=dict)  # repository:tag -> image id
    state: Mapping = field(default_factory=dict)  # shared/state.json: live release history
    # Per release: its release.env values and the SHA-256 of its env files and gateway config.
    releases_meta: Mapping[str, "ReleaseMeta"] = field(default_factory=dict)
    secret_version_files: Mapping[str, str] = field(default_factory=dict)  # "<version>/env/<svc>.env" -> sha256

    @property
    def current(self) -> str:
        return self.host.current

    def running(self, service: str) -> list[Container]:
        return [c for c in self.containers if c.service == service and c.running]

    def of(self, service: str) -> list[Container]:
        return [c for c in self.containers if c.service == service]

    @property
    def history(self) -> list[dict]:
        return list(self.state.get("history", [])) if isinstance(self.state, dict) else []


@dataclass(frozen=True)
class ReleaseMeta:
    release: str
    values: Mapping[str, str]  # release.env: RELEASE_ID, ENV_DIGEST_*, DEFINITION_*, SECRETS_VERSION
    hashes: Mapping[str, str]  # env/<svc>.env, gateway/nginx.conf -> sha256

    def definition(self, service: str) -> str:
        return self.values.get("DEFINITION_" + service.upper().replace("-", "_"), "")

    @property
    def secrets_version(self) -> str:
        return self.values.get("SECRETS_VERSION", "")


def parse_releases_meta(text: str) -> dict[str, ReleaseMeta]:
    metas: dict[str, tuple[dict, dict]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("--- "):
            name = line[4:].strip()
            metas[name] = ({}, {})
        elif name is None:
            continue
        elif line.startswith("# "):
            digest, _, path = line[2:].partition(" ")
            metas[name][1][path.strip()] = digest
        else:
            key, sep, value = line.partition("=")
            if sep:
                metas[name][0][key.strip()] = value.strip()
    return {n: ReleaseMeta(n, v, h) for n, (v, h) in metas.items()}


def split_sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith(SECTION):
            name = line[len(SECTION):].strip()
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def _env_lines(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("'")
    return values


def parse_observation(text: str, project: str) -> Observed:
    s = split_sections(text)
    try:
        state = json.loads(s.get("state", "").strip() or "{}")
    except ValueError:
        state = {}
    images = {ref: iid for ref, iid in parse_image_ids(s.get("images", "")).items() if iid}
    try:
        containers = tuple(stack_only(parse_containers(s.get("containers", "").strip() or "[]", project)))
    except ValueError:
        containers = ()
    return Observed(
        host=HostFacts.parse(s.get("host", "")),
        lock=parse_lock(s.get("lock", "")),
        lock_last=s.get("lock-last", "").strip(),
        live_files=parse_hashes(s.get("live-files", "")),
        release_env=_env_lines(s.get("release-env", "")),
        secrets={**parse_hashes(s.get("secrets-env", "")), **parse_hashes(s.get("secrets-tls", ""))},
        secret_versions=tuple(sorted(v for v in s.get("secret-versions", "").split() if v)),
        gateway_conf=parse_hashes(s.get("gateway-conf", "")).get("nginx.conf", ""),
        upstreams=parse_upstreams(s.get("upstreams", "")),
        containers=containers,
        images=images,
        state=state if isinstance(state, dict) else {},
        releases_meta=parse_releases_meta(s.get("releases-meta", "")),
        secret_version_files=parse_hashes(s.get("secret-version-files", "")),
    )
