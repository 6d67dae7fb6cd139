"""What a release consists of: rendered stack files plus the application source, as ``{path: bytes}``.

Pure apart from reading the local source directory. Change detection compares per-file SHA-256
with the MANIFEST of the live release, so only changed files are sent.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from deploy.core.errors import UsageError
from deploy.core.urls import display_url  # noqa: F401  (re-exported: callers use pl.display_url)
from deploy.core.settings import PROJECT_ROOT, Settings
from deploy.stack.render import Target, render_build_files, render_release_files
from deploy.stack.sourcefilter import DEPLOYIGNORE, Refusal, SourceFilter, secret_reason

MANIFEST = "MANIFEST"
RELEASE_ENV = "release.env"  # RELEASE_ID for compose interpolation; excluded from change detection
SWARM_STACK_FILES = ("stack.yaml", "stack-data.yaml")  # only a TARGET=swarm release has them (written at apply)
# Never shipped, never looked at: build output, caches, VCS data. (An env file is not in here: it is refused
# unless .deployignore or DEPLOY_ALLOW says what to do with it, see sourcefilter.py.)
EXCLUDED_NAMES = {".git", "node_modules", "__pycache__", ".venv", "venv", ".pytest_cache", ".mypy_cache",
                  "dist", "unpackage", ".DS_Store"}
SNIFF_BYTES = 64 << 10  # how much of each file is searched for a private key or a token


GIT_PREFIXES = ("git@", "ssh://", "https://", "http://", "git://", "file://")
SOURCE_FILE = "SOURCE"  # for a git source: "git <url> <commit>"; the tree itself is exported on the host


def is_git(source: str) -> bool:
    return source.startswith(GIT_PREFIXES) or source.endswith(".git")


def git_source_files(url: str, commit: str) -> dict[str, bytes]:
    return {SOURCE_FILE: f"git {display_url(url)} {commit}\n".encode()}


def collect_source(source: str, allow: tuple[str, ...] | list[str] = ()) -> dict[str, bytes]:
    """Files of a local application directory, keyed ``src/<relative path>``.

    ``.deployignore`` in the source root (gitignore syntax) leaves files out. A file that looks like a secret
    (sourcefilter.SECRET_NAME_PATTERNS, a private key inside, an .npmrc with a token, ...) stops the deploy
    here, before any connection, unless .deployignore leaves it out or ``allow`` (DEPLOY_ALLOW) names it."""
    root = Path(source)
    if not root.is_absolute():
        root = PROJECT_ROOT / root
    if not root.is_dir():
        raise UsageError(f"APP_SOURCE {source} is not a directory", "point APP_SOURCE at the application checkout")
    ignore_file = root / DEPLOYIGNORE
    rules = SourceFilter(ignore_file.read_text(encoding="utf-8") if ignore_file.is_file() else "", allow)
    files = {}
    refused: list[Refusal] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if here == "." else here + "/"
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_NAMES and not rules.ignored(prefix + d, is_dir=True))
        for name in sorted(filenames):
            relative = prefix + name
            if name in EXCLUDED_NAMES or name.endswith(".pyc") or relative == DEPLOYIGNORE or rules.ignored(relative):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            why = secret_reason(relative, data[:SNIFF_BYTES])
            if why and not rules.allowed(relative):
                refused.append(Refusal(relative, why))
                continue
            files["src/" + relative] = data
    if refused:
        shown = ", ".join(str(r) for r in refused[:12]) + (f" and {len(refused) - 12} more" if len(refused) > 12 else "")
        raise UsageError(f"APP_SOURCE {root} has {len(refused)} file(s) that look like secrets: {shown}; nothing was sent",
                         f"leave them out with {root / DEPLOYIGNORE} (gitignore syntax), or ship them on purpose with "
                         f"DEPLOY_ALLOW=path,glob,... in the env file")
    return files


def build_payload(settings: Settings, target: Target, source_files: dict[str, bytes]) -> dict[str, bytes]:
    files = dict(render_release_files(settings, target))
    if not target.role.runs_app:
        return files  # a data host builds nothing: an application change is no change there
    files.update(source_files)
    if settings.stack_variant == "production":
        # The rendered Dockerfile, .dockerignore and nginx.conf replace the checkout's own.
        for path, text in render_build_files(settings).items():
            files[f"src/{path}"] = text.encode()
    return files


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_of(files: dict[str, bytes]) -> dict[str, str]:
    return {path: sha256(data) for path, data in files.items() if path not in (MANIFEST, RELEASE_ENV)}


def format_manifest(manifest: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(manifest.items())).encode()


@dataclass(frozen=True)
class PayloadDiff:
    changed: tuple[str, ...]  # new or different
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.changed and not self.removed

    def services_touched(self) -> set[str]:
        touched = set()
        for path in self.changed + self.removed:
            parts = path.split("/")
            if parts[0] == "src" and len(parts) > 2:
                touched.add(parts[1])
        return touched


def image_inputs(manifest: dict[str, str], services: tuple[str, ...], variant: str) -> dict[str, str]:
    """Per service, a digest of the release files its image is built from.

    Production: the service's own build context, src/<service>/. Sandbox: one context for all four, in
    which src/<service>/ is the service's own and every other file under src/ (app.py, the Dockerfile)
    belongs to all of them. A git source stands for its whole tree (the SOURCE file names the commit).
    """
    out = {}
    for service in services:
        own = f"src/{service}/"
        others = tuple(f"src/{s}/" for s in services if s != service)
        picked = []
        for path, digest in sorted(manifest.items()):
            if path == SOURCE_FILE or path.startswith(own):
                picked.append(f"{path} {digest}")
            elif variant == "sandbox" and path.startswith("src/") and not path.startswith(others):
                picked.append(f"{path} {digest}")
        out[service] = hashlib.sha256("\n".join(picked).encode()).hexdigest()[:16]
    return out


def diff(new: dict[str, str], live: dict[str, str]) -> PayloadDiff:
    changed = tuple(sorted(p for p, digest in new.items() if live.get(p) != digest))
    removed = tuple(sorted(p for p in live if p not in new))
    return PayloadDiff(changed, removed)


RELEASE_FILE_MODE = 0o640  # release files on the host: owner and group (docker) read; others nothing
RELEASE_DIR_MODE = "0750"


def tar_of(files: dict[str, bytes], paths: tuple[str, ...] | list[str], mode: int = RELEASE_FILE_MODE) -> bytes:
    """A tar of the given files, stamped with the current time.

    The time matters: BuildKit skips re-sending a context file whose size and mtime did not change,
    so a changed file of the same size with a fixed mtime would be built from its stale copy.
    """
    import time

    now = int(time.time())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(paths):
            data = files[path]
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = mode
            info.mtime = now
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def new_release_id(source_manifest: dict[str, str], now: _dt.datetime | None = None) -> str:
    """``<UTC time>-<source revision>``: sortable, and says which source it carries."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    digest = hashlib.sha256("".join(f"{p}{d}" for p, d in sorted(source_manifest.items())).encode()).hexdigest()
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{digest[:8]}"
