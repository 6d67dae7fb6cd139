"""``Desired`` and its ``Payload`` for one host, computed locally from settings and source, before connecting.

The plan sees only hashes (``Desired``); the bytes travel separately (``Payload``), so a printed plan can
never carry a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.core.services import APP_SERVICES
from deploy.core.settings import Settings
from deploy.plan.deploy import Desired
from deploy.stack import payload as pl
from deploy.stack.render import (Target, env_digests, image_prefix, render_secret_files, secrets_version,
                                 service_definitions, services_on)


@dataclass(frozen=True)
class Payload:
    files: dict[str, bytes]  # the release's files
    secrets: dict[str, bytes]  # env/<svc>.env secret halves, tls/*.pem
    release_env: bytes  # release.env of a new release: what compose interpolates, and what a rollback reads


def _key(service: str) -> str:
    return service.upper().replace("-", "_")


def desired_for(settings: Settings, target: Target, source_files: dict[str, bytes], release: str,
                migrate_here: bool, git_commit: str = "") -> tuple[Desired, Payload]:
    files = pl.build_payload(settings, target, source_files)
    manifest = pl.manifest_of(files)
    secrets = render_secret_files(settings, target)
    version = secrets_version(secrets)
    digests = env_digests(settings, target)
    definitions = service_definitions(files["compose.yaml"].decode())
    services = services_on(settings, target)
    apps = tuple(s for s in services if s in APP_SERVICES)
    lines = [f"RELEASE_ID={release}", f"SECRETS_VERSION={version}"]
    lines += [f"ENV_DIGEST_{_key(s)}={d}" for s, d in digests.items()]
    lines += [f"DEFINITION_{_key(s)}={d}" for s, d in definitions.items()]
    desired = Desired(
        host=target.alias, role=target.role, services=services, release=release, files=manifest,
        secrets={p: pl.sha256(d) for p, d in secrets.items()}, secrets_version=version, env_digests=digests,
        definitions=definitions, image_inputs=pl.image_inputs(manifest, apps, settings.stack_variant),
        image_prefix=image_prefix(settings, target), variant=settings.stack_variant, git_commit=git_commit,
        migrate_here=migrate_here, min_free_mb=settings.min_free_disk_mb, keep_releases=settings.keep_releases,
        build_on=settings.build_side,
    )
    return desired, Payload(files, secrets, ("\n".join(lines) + "\n").encode())
