"""`inv backup`: one backup set per run in ``backups/<env>/<UTC timestamp>/``.

Every artifact is streamed over SSH straight into its file (constant memory, binary-safe), with the
byte count, the remote exit status and a SHA-256 computed on both ends compared. The set is written
under ``.partial-<timestamp>`` and renamed only when complete, so an interrupted backup never looks
like a good one. Files are 0600.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .commands import backup as bk
from .commands import docker as dk
from .commands import files as fs
from .console import Console
from .errors import HealthdeployError, UsageError
from .facts import Container, HostFacts, stack_containers
from .settings import Settings
from .ssh import progress_printer
from .stack import Target

BACKUP_ENGINES = ("postgres", "influxdb", "mongodb", "redis")  # MinIO objects: not yet (see docs/backup.md)
DEFAULT_ENGINES = ("postgres", "influxdb", "mongodb")


@dataclass(frozen=True)
class Artifact:
    service: str
    file: str
    command: object  # Command
    method: str


def artifacts_for(settings: Settings, service: str, container: str) -> list[Artifact]:
    if service == "postgres":
        return [Artifact(service, "postgres.dump", bk.postgres_dump(container), "pg_dump -Fc"),
                Artifact(service, "postgres-globals.sql", bk.postgres_globals(container), "pg_dumpall --globals-only")]
    if service == "influxdb":
        method = "influxd backup -portable" if settings.influx_version == "1" else "influx backup"
        return [Artifact(service, "influxdb.tar", bk.influx_backup(container, settings.influx_version,
                                                                    settings.influx_bucket), method)]
    if service == "mongodb":
        return [Artifact(service, "mongodb.archive.gz", bk.mongo_dump(container), "mongodump --archive --gzip")]
    if service == "redis":
        return [Artifact(service, "redis.rdb", bk.redis_rdb(container), "redis-cli --rdb")]
    raise UsageError(f"no backup method for {service}", f"choose from {', '.join(BACKUP_ENGINES)}")


VERSION_COMMANDS = {"postgres": bk.postgres_version, "influxdb": bk.influx_version, "redis": bk.redis_version}


def _utc(ts: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(ts or time.time(), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def backup(settings: Settings, host, console: Console, root: Path, services: tuple[str, ...] | None = None) -> Path:
    """Pull one backup set from ``host`` (an executor) into ``root/<env>/<timestamp>``; return its path."""
    wanted = services or tuple(s for s in DEFAULT_ENGINES if s in settings.enabled_infra)
    for service in wanted:
        if service not in BACKUP_ENGINES:
            raise UsageError(f"cannot back up {service!r}", f"choose from {', '.join(BACKUP_ENGINES)}")
        if service not in settings.enabled_infra:
            raise UsageError(f"{service} is disabled in env '{settings.env_name}'", "remove it from --services")
    target = Target.of(settings, host.alias, host.address)
    containers = [c for c in stack_containers(host, target.project) if c.state == "running"]
    by_service: dict[str, Container] = {}
    for c in containers:
        by_service.setdefault(c.service, c)
    missing = [s for s in wanted if s not in by_service]
    if missing:
        raise HealthdeployError(f"{host.alias}: not running: {', '.join(missing)}", "`fab status` shows the stack")
    facts = HostFacts.parse(host.run(fs.host_facts(target.deploy_path)).text)
    started = time.time()
    stamp = _dt.datetime.fromtimestamp(started, _dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    env_dir = root / settings.env_name
    env_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = env_dir / f".partial-{stamp}"
    partial.mkdir(mode=0o700)
    records = []
    try:
        for service in wanted:
            container = by_service[service]
            version = ""
            if service in VERSION_COMMANDS:
                version = host.run(VERSION_COMMANDS[service](container.name), check=False).text.strip()
            for artifact in artifacts_for(settings, service, container.name):
                path = partial / artifact.file
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    t0 = time.monotonic()
                    result = host.stream_to_file(artifact.command, out,
                                                 progress=progress_printer(f"{service} {artifact.file}"))
                    os.fsync(out.fileno())
                seconds = time.monotonic() - t0
                rows = bk.parse_rows(result.stderr) if artifact.file == "postgres.dump" else None
                console.phase(host.alias, f"{artifact.file}: {result.bytes} bytes in {seconds:.1f}s, sha256 "
                                          f"{result.sha256[:12]} (checked on both ends)")
                records.append({"service": service, "file": artifact.file, "method": artifact.method,
                                "engine_version": version, "image": container.image_ref, "bytes": result.bytes,
                                "sha256": result.sha256, "seconds": round(seconds, 2),
                                **({"rows": rows} if rows is not None else {})})
        manifest = {
            "format": 1, "env": settings.env_name, "host": host.alias, "release": facts.current,
            "started": _utc(started), "finished": _utc(), "tool": f"healthdeploy {__version__}",
            "encryption": None, "compression": "engine-native", "artifacts": records,
        }
        fd = os.open(partial / "manifest.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(manifest, out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        final = env_dir / stamp
        os.rename(partial, final)  # complete and checked: only now does it look like a backup set
        return final
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def list_sets(root: Path, env: str) -> list[dict]:
    sets = []
    for manifest in sorted((root / env).glob("*/manifest.json")):
        data = json.loads(manifest.read_text())
        verify = manifest.parent / "verify.json"
        sets.append({"set": manifest.parent.name, "finished": data.get("finished"), "host": data.get("host"),
                     "release": data.get("release"),
                     "bytes": sum(a.get("bytes", 0) for a in data.get("artifacts", [])),
                     "services": sorted({a["service"] for a in data.get("artifacts", [])}),
                     "verified": json.loads(verify.read_text()).get("result") if verify.exists() else None})
    return sets


# -- checking a set ------------------------------------------------------------------------------------
def resolve_set(root: Path, env: str, name: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = root / env / name
    if name == "latest":
        sets = sorted(p.parent for p in (root / env).glob("*/manifest.json"))
        if not sets:
            raise UsageError(f"no backup set for env '{env}' in {root / env}", f"inv backup --env {env}")
        path = sets[-1]
    if not (path / "manifest.json").is_file():
        raise UsageError(f"{path} is not a backup set (no manifest.json)", f"see `inv backup.list --env {env}`")
    return path


def check_set(path: Path) -> dict:
    """Manifest readable, every artifact present with the recorded size and SHA-256; else IntegrityError."""
    import hashlib

    from .errors import IntegrityError

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


RESTORABLE = ("postgres", "influxdb", "mongodb")
WRITERS = ("backend", "ai-service")  # stopped during a restore so nothing writes half-restored data


def restore(settings: Settings, host, console: Console, path: Path, manifest: dict,
            services: tuple[str, ...] | None, job=None) -> list[str]:
    """Restore the set's artifacts into the running stack on ``host``. The caller holds the deploy lock."""
    present = sorted({a["service"] for a in manifest["artifacts"]})
    wanted = services or tuple(s for s in RESTORABLE if s in present)
    for service in wanted:
        if service not in present:
            raise UsageError(f"the set has no {service} backup", f"it has: {', '.join(present)}")
        if service not in RESTORABLE:
            raise UsageError(f"restoring {service} is not supported", f"restorable: {', '.join(RESTORABLE)}")
    target = Target.of(settings, host.alias, host.address)
    containers = [c for c in stack_containers(host, target.project) if c.state == "running"]
    by_service = {}
    for c in containers:
        by_service.setdefault(c.service, c)
    missing = [s for s in wanted if s not in by_service]
    if missing:
        raise HealthdeployError(f"{host.alias}: not running: {', '.join(missing)}", "start the stack first")
    writers = tuple(c.id for c in containers if c.service in WRITERS)
    if writers:
        console.phase(host.alias, f"stopping the application's writers ({len(writers)} container(s))")
        host.run(dk.stop_containers(writers))
    try:
        for service in wanted:
            container = by_service[service].name
            files = {a["file"]: a for a in manifest["artifacts"] if a["service"] == service}
            if service == "postgres":
                if "postgres-globals.sql" in files:
                    _send(host, bk.postgres_restore_globals(container), path / "postgres-globals.sql")
                _send(host, bk.postgres_restore(container), path / "postgres.dump")
            elif service == "influxdb":
                _send(host, bk.influx_restore(container, settings.influx_version, settings.influx_bucket),
                      path / "influxdb.tar")
            elif service == "mongodb":
                _send(host, bk.mongo_restore(container), path / "mongodb.archive.gz")
            console.phase(host.alias, f"{service} restored from {path.name}")
    except BaseException:
        if writers:  # bring the application back, but report the restore's own error, not this
            try:
                _restart_writers(host, settings, console, writers, job)
            except HealthdeployError as exc:
                console.warn(f"{host.alias}: restarting the application after the failed restore: {exc.message}")
        raise
    if writers:
        _restart_writers(host, settings, console, writers, job)
    return list(wanted)


