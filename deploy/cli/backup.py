"""`inv backup`, `backup.list`, `backup.verify`, `backup.prune`, `backup.keygen`, `inv restore`.

Backups, restores and drills act on the host that keeps the data: the data host with TOPOLOGY=shared, every
host (one set each) with TOPOLOGY=cells. Each takes the host lock: a backup never captures a half-restored
state, a restore never runs beside a deploy.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import time

from deploy.backup import run as bk
from deploy.cli import Runtime
from deploy.core.errors import EXIT_OK, ExitCode, HealthdeployError, UsageError
from deploy.core.settings import PROJECT_ROOT, Settings
from deploy.execute.session import Session
from deploy.plan import retention

BACKUP_ROOT = PROJECT_ROOT / "backups"


def data_hosts_for(settings: Settings, host_alias: str | None, what: str) -> list[str]:
    """The host(s) a backup or restore acts on."""
    if host_alias:
        if host_alias not in settings.hosts:
            raise UsageError(f"host {host_alias} is not in HOSTS of env '{settings.env_name}'",
                             f"pick from {', '.join(settings.hosts)}")
        if not settings.role_of(host_alias).runs_data:
            raise UsageError(f"{host_alias} keeps no data (role {settings.role_of(host_alias).value})",
                             f"{what} the data host: {', '.join(settings.data_hosts)}")
        return [host_alias]
    if settings.topology == "cells" and len(settings.hosts) > 1:
        return list(settings.hosts)
    return [settings.data_host]


def _session(runtime: Runtime, alias: str, host) -> Session:
    return Session(host, runtime.settings, runtime.target(alias, host.address), runtime.console)


def run_backup(runtime: Runtime, host_alias: str | None, services: tuple[str, ...] | None,
               as_json: bool = False) -> int:
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        if host_alias:
            raise UsageError("--host has no meaning with TARGET=swarm", "the data node of SWARM_NODES is backed up")
        return swarm.run_backup(runtime, services, as_json=as_json)
    made = []
    for alias in data_hosts_for(s, host_alias, "back up"):
        with runtime.connect(alias) as host:
            session = _session(runtime, alias, host)
            with session.locked("backup"):
                path = bk.backup(s, host, runtime.console, BACKUP_ROOT, services, role=session.t.role.value)
                session.audit({"event": "backup", "set": path.name, "result": "ok"})
        made.append(path)
    sets = [{"set": str(p), "manifest": json.loads((p / "manifest.json").read_text())} for p in made]
    if as_json:
        runtime.console.json(sets[0] if len(sets) == 1 else {"sets": sets})
    else:
        for entry in sets:
            manifest = entry["manifest"]
            runtime.console.table(["host", "file", "service", "bytes", "sha256", "seconds"],
                                  [[manifest["host"], a["file"], a["service"], a["bytes"], a["sha256"][:16], a["seconds"]]
                                   for a in manifest["artifacts"]])
            runtime.console.result(f"backup set {entry['set']}")
    return EXIT_OK


def backup_keygen(console, out: str) -> int:
    """Write a new age identity to ``out`` (0600, never overwritten) and print its public key."""
    from deploy.backup.sealing import generate_identity

    secret, public = generate_identity()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{out} already exists", "choose another path; an existing key is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}", "choose a writable path") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"# healthdeploy backup key, public key: {public}\n{secret}\n")
    console.result(f"private key written to {out} (keep it off the servers; set BACKUP_AGE_IDENTITY_FILE={out} "
                   "where you restore)")
    console.result(f"BACKUP_AGE_RECIPIENTS={public}")
    return EXIT_OK


def list_backups(runtime: Runtime, as_json: bool = False) -> int:
    sets = bk.list_sets(BACKUP_ROOT, runtime.settings.env_name)
    if as_json:
        runtime.console.json({"sets": sets})
    else:
        runtime.console.table(["set", "finished", "host", "release", "services", "bytes", "verified"],
                              [[x["set"], x["finished"], x["host"], x["release"], ",".join(x["services"]), x["bytes"],
                                x["verified"] or "-"] for x in sets])
    return EXIT_OK


def run_restore(runtime: Runtime, set_name: str, host_alias: str | None, services: tuple[str, ...] | None,
                yes: bool = False, safety_backup: bool = True, break_lock: bool = False,
                other_host: bool = False) -> int:
    """Check the set, confirm, lock, take a safety backup, stop writers, restore, restart, check health, audit."""
    from deploy.cli.health import health

    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.run_restore(runtime, set_name, services, yes=yes, safety_backup=safety_backup,
                                 break_lock=break_lock, other_host=other_host)
    path = bk.resolve_set(BACKUP_ROOT, s.env_name, set_name)
    manifest = bk.check_set(path)  # refuses a corrupt or truncated set before touching anything
    if manifest.get("env") != s.env_name:
        raise UsageError(f"{path.name} is a backup of env '{manifest.get('env')}', not '{s.env_name}'",
                         "restore a set of this environment")
    services = bk.restore_plan(s, manifest, services)  # what it lacks or a missing key: refused before any change
    if s.topology == "cells" and len(s.hosts) > 1 and not host_alias:
        raise UsageError("with TOPOLOGY=cells every host keeps its own data: name the host to restore onto",
                         f"inv restore --env {s.env_name} --from {path.name} --host HOST")
    alias = data_hosts_for(s, host_alias, "restore onto")[0]
    origin = manifest.get("host")
    if origin and origin != alias and not other_host:
        raise UsageError(f"{path.name} was taken on {origin}, not on {alias}",
                         "restore it onto its own host, or pass --other-host to restore it here on purpose")
    if s.env_kind == "production" and not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"restoring {path.name} over production data of '{s.env_name}' needs confirmation",
                             "rerun with --yes")
        answer = input(f"Restore {path.name} over the live data of {s.env_name} on {alias}? Type the env name: ")
        if answer.strip() != s.env_name:
            raise UsageError("not confirmed", "nothing was changed")
    started = time.monotonic()
    safety = None
    with runtime.connect(alias) as host:
        session = _session(runtime, alias, host)
        with session.locked("restore", path.name, break_lock):
            try:
                if safety_backup:
                    runtime.console.phase(alias, "safety backup of the current data first")
                    safety = bk.backup(s, host, runtime.console, BACKUP_ROOT,
                                       tuple(x for x in (services or s.backup_services) if x in s.enabled_infra),
                                       role=session.t.role.value, kind="safety")
                restored = bk.restore(s, host, runtime.console, path, manifest, services, session=session)
                session.audit({"event": "restore", "set": path.name, "services": restored, "result": "ok",
                               "safety_backup": safety.name if safety else None,
                               "duration_s": round(time.monotonic() - started, 1)})
            except HealthdeployError as exc:
                session.audit({"event": "restore", "set": path.name, "result": "failed", "reason": exc.message,
                               "duration_s": round(time.monotonic() - started, 1)})
                raise
    runtime.console.result(f"restored {', '.join(restored)} from {path.name} on {alias}"
                           + (f"; safety backup {safety.name}" if safety else ""))
    # The application must be healthy again with the restored data.
    return health(runtime, [])


def run_verify(runtime: Runtime, set_name: str, as_json: bool = False) -> int:
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.run_verify(runtime, set_name, as_json=as_json)
    path = bk.resolve_set(BACKUP_ROOT, s.env_name, set_name)
    manifest = bk.check_set(path)
    alias = manifest.get("host") if manifest.get("host") in s.hosts and s.role_of(manifest["host"]).runs_data \
        else data_hosts_for(s, None, "verify on")[0]
    with runtime.connect(alias) as host:
        report = bk.verify(s, host, runtime.console, path, manifest)
    if as_json:
        runtime.console.json(report)
    else:
        for check in report["checks"]:
            runtime.console.result(f"{check['service']}: {check['result']}"
                                   + (f" ({check['reason']})" if check.get("reason") else "")
                                   + "".join(f"\n  {m}" for m in check.get("mismatches", [])))
        runtime.console.result(f"{path.name}: {report['result']} (verify.json written)")
    return EXIT_OK if report["result"] == "ok" else ExitCode.INTEGRITY


def backup_and_drill(runtime: Runtime) -> int:
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.backup_and_drill(runtime)
    worst = EXIT_OK
    for alias in data_hosts_for(s, None, "back up"):
        with runtime.connect(alias) as host:
            session = _session(runtime, alias, host)
            with session.locked("backup"):
                path = bk.backup(s, host, runtime.console, BACKUP_ROOT, role=session.t.role.value)
                session.audit({"event": "backup", "set": path.name, "result": "ok"})
            report = bk.verify(s, host, runtime.console, path, bk.check_set(path))
        runtime.console.info(f"backup set {path.name}: restore drill {report['result']}")
        if report["result"] != "ok":
            worst = ExitCode.INTEGRITY
    return worst


def prune_backups(runtime: Runtime, policy, dry_run: bool = False, as_json: bool = False) -> int:
    """Delete the sets the retention policy does not keep (never the newest verified one)."""
    env = runtime.settings.env_name
    sets = []
    for entry in bk.list_sets(BACKUP_ROOT, env):
        finished = _dt.datetime.fromisoformat((entry["finished"] or "").replace("Z", "+00:00"))
        sets.append(retention.BackupSet(entry["set"], finished, entry["verified"] == "ok"))
    kept = retention.keep(sets, policy)
    rows = []
    for s in sorted(sets, key=lambda x: x.finished):
        action = f"keep ({kept[s.name]})" if s.name in kept else ("would delete" if dry_run else "deleted")
        if s.name not in kept and not dry_run:
            shutil.rmtree(BACKUP_ROOT / env / s.name)
        rows.append({"set": s.name, "finished": s.finished.isoformat(), "verified": s.verified, "action": action})
    if as_json:
        runtime.console.json({"sets": rows})
    else:
        runtime.console.table(["set", "finished", "verified", "action"],
                              [[r["set"], r["finished"], "yes" if r["verified"] else "no", r["action"]] for r in rows])
    return EXIT_OK
