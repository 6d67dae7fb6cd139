"""`inv backup`: one backup set per run in ``backups/<env>/<UTC timestamp>/``.

Every artifact is streamed over SSH straight into its file (constant memory, binary-safe), with the
byte count, the remote exit status and a SHA-256 computed on both ends compared. MinIO's objects come
through the S3 API over an SSH tunnel (`objects.py`). Artifacts are optionally compressed (zstd) and
encrypted at rest (age) on the way to disk (`sealing.py`); the manifest records both, with the SHA-256 of
the stored file and of its content. The set is written under ``.partial-<timestamp>`` and renamed only
when complete, so an interrupted backup never looks like a good one. Files are 0600.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deploy import __version__
from deploy.commands import backup as bk
from deploy.commands import docker as dk
from deploy.backup.sealing import Sealing, open_sealed_writer, open_unsealed_reader
from deploy.core.console import Console
from deploy.core.errors import ExitCode, HealthdeployError, IntegrityError, UsageError
from deploy.core.services import RESTORABLE
from deploy.core.settings import BACKUPABLE, Settings
from deploy.execute.ssh import progress_printer
from deploy.facts.containers import inspect_named, parse_containers
from deploy.facts.host import current_release
from deploy.facts.ports import parse_published_port, published_port
from deploy.stack.render import Target

BACKUP_ENGINES = BACKUPABLE
S3_PORT = 9000
QDRANT_PORT = 6333


@dataclass(frozen=True)
class Artifact:
    service: str
    file: str
    command: object  # Command streamed over SSH; None for MinIO and Qdrant (their APIs over a tunnel)
    method: str
    precompressed: bool = False  # the engine compresses it already: zstd would only cost CPU


def artifacts_for(settings: Settings, service: str, container: str) -> list[Artifact]:
    if service == "postgres":
        return [Artifact(service, "postgres.dump", bk.postgres_dump(container), "pg_dump -Fc", True),
                Artifact(service, "postgres-globals.sql", bk.postgres_globals(container), "pg_dumpall --globals-only")]
    if service == "influxdb":
        method = "influxd backup -portable" if settings.influx_version == "1" else "influx backup"
        return [Artifact(service, "influxdb.tar", bk.influx_backup(container, settings.influx_version,
                                                                    settings.influx_bucket), method, True)]
    if service == "mongodb":
        return [Artifact(service, "mongodb.archive.gz", bk.mongo_dump(container), "mongodump --archive --gzip", True)]
    if service == "minio":
        return [Artifact(service, "minio.tar", None, "S3 API (every bucket, objects with metadata) over an SSH tunnel")]
    if service == "redis":
        return [Artifact(service, "redis.rdb", bk.redis_rdb(container), "redis-cli --rdb")]
    if service == "qdrant":
        return [Artifact(service, "qdrant.snapshot", None, "Qdrant full snapshot (HTTP API) over an SSH tunnel")]
    raise UsageError(f"no backup method for {service}", f"choose from {', '.join(BACKUP_ENGINES)}")


def check_services(settings: Settings, services: tuple[str, ...] | None) -> tuple[str, ...]:
    """The services a backup takes (``--services`` or BACKUP_SERVICES); refuses unknown or disabled ones."""
    wanted = services or tuple(s for s in settings.backup_services if s in settings.enabled_infra)
    for service in wanted:
        if service not in BACKUP_ENGINES:
            raise UsageError(f"cannot back up {service!r}", f"choose from {', '.join(BACKUP_ENGINES)}")
        if service not in settings.enabled_infra:
            raise UsageError(f"{service} is disabled in env '{settings.env_name}'", "remove it from --services")
    return wanted


def sealing_for(settings: Settings, artifact: Artifact) -> Sealing:
    compress = settings.backup_compression == "zstd" and not artifact.precompressed
    return Sealing(compression="zstd" if compress else None, level=settings.backup_zstd_level,
                   recipients=tuple(settings.backup_age_recipients))


def _utc(ts: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(ts or time.time(), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _ContentHash:
    """Counts and hashes the plain bytes on their way into a sealed writer (the S3 archive's checksum)."""

    def __init__(self, target):
        self.target, self.sha256, self.bytes = target, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


def tunnel_to(host, container: str, port: int) -> tuple[str, Callable[[], object]]:
    """("address:port", socket factory) for ``container``'s ``port`` as published on the host's loopback, or
    else (a Swarm task publishes nothing) at its address on the node's docker_gwbridge, which the node
    itself reaches."""
    published = parse_published_port(host.run(published_port(container, port), check=False).text)
    if published is None:
        bridge = host.run(gwbridge_address(container), check=False).text.strip()
        if not bridge:
            raise HealthdeployError(f"{host.alias}: {container} does not publish port {port} on the host",
                                    "deploy again: the compose file publishes it on 127.0.0.1")
        published = (bridge, port)
    address, number = published
    return f"{address}:{number}", lambda: host.open_tcp(address, number)


GWBRIDGE_ADDRESS = r"""id=$(docker inspect --format '{{.Id}}' "$1" 2>/dev/null) || exit 0
docker network inspect docker_gwbridge \
  --format '{{range $k, $c := .Containers}}{{$k}} {{$c.IPv4Address}}{{println}}{{end}}' 2>/dev/null |
  awk -v id="$id" '$1 == id { split($2, a, "/"); print a[1] }'
exit 0
"""


def gwbridge_address(container: str):
    """The address a Swarm task's container has on the node's docker_gwbridge (empty when it has none)."""
    from deploy.commands.base import script

    return script(GWBRIDGE_ADDRESS, container, description=f"address of {container} on docker_gwbridge", readonly=True)


def object_store(settings: Settings, host, container: str):
    """An S3 client for the MinIO container on ``host``, through an SSH tunnel to its loopback port."""
    from deploy.backup import objects

    endpoint, open_socket = tunnel_to(host, container, S3_PORT)
    return objects.client_over(open_socket, endpoint, settings.minio_user, settings.minio_password.reveal())


def backup(settings: Settings, host, console: Console, root: Path, services: tuple[str, ...] | None = None,
           role: str = "both", kind: str = "backup", placement=None) -> Path:
    """Pull one backup set from ``host`` (an executor) into ``root/<env>/<timestamp>``; return its path.

    The artifacts stream concurrently over the one SSH connection (each engine dumps in its own container,
    so the host's cores work in parallel); the facts the manifest needs are read meanwhile. ``placement``
    (TARGET=swarm: ``cli.swarm.SwarmPlacement``) names the task containers on ``host`` and the live release;
    without it they are the Compose project's."""
    from concurrent.futures import Future, ThreadPoolExecutor

    wanted = check_services(settings, services)
    target = Target.of(settings, host.alias, host.address)
    # Compose names an infrastructure container <project>-<service>-1: the dumps start at once, and the
    # inspection that confirms they run (and gives their images for the manifest) is read meanwhile.
    names = (placement.containers(wanted) if placement is not None else
             {service: f"{target.project}-{service}-1" for service in wanted})
    artifacts = [(service, artifact) for service in wanted for artifact in artifacts_for(settings, service, names[service])]
    with ThreadPoolExecutor(max_workers=BACKUP_STREAMS) as pool:
        started = time.time()
        stamp = _dt.datetime.fromtimestamp(started, _dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        env_dir = root / settings.env_name
        env_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in clean_stale_partials(env_dir, stamp):
            console.phase(host.alias, f"removed {stale.name}, left by a backup that was killed")
        partial = env_dir / f".partial-{stamp}-{os.getpid()}"  # two backups of one second: their own each
        partial.mkdir(mode=0o700)
        _write_owner(partial)
        try:
            progress = _Progress(progress_printer("backup"))
            listing: Future = Future()  # set below; every stream ends by looking its container up in it
            futures = [pool.submit(_take, settings, host, console, partial, artifact, names[service], listing,
                                   progress) for service, artifact in artifacts]
            try:  # in this thread, while the streams run
                release = (placement.release() if placement is not None else
                           host.run(current_release(target.deploy_path)).text.strip())
                inspected = host.run(inspect_named(tuple(names.values()))).text or "[]"
                listing.set_result({c.name: c for c in parse_containers(inspected, target.project)
                                    if c.state == "running"})
            except BaseException as exc:
                if not listing.done():
                    listing.set_exception(exc)
                getattr(host, "abort_streams", lambda: None)()
                raise
            try:
                records = _results(futures, host)
            except HealthdeployError:
                _check_running(host, listing, names)  # "not running: X" says more than a failed docker exec
                raise
            manifest = {
                "format": 2, "env": settings.env_name, "host": host.alias, "role": role, "kind": kind,
                "release": release,
                "started": _utc(started), "finished": _utc(), "tool": f"healthdeploy {__version__}",
                "encryption": "age" if settings.backup_age_recipients else None,
                "compression": "zstd" if settings.backup_compression == "zstd" else "engine-native",
                "artifacts": records,
            }
            fd = os.open(partial / "manifest.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(manifest, out, indent=2, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            if settings.backup_signing_key:
                from deploy.backup import signing

                signer = signing.sign_set(partial, signing_key(settings))
                console.phase(host.alias, f"manifest signed by {signer}")
            (partial / OWNER_FILE).unlink(missing_ok=True)
            return publish_set(partial, env_dir, stamp)  # complete and checked: only now does it look like a set
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):  # end the streams still running: leaving the pool waits for them
                getattr(host, "abort_streams", lambda: None)()
            shutil.rmtree(partial, ignore_errors=True)
            raise


OWNER_FILE = ".owner"


def publish_set(partial: Path, env_dir: Path, stamp: str) -> Path:
    """Rename a finished set to its name: ``stamp``, or ``stamp-2``, ``-3``, ... when a set of the same second
    exists (cells: every host's set in one `inv backup`; names sort in the order they were taken)."""
    import errno

    for n in range(1, 1000):
        final = env_dir / (stamp if n == 1 else f"{stamp}-{n}")
        if final.exists():
            continue
        try:
            os.rename(partial, final)
            return final
        except OSError as exc:  # taken between the check and the rename
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise HealthdeployError(f"cannot name the backup set {stamp}: {env_dir} holds too many of that second",
                            f"remove what is not a backup set from {env_dir}")


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot), "" when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _write_owner(partial: Path) -> None:
    pid = os.getpid()
    (partial / OWNER_FILE).write_text(json.dumps({"pid": pid, "start": _process_start(pid), "boot_id": _boot_id()}))


def _owner_alive(partial: Path) -> bool:
    try:
        owner = json.loads((partial / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False  # no owner file: made before owners were recorded, or its owner died writing it
    if owner.get("boot_id") != _boot_id():
        return False
    return bool(owner.get("start")) and _process_start(int(owner.get("pid", 0))) == owner.get("start")


def clean_stale_partials(env_dir: Path, stamp: str) -> list[Path]:
    """Remove the ``.partial-*`` directories of backups that were killed (SIGKILL, a crash: no clean-up ran):
    older than the backup starting now (``stamp``) and not owned by a live process. Returns what went."""
    removed = []
    for partial in sorted(env_dir.glob(".partial-*")):
        if partial.name[len(".partial-"):] >= stamp or _owner_alive(partial):
            continue
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def signing_key(settings: Settings) -> str:
    """BACKUP_SIGNING_KEY; in the sandbox a throwaway pair is made on first use (its public key goes into
    BACKUP_ALLOWED_SIGNERS), so tests and the demo sign and verify like production."""
    from deploy.backup import signing

    key = settings.backup_signing_key
    if not Path(key).exists():
        if settings.env_kind != "sandbox":
            raise UsageError(f"BACKUP_SIGNING_KEY {key} does not exist",
                             "make one with `inv backup.keygen --signing --out FILE` and add its public key to "
                             "BACKUP_ALLOWED_SIGNERS")
        Path(key).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        signing.write_keypair(key, settings.backup_allowed_signers or None)
    return key


# Two at a time: measured on 2 cores, four concurrent streams made a 46 MB pg_dump slower (6.5 s) than two
# (6.2 s).
BACKUP_STREAMS = 2


def _check_running(host, listing, names: dict[str, str]) -> dict:
    try:
        running = listing.result()
    except HealthdeployError:
        return {}
    missing = [service for service, name in names.items() if name not in running]
    if missing:
        raise HealthdeployError(f"{host.alias}: not running: {', '.join(missing)}", "`fab status` shows the stack")
    return running


def _results(futures, host) -> list[dict]:
    """Every record in order; on the first failure the other streams are aborted (they end now instead of
    finishing a dump nobody will keep) and that first error is raised."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    failed = next((f for f in futures if f in done and f.exception() is not None), None)
    if failed is not None:
        if pending:
            getattr(host, "abort_streams", lambda: None)()
            wait(pending)
        raise failed.exception()
    return [f.result() for f in futures]


class _Progress:
    """One progress line (bytes and rate) summed over the concurrent streams; only on a terminal."""

    def __init__(self, printer):
        import threading

        self.printer, self.totals, self.lock = printer, {}, threading.Lock()

    def for_artifact(self, name: str):
        if self.printer is None:
            return None

        def report(total: int) -> None:
            with self.lock:
                self.totals[name] = total
                self.printer(sum(self.totals.values()))
        return report


def _take(settings: Settings, host, console: Console, partial: Path, artifact: Artifact, container: str,
          listing, progress_total: _Progress) -> dict:
    """Stream one artifact into its (sealed) file; return its manifest record."""
    sealing = sealing_for(settings, artifact)
    path = partial / (artifact.file + sealing.suffix())
    progress = progress_total.for_artifact(artifact.file)
    extra: dict = {}
    version = ""
    t0 = time.monotonic()
    with open_sealed_writer(path, sealing) as writer:
        if artifact.command is None:  # an HTTP API through a tunnel: we hash the content ourselves
            counted = _ContentHash(writer)
            if artifact.service == "qdrant":
                from deploy.backup import vectors

                endpoint, open_socket = tunnel_to(host, container, QDRANT_PORT)
                extra["qdrant"] = vectors.snapshot(open_socket, endpoint, counted, progress,
                                                   api_key=settings.qdrant_api_key)
                checked = "size and SHA-256 checked against the server's"
            else:
                from deploy.backup import objects

                extra["objects"] = objects.backup_objects(object_store(settings, host, container), counted,
                                                          progress).record()
                checked = "each object checked against its Content-Length and ETag"
            content_bytes, content_sha256 = counted.bytes, counted.sha256.hexdigest()
        else:
            result = host.stream_to_file(artifact.command, writer, progress=progress, structured=bk.STRUCTURED)
            content_bytes, content_sha256 = result.bytes, result.sha256
            version = bk.parse_version(result.stderr)
            checked = "checked on both ends"
            if artifact.file == "postgres.dump":
                extra["rows"] = bk.parse_rows(result.stderr)
            if artifact.service == "influxdb" and settings.influx_version == "1":
                extra["influx"] = bk.parse_influx_counts(result.stderr, settings.influx_bucket)
                if not extra["influx"].get("t0"):
                    raise IntegrityError(f"{artifact.file}: the InfluxDB backup reported no cut-off time (T0)",
                                         "run the backup again; see the InfluxDB container's logs")
    seconds = time.monotonic() - t0
    sealed = f", stored {writer.stored_bytes} bytes ({_describe(sealing)})" if sealing.sealed else ""
    console.phase(host.alias, f"{path.name}: {content_bytes} bytes in {seconds:.1f}s, sha256 {content_sha256[:12]} "
                              f"({checked}){sealed}")
    image = _check_running(host, listing, {artifact.service: container})[container].image_ref
    return {"service": artifact.service, "artifact": artifact.file, "file": path.name, "method": artifact.method,
            "engine_version": version, "image": image, "bytes": writer.stored_bytes, "sha256": writer.stored_sha256,
            "content_bytes": content_bytes, "content_sha256": content_sha256, "sealing": sealing.record(),
            "seconds": round(seconds, 2), **extra}


def _describe(sealing: Sealing) -> str:
    parts = [f"zstd -{sealing.level}"] if sealing.compression else []
    if sealing.recipients:
        parts.append(f"age to {len(sealing.recipients)} recipient(s)")
    return ", ".join(parts)


def read_manifest(path: Path) -> dict | None:
    """The manifest of the set at ``path``, or None when it is unreadable, truncated or not a manifest."""
    try:
        data = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("artifacts"), list) or not all(
            isinstance(a, dict) and "service" in a and "file" in a for a in data["artifacts"]):
        return None
    return data


def list_sets(root: Path, env: str) -> list[dict]:
    """Every set of ``env``, oldest first. A set whose manifest cannot be read (truncated, not JSON, no valid
    finish time) is listed with kind ``damaged`` and a ``problem`` instead of stopping the listing."""
    sets = []
    for manifest in sorted((root / env).glob("*/manifest.json")):
        path = manifest.parent
        data = read_manifest(path)
        problem = None
        if data is None:
            problem = "manifest.json is unreadable or truncated"
        else:
            try:
                _dt.datetime.fromisoformat(str(data["finished"]).replace("Z", "+00:00"))
            except (KeyError, ValueError, TypeError):
                problem = "manifest.json has no valid finish time"
        signed = (path / "manifest.json.sig").exists()
        if problem:
            sets.append({"set": path.name, "finished": None, "host": None, "release": None, "bytes": 0,
                         "services": [], "kind": "damaged", "signed": signed, "verified": None,
                         "damaged": problem, "problem": problem})
            continue
        verify = path / "verify.json"
        try:
            verified = json.loads(verify.read_text()).get("result") if verify.exists() else None
        except (OSError, ValueError, AttributeError):
            verified = "unreadable"
        sets.append({"set": path.name, "finished": data.get("finished"), "host": data.get("host"),
                     "release": data.get("release"),
                     "bytes": sum(a.get("bytes", 0) for a in data["artifacts"]),
                     "services": sorted({a["service"] for a in data["artifacts"]}),
                     "kind": data.get("kind") or "backup", "signed": signed, "verified": verified, "problem": None})
    return sets


def unreadable_sets_error(env: str, sets: list[dict]) -> IntegrityError | None:
    """One error naming every set listed with a problem (``list_sets``), or None."""
    broken = [x["set"] for x in sets if x.get("problem")]
    if not broken:
        return None
    return IntegrityError(f"{len(broken)} backup set(s) of env '{env}' have an unreadable manifest.json: "
                          f"{', '.join(broken)}",
                          "they cannot be restored or verified: remove them (backups/" + env + "/SET) "
                          "or put the manifest back from a copy")


# -- checking a set ------------------------------------------------------------------------------------
def resolve_set(root: Path, env: str, name: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = root / env / name
    if name == "latest":
        # The newest set a person took: never a safety backup (taken by a restore) nor a damaged one.
        sets = [root / env / x["set"] for x in list_sets(root, env) if x["kind"] == "backup"]
        if not sets:
            raise UsageError(f"no backup set for env '{env}' in {root / env}", f"inv backup --env {env}")
        path = sets[-1]
    if not (path / "manifest.json").is_file():
        raise UsageError(f"{path} is not a backup set (no manifest.json)", f"see `inv backup.list --env {env}`")
    return path


def check_set(path: Path) -> dict:
    """Manifest readable, every artifact present with the recorded size and SHA-256; else IntegrityError."""
    import hashlib

    from deploy.core.errors import IntegrityError

    try:
        manifest = json.loads((path / "manifest.json").read_text())
        artifacts = manifest["artifacts"]
    except (OSError, ValueError, KeyError) as exc:
        raise IntegrityError(f"{path / 'manifest.json'} is unreadable: {exc}", "this set cannot be trusted") from None
    for a in artifacts:
        f = path / a["file"]
        if not f.is_file():
            raise IntegrityError(f"{f} is missing", "this set cannot be trusted")
        size = f.stat().st_size
        if size != a["bytes"]:
            raise IntegrityError(f"{f} has {size} bytes, the manifest says {a['bytes']} (truncated or corrupt)",
                                 "this set cannot be trusted; use another")
        digest = hashlib.sha256()
        with open(f, "rb") as data:
            for chunk in iter(lambda: data.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != a["sha256"]:
            raise IntegrityError(f"{f}: SHA-256 differs from the manifest (corrupt)", "this set cannot be trusted; use another")
    return manifest




def check_origin(settings: Settings, path: Path, console: Console | None = None) -> str:
    """Who signed the set (their key's fingerprint), checked before anything else of it is read.

    With BACKUP_ALLOWED_SIGNERS set, or in production, an unsigned or wrongly signed set is refused (exit 8).
    Elsewhere an unsigned set is accepted with a warning and "" is returned: nothing that runs as the
    database superuser (the roles file) is applied from it."""
    from deploy.backup import signing

    if settings.backup_allowed_signers:
        if settings.env_kind == "sandbox" and not Path(settings.backup_allowed_signers).exists() \
                and settings.backup_signing_key:
            signing_key(settings)  # the sandbox's pair is made on first use
        return signing.verify_set(path, settings.backup_allowed_signers)
    if settings.env_kind == "production":
        raise IntegrityError(f"{path.name}: cannot check who made this set: BACKUP_ALLOWED_SIGNERS is not set",
                             f"set it in env/{settings.env_name}.env to the public keys that sign backups")
    if console is not None:
        console.warn(f"{path.name}: origin not checked (BACKUP_ALLOWED_SIGNERS is not set); roles will not be applied")
    return ""


def prove_readable(settings: Settings, path: Path, manifest: dict, services) -> int:
    """Every artifact of ``services`` read through to its end: decrypted with the configured key and
    decompressed, streamed (no copy), its content's SHA-256 compared with the manifest. A set encrypted to
    another key, or damaged inside its encryption, is refused here (exit 8), before the host is touched.
    Returns the content bytes read."""
    check_keys(settings, manifest, services)
    total = 0
    for record in manifest["artifacts"]:
        if record["service"] not in services:
            continue
        digest = hashlib.sha256()
        with _unsealed(settings, path, record) as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                total += len(chunk)
        _check_content(path, record, digest.hexdigest())
    return total


def artifact_record(manifest: dict, name: str) -> dict | None:
    """The manifest record of artifact ``name`` (e.g. postgres.dump), whatever suffix sealing gave its file."""
    return next((a for a in manifest["artifacts"] if a.get("artifact", a["file"]) == name), None)


def restore_services(settings: Settings, manifest: dict, services: tuple[str, ...] | None) -> tuple[str, ...]:
    """Which services a restore takes; refuses what the set lacks or cannot restore, and a missing key."""
    present = sorted({a["service"] for a in manifest["artifacts"]})
    wanted = services or tuple(s for s in RESTORABLE if s in present)
    for service in wanted:
        if service not in present:
            raise UsageError(f"the set has no {service} backup", f"it has: {', '.join(present)}")
        if service not in RESTORABLE:
            raise UsageError(f"restoring {service} is not supported", f"restorable: {', '.join(RESTORABLE)}")
        if service not in settings.enabled_infra:
            raise UsageError(f"{service} is disabled in env '{settings.env_name}'", "remove it from --services")
    check_keys(settings, manifest, wanted)
    return tuple(wanted)


def check_keys(settings: Settings, manifest: dict, services) -> None:
    """An encrypted set needs the private key before anything on the host is touched."""
    encrypted = [a["file"] for a in manifest["artifacts"]
                 if a["service"] in services and (a.get("sealing") or {}).get("encryption")]
    if encrypted and not settings.backup_age_identity_file:
        raise UsageError(f"{encrypted[0]} is encrypted with age and BACKUP_AGE_IDENTITY_FILE is not set",
                         f"set it in env/{settings.env_name}.env to the file holding the private key")
    if encrypted:
        from deploy.backup.sealing import load_identities

        load_identities(settings.backup_age_identity_file)  # unreadable or invalid: one clear line now


def facts_release(host, settings: Settings) -> str:
    target = Target.of(settings, host.alias, host.address)
    return host.run(current_release(target.deploy_path)).text.strip()


def _unsealed(settings: Settings, path: Path, record: dict):
    return open_unsealed_reader(path / record["file"], Sealing.from_record(record.get("sealing") or {}),
                                settings.backup_age_identity_file or None)


def _check_content(path: Path, record: dict, sha256: str) -> None:
    expected = record.get("content_sha256", record["sha256"])
    if sha256 != expected:
        raise IntegrityError(f"{path / record['file']}: the restored content's SHA-256 differs from the manifest",
                             "this set cannot be trusted; use another")


def _send(settings: Settings, host, command, path: Path, record: dict) -> None:
    with _unsealed(settings, path, record) as source:
        result = host.stream_from_file(command, source, progress=progress_printer(record["file"]))
    _check_content(path, record, result.sha256)


def _restore_objects(settings: Settings, client, path: Path, record: dict):
    from deploy.backup import objects

    with _unsealed(settings, path, record) as source:
        counted = _ContentRead(source)
        summary = objects.restore_objects(client, counted, progress_printer(record["file"]))
        while counted.read(1 << 20):  # tar's end-of-archive padding: hash every byte
            pass
    _check_content(path, record, counted.sha256.hexdigest())
    return summary


class _ContentRead:
    def __init__(self, source):
        self.source, self.sha256 = source, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.sha256.update(data)
        return data


# -- the restore drill ---------------------------------------------------------------------------------
def verify(settings: Settings, host, console: Console, path: Path, manifest: dict) -> dict:
    """Restore the set into throwaway containers on ``host`` and compare with what the manifest recorded."""
    import secrets as _secrets

    report = {"set": path.name, "checked_at": _utc(), "host": host.alias, "checks": [], "result": "ok"}
    services = {a["service"] for a in manifest["artifacts"]}
    check_keys(settings, manifest, services)
    check_resources(settings, host, manifest, tuple(services), drill=True)
    # The host's name is part of the container's: test suites of several checkouts sharing one engine remove
    # only their own hosts' leftovers.
    safe_alias = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in host.alias.lower())
    prefix = f"hd-verify-{safe_alias}-{path.name.lower()}-{_secrets.token_hex(3)}"
    drills = {"postgres": _drill_postgres, "influxdb": _drill_influx, "minio": _drill_objects}
    for service, drill in drills.items():
        if service in services:
            name = f"{prefix}-{service}"
            try:
                check = drill(settings, host, console, path, manifest, name)
            finally:
                host.run(dk.remove_force(name), check=False)
            report["checks"].append(check)
    for service in sorted(services - set(drills)):
        report["checks"].append({"service": service, "result": "skipped",
                                 "reason": "no restore drill for this engine yet (checksums were checked)"})
    drilled = [c for c in report["checks"] if c["result"] != "skipped"]
    if any(c["result"] != "ok" for c in drilled):
        report["result"] = "failed"
    if not drilled:
        report["result"] = "failed"
        report["reason"] = "nothing in this set can be drilled (PostgreSQL, InfluxDB 1.x and MinIO can)"
    fd = os.open(path / ".verify.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(report, out, indent=2, sort_keys=True)
    os.replace(path / ".verify.json.tmp", path / "verify.json")
    return report


DRILL_MEMORY = "512m"  # each throwaway server's memory limit


def check_resources(settings: Settings, host, manifest: dict, services: tuple[str, ...], drill: bool) -> None:
    """Free disk under the Docker root and the deploy path, and available memory, against what the set needs;
    refused in one line (exit 3, nothing started) when short."""
    from deploy.facts.resources import Resources, resources
    from deploy.plan.restore import resource_needs, resource_problems

    target = Target.of(settings, host.alias, host.address)
    facts = Resources.parse(host.run(resources(target.deploy_path)).text)
    content: dict[str, int] = {}
    for a in manifest["artifacts"]:
        content[a["service"]] = content.get(a["service"], 0) + int(a.get("content_bytes", a.get("bytes", 0)) or 0)
    disk, memory = resource_needs(content, services, drill=drill)
    what = "the restore drill" if drill else "the restore beside the live data"
    problems = resource_problems(disk, memory, facts.docker_free_mb, facts.deploy_free_mb, facts.mem_available_mb,
                                 facts.docker_root, what)
    if problems:
        raise HealthdeployError(f"{host.alias}: {'; '.join(problems)}", "free space or memory on the host first; "
                                "nothing was started", exit_code=ExitCode.PREFLIGHT)


def influx_mismatches(recorded: dict, restored: dict) -> list[str]:
    """Everything up to the cut-off must be back, in every retention policy; more is possible (points written
    late with old timestamps)."""
    mismatches = []
    policies = [("", recorded.get("points", {}), restored.get("points", {}))]
    policies += [(rp, counts, restored.get("rp_points", {}).get(rp, {}))
                 for rp, counts in sorted((recorded.get("rp_points") or {}).items())]
    for rp, wanted, got_points in policies:
        for measurement, fields in sorted(wanted.items()):
            for field_name, count in sorted(fields.items()):
                got = got_points.get(measurement, {}).get(field_name, 0)
                if got < count:
                    where = f"{rp}.{measurement}" if rp else measurement
                    mismatches.append(f"{where}.{field_name}: recorded {count} points, restored {got}")
    for measurement, count in sorted(recorded.get("series", {}).items()):
        got = restored.get("series", {}).get(measurement, 0)
        if got < count:
            mismatches.append(f"{measurement}: recorded {count} series, restored {got}")
    wanted_rps = {rp["name"] for rp in recorded.get("retention_policies") or []}
    got_rps = {rp["name"] for rp in restored.get("retention_policies") or []}
    if wanted_rps and restored.get("retention_policies") is not None and wanted_rps - got_rps:
        mismatches.append(f"retention policies missing: {', '.join(sorted(wanted_rps - got_rps))}")
    return mismatches


def _differences(recorded: dict, restored: dict) -> list[str]:
    """Every key whose restored value is not exactly the recorded one."""
    return [f"{key}: recorded {recorded.get(key)}, restored {restored.get(key)}"
            for key in sorted(set(recorded) | set(restored)) if recorded.get(key) != restored.get(key)]


def _wait(host, probe, what: str, seconds: float = 120, name: str = "") -> None:
    deadline = time.monotonic() + seconds
    checks = 0
    while not probe():
        checks += 1
        if name and checks % 10 == 0:  # every 5 s: a container that is gone will never answer
            state = host.run(dk.container_state(name), check=False).text.strip()
            if state not in ("running", "created", "restarting"):
                raise HealthdeployError(f"the throwaway {what} container {name} is {state or 'gone'} before it "
                                        "answered", "see `docker logs` on the host (a memory limit too low? removed "
                                        "by someone else?) and run it again")
        if time.monotonic() > deadline:
            raise HealthdeployError(f"the throwaway {what} did not start within {seconds:.0f}s",
                                    "see `docker logs` on the host")
        time.sleep(0.5)


def _drill_postgres(settings: Settings, host, console: Console, path: Path, manifest: dict, name: str) -> dict:
    import secrets as _secrets

    from deploy.commands import cmd

    drill_password = _secrets.token_hex(16)  # a throwaway server with no network: not a secret of the system
    host.run(dk.run_throwaway(name, settings.postgres_image, network="none", memory=DRILL_MEMORY,
                              environment=(f"POSTGRES_USER={settings.db_user}", f"POSTGRES_DB={settings.db_name}",
                                           f"POSTGRES_PASSWORD={drill_password}"),
                              description="start a throwaway PostgreSQL"))
    ready = cmd("docker", "exec", name, "pg_isready", "-q", "-h", "127.0.0.1", description="wait for PostgreSQL",
                readonly=True)
    _wait(host, lambda: host.run(ready, check=False).ok, "PostgreSQL", name=name)
    time.sleep(1)  # the image restarts the server once after initdb
    _wait(host, lambda: host.run(ready, check=False).ok, "PostgreSQL", name=name)
    globals_record = artifact_record(manifest, "postgres-globals.sql")
    if globals_record:
        _send(settings, host, bk.postgres_restore_globals(name), path, globals_record)
    dump = artifact_record(manifest, "postgres.dump")
    _send(settings, host, bk.postgres_restore(name), path, dump)
    restored = bk.parse_rows(host.run(bk.postgres_row_counts(name)).text)
    recorded = dump.get("rows", {})
    mismatches = _differences(recorded, restored)
    console.phase(host.alias, f"postgres drill: {len(restored)} tables, {sum(restored.values())} rows, "
                              f"{len(mismatches)} mismatch(es)")
    return {"service": "postgres", "tables": restored, "mismatches": mismatches,
            "result": "ok" if not mismatches else "failed"}


def _drill_influx(settings: Settings, host, console: Console, path: Path, manifest: dict, name: str) -> dict:
    record = artifact_record(manifest, "influxdb.tar")
    recorded = record.get("influx")
    if settings.influx_version != "1" or not recorded:
        return {"service": "influxdb", "result": "skipped",
                "reason": "InfluxDB 2.x has no drill yet" if settings.influx_version != "1"
                else "this set recorded no point counts"}
    if not recorded.get("t0"):
        raise IntegrityError(f"{path / record['file']}: the set recorded InfluxDB counts but no cut-off time (T0)",
                             "the counts cannot be compared; take a new backup")
    # Not the service's env file: its INFLUX_DB makes the image create the database in an init phase whose
    # temporary server answers /ping and is then restarted under the drill (seen as a failed count query).
    host.run(dk.run_throwaway(name, settings.influxdb_image, network="none", memory=DRILL_MEMORY,
                              environment=("INFLUXDB_HTTP_AUTH_ENABLED=false",),
                              description="start a throwaway InfluxDB"))
    _wait(host, lambda: host.run(bk.influx_ready(name), check=False).ok, "InfluxDB", name=name)
    _send(settings, host, bk.influx_drill_restore(name, settings.influx_bucket), path, record)
    restored = bk.parse_influx_counts(host.run(bk.influx_counts(name, bk.DRILL_DATABASE, recorded["t0"]),
                                               structured=bk.STRUCTURED).err)
    mismatches = influx_mismatches(recorded, restored)
    points = sum(sum(f.values()) for f in restored["points"].values()) + sum(
        sum(sum(f.values()) for f in rp.values()) for rp in restored.get("rp_points", {}).values())
    console.phase(host.alias, f"influxdb drill: {len(restored['series'])} measurements, "
                              f"{sum(restored['series'].values())} series, {points} field values up to "
                              f"{recorded['t0']} in {len(restored.get('retention_policies') or [1])} retention "
                              f"policies, {len(mismatches)} mismatch(es)")
    return {"service": "influxdb", "cutoff": recorded["t0"], "points": restored["points"],
            "rp_points": restored.get("rp_points", {}), "series": restored["series"], "mismatches": mismatches,
            "result": "ok" if not mismatches else "failed"}


def _drill_objects(settings: Settings, host, console: Console, path: Path, manifest: dict, name: str) -> dict:
    from deploy.backup import objects

    import secrets as _secrets

    from deploy.commands import files as fs

    record = artifact_record(manifest, "minio.tar")
    arguments = () if settings.stack_variant == "sandbox" else ("server", "/data")
    # Throwaway credentials (the drill needs none of the system's), in a 0600 file on the host: the restored
    # objects are patient files, and a password in a `docker run -e` would show in the host's process list.
    user, password = "drill", _secrets.token_hex(16)
    env_file = f"/tmp/{name}.env"
    host.run(fs.write_file(env_file, f"MINIO_ROOT_USER='{user}'\nMINIO_ROOT_PASSWORD='{password}'\n".encode(), "0600"))
    try:
        host.run(dk.run_throwaway(name, settings.minio_image, *arguments, publish=S3_PORT, tmpfs=("/tmp",),
                                  memory=DRILL_MEMORY, env_files=(env_file,), description="start a throwaway object store"))
    finally:
        host.run(fs.remove_tree(env_file), check=False)
    from deploy.backup import objects as _objects

    endpoint, open_socket = tunnel_to(host, name, S3_PORT)
    client = _objects.client_over(open_socket, endpoint, user, password)

    def answers() -> bool:
        try:
            client.list_buckets()
            return True
        except Exception:  # not listening yet: connection refused, reset, 503
            return False

    _wait(host, answers, "object store", name=name)
    _restore_objects(settings, client, path, record)
    restored = objects.count_objects(client)
    recorded = record.get("objects", {})
    mismatches = _differences(recorded, restored)
    console.phase(host.alias, f"minio drill: {len(restored)} buckets, {sum(b['objects'] for b in restored.values())} "
                              f"objects, {sum(b['bytes'] for b in restored.values())} bytes, "
                              f"{len(mismatches)} mismatch(es)")
    return {"service": "minio", "buckets": restored, "mismatches": mismatches,
            "result": "ok" if not mismatches else "failed"}