def _restart_writers(host, settings: Settings, console: Console, writers: tuple[str, ...], job) -> None:
    host.run(dk.start_containers(writers))
    if job is not None:
        job.wait_running_healthy(set(writers))
        job.refresh_gateway(facts_release(host, settings))  # a restarted container may have a new address
    console.phase(host.alias, "application writers started again and back in the gateway")


def facts_release(host, settings: Settings) -> str:
    target = Target.of(settings, host.alias, host.address)
    return HostFacts.parse(host.run(fs.host_facts(target.deploy_path)).text).current


def _send(host, command, file: Path) -> None:
    with open(file, "rb") as source:
        host.stream_from_file(command, source, progress=progress_printer(file.name))


# -- the restore drill ---------------------------------------------------------------------------------
def verify(settings: Settings, host, console: Console, path: Path, manifest: dict) -> dict:
    """Restore the set into throwaway containers on ``host`` and compare with what the manifest recorded."""
    import secrets as _secrets

    from .commands import cmd

    report = {"set": path.name, "checked_at": _utc(), "host": host.alias, "checks": [], "result": "ok"}
    services = {a["service"] for a in manifest["artifacts"]}
    if "postgres" in services:
        name = f"hd-verify-{path.name.lower()}-{_secrets.token_hex(3)}"
        drill_password = _secrets.token_hex(16)  # a throwaway server with no network: not a secret of the system
        host.run(cmd("docker", "run", "-d", "--rm", "--network", "none", "--name", name,
                     "-e", f"POSTGRES_USER={settings.db_user}", "-e", f"POSTGRES_DB={settings.db_name}",
                     "-e", f"POSTGRES_PASSWORD={drill_password}", settings.postgres_image,
                     description="start a throwaway PostgreSQL"))
        try:
            deadline = time.monotonic() + 60
            while not host.run(cmd("docker", "exec", name, "pg_isready", "-q", "-h", "127.0.0.1",
                                   description="wait for PostgreSQL", readonly=True), check=False).ok:
                if time.monotonic() > deadline:
                    raise HealthdeployError("the throwaway PostgreSQL did not start", "see docker logs on the host")
                time.sleep(0.5)
            time.sleep(1)  # the image restarts the server once after initdb
            while not host.run(cmd("docker", "exec", name, "pg_isready", "-q", "-h", "127.0.0.1",
                                   description="wait for PostgreSQL", readonly=True), check=False).ok:
                time.sleep(0.5)
            _send(host, bk.postgres_restore_globals(name), path / "postgres-globals.sql")
            _send(host, bk.postgres_restore(name), path / "postgres.dump")
            restored = bk.parse_rows(host.run(bk.postgres_row_counts(name)).text)
            recorded = next(a for a in manifest["artifacts"] if a["file"] == "postgres.dump").get("rows", {})
            mismatches = [f"{t}: recorded {recorded.get(t)}, restored {restored.get(t)}"
                          for t in sorted(set(recorded) | set(restored)) if recorded.get(t) != restored.get(t)]
            report["checks"].append({"service": "postgres", "tables": restored, "mismatches": mismatches,
                                     "result": "ok" if mismatches == [] else "failed"})
            console.phase(host.alias, f"postgres drill: {len(restored)} tables, {sum(restored.values())} rows, "
                                      f"{len(mismatches)} mismatch(es)")
        finally:
            host.run(cmd("docker", "rm", "-f", name, description="remove the throwaway PostgreSQL"), check=False)
    if any(c["result"] != "ok" for c in report["checks"]):
        report["result"] = "failed"
    if not report["checks"]:
        report["result"] = "failed"
        report["reason"] = "nothing in this set can be drilled yet (PostgreSQL only)"
    fd = os.open(path / ".verify.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(report, out, indent=2, sort_keys=True)
    os.replace(path / ".verify.json.tmp", path / "verify.json")
    return report
