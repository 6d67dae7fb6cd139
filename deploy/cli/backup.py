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
from deploy.core.services import WRITERS
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
    bk.check_services(s, services)  # refused before connecting (no lock taken, nothing audited)
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


def backup_keygen(console, out: str, signing: bool = False, allowed_signers: str | None = None) -> int:
    """Write a new age identity (or, with ``signing``, an ed25519 signing key) to ``out`` (0600, never
    overwritten) and print its public key."""
    from deploy.backup.sealing import generate_identity

    if signing:
        from deploy.backup.signing import PRINCIPAL, write_keypair

        public = write_keypair(out, allowed_signers)
        console.result(f"signing key written to {out} (operator machine only; set BACKUP_SIGNING_KEY={out})")
        console.result(f"public key (a line of the BACKUP_ALLOWED_SIGNERS file): {PRINCIPAL} {public}"
                       + (f"; appended to {allowed_signers}" if allowed_signers else ""))
        return EXIT_OK

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
    error = bk.unreadable_sets_error(runtime.settings.env_name, sets)
    if as_json:
        runtime.console.json({"sets": sets, **({"error": error.to_json()} if error else {})})
    else:
        runtime.console.table(["set", "kind", "finished", "host", "release", "services", "bytes", "signed", "verified"],
                              [[x["set"], x["kind"], x["finished"] or "-", x["host"] or "-", x["release"] or "-",
                                ",".join(x["services"]) or "-", x["bytes"], "yes" if x["signed"] else "no",
                                "UNREADABLE" if x["problem"] else x["verified"] or "-"] for x in sets])
    if error:  # listed, then reported: exit 8
        error.json_reported = as_json
        raise error
    return EXIT_OK


def _check_env(s: Settings, path, manifest: dict, what: str) -> None:
    if manifest.get("env") != s.env_name:
        raise UsageError(f"{path.name} is a backup of env '{manifest.get('env')}', not '{s.env_name}'",
                         f"{what} a set of this environment (`inv backup.list --env {s.env_name}`)")


def _app_hosts(s: Settings, data_alias: str) -> list[str]:
    """The hosts whose writers stop for a restore of ``data_alias``: with TOPOLOGY=shared and a separate data
    host, every application host (their backend and ai-service write to it); otherwise the host itself."""
    if s.topology == "shared" and len(s.hosts) > 1:
        return [h for h in s.hosts if s.role_of(h).runs_app]
    return [data_alias]


def plan_for(runtime: Runtime, path, manifest: dict, services: tuple[str, ...], alias: str, safety_backup: bool,
             signer: str, app_hosts: list[str] | None = None):
    """``app_hosts``: where the writers stop (default: the hosts whose writers write to ``alias``; on Swarm the
    manager, which scales them)."""
    from deploy.plan import restore as rp

    s = runtime.settings
    minio = bk.artifact_record(manifest, "minio.tar") or {}
    buckets = tuple(sorted(minio.get("objects", {}))) if "minio" in services else ()
    artifacts = {}
    content = {}
    for a in manifest["artifacts"]:
        if a["service"] in services:
            artifacts.setdefault(a["service"], ()) 
            artifacts[a["service"]] += (a["file"],)
            content[a["service"]] = content.get(a["service"], 0) + int(a.get("content_bytes", a.get("bytes", 0)) or 0)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    apps = _app_hosts(s, alias) if app_hosts is None else app_hosts
    disk, memory = rp.resource_needs(content, services)
    checks = ["manifest signature " + (f"verified (signer {signer})" if signer else "NOT checked (no BACKUP_ALLOWED_SIGNERS)"),
              "every artifact's size and SHA-256",
              "every artifact decrypted and decompressed to its end, content SHA-256 compared (streamed)",
              "the set belongs to this env and host; it has every store asked for",
              f"free disk and memory on {alias}",
              "unfinished earlier restores recovered first"]
    return rp.RestorePlan(
        set_name=path.name, env=s.env_name, data_host=alias, stamp=stamp,
        stores=rp.store_plans(services, stamp, s.db_name, s.influx_bucket, s.influx_version, buckets, artifacts),
        writers=tuple(rp.WriterStop(h, WRITERS, scaled=s.swarm) for h in apps), lock_hosts=tuple(dict.fromkeys([alias, *apps])),
        safety_backup=safety_backup, safety_services=services if safety_backup else (), checks=tuple(checks),
        signed_by=signer, apply_globals=bool(signer), buckets=buckets, need_disk_mb=disk, need_memory_mb=memory)


def _confirm(s: Settings, question: str, refusal: str, flag: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError(refusal, f"rerun with {flag}")
    answer = input(f"{question} Type the env name: ")
    if answer.strip() != s.env_name:
        raise UsageError("not confirmed", "nothing was changed")


def run_restore(runtime: Runtime, set_name: str, host_alias: str | None, services: tuple[str, ...] | None,
                yes: bool = False, safety_backup: bool = True, break_lock: bool = False,
                other_host: bool = False, dry_run: bool = False, yes_really: bool = False,
                as_json: bool = False) -> int:
    """Check the set (signature, checksums, every artifact readable with the key), confirm, lock every host
    involved, then load every store beside its live data, check, switch all, bring the writers back, audit."""
    import contextlib

    from deploy.backup.restore import Restore, recover_journals
    from deploy.cli.health import health

    s = runtime.settings
    console = runtime.console
    if s.swarm:
        from deploy.cli import swarm

        if host_alias:
            raise UsageError("--host has no meaning with TARGET=swarm", "the data node of SWARM_NODES is restored")
        return swarm.run_restore(runtime, set_name, services, yes=yes, safety_backup=safety_backup,
                                 break_lock=break_lock, other_host=other_host, dry_run=dry_run,
                                 yes_really=yes_really, as_json=as_json)
    path = bk.resolve_set(BACKUP_ROOT, s.env_name, set_name)
    signer = bk.check_origin(s, path, console)  # before anything else of the set is read
    manifest = bk.check_set(path)  # refuses a corrupt or truncated set before touching anything
    _check_env(s, path, manifest, "restore")
    services = bk.restore_services(s, manifest, services)  # what it lacks or a missing key: refused before any change
    if s.topology == "cells" and len(s.hosts) > 1 and not host_alias:
        raise UsageError("with TOPOLOGY=cells every host keeps its own data: name the host to restore onto",
                         f"inv restore --env {s.env_name} --from {path.name} --host HOST")
    alias = data_hosts_for(s, host_alias, "restore onto")[0]
    origin = manifest.get("host")
    if origin and origin != alias and not other_host:
        raise UsageError(f"{path.name} was taken on {origin}, not on {alias}",
                         "restore it onto its own host, or pass --other-host to restore it here on purpose")
    role, here = manifest.get("role"), s.role_of(alias).value
    if role and role != here and not other_host:  # e.g. a single host's set (both) onto a data host
        raise UsageError(f"{path.name} was taken from a '{role}' host; {alias} is a '{here}' host",
                         "restore it onto a host of its role, or pass --other-host to restore it here on purpose")
    if not safety_backup and s.env_kind == "production" and not yes_really and not dry_run:
        _confirm(s, f"Restore {path.name} on {s.env_name} WITHOUT a safety backup of the live data?",
                 f"--no-safety-backup on production '{s.env_name}' needs its own confirmation", "--yes-really")
    plan = plan_for(runtime, path, manifest, services, alias, safety_backup, signer)
    read = bk.prove_readable(s, path, manifest, services)  # wrong key, damage inside: exit 8, host untouched
    if dry_run:
        if as_json:
            console.json({"plan": plan.record(), "content_bytes_read": read})
        else:
            for line in plan.lines():
                console.result(line)
            console.result(f"dry run: every artifact read ({read} bytes of content); nothing was changed")
        return EXIT_OK
    if s.env_kind == "production" and not yes:
        _confirm(s, f"Restore {path.name} over the live data of {s.env_name} on {alias}?",
                 f"restoring {path.name} over production data of '{s.env_name}' needs confirmation", "--yes")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        sessions = {}
        for h in plan.lock_hosts:
            host = stack.enter_context(runtime.connect(h))
            sessions[h] = _session(runtime, h, host)
            stack.enter_context(sessions[h].locked("restore", path.name, break_lock))
        data = sessions[alias]
        host = data.host
        bk.check_resources(s, host, manifest, services, drill=False)
        recovered = recover_journals(s, data, console, plan.stamp)
        restore = Restore(
            s, plan, path, manifest, data, {h: sessions[h] for h in _app_hosts(s, alias)}, console, BACKUP_ROOT,
            take_backup=lambda: bk.backup(s, host, console, BACKUP_ROOT, services, role=data.t.role.value,
                                          kind="safety"),
            verify_set=lambda p: bk.verify(s, host, console, p, bk.check_set(p)))
        run_and_report(runtime, restore, sessions, path, services, signer, started, recovered, as_json)
    # The application must be healthy again with the restored data.
    return health(runtime, [])


def run_and_report(runtime: Runtime, restore, sessions: dict, path, services: tuple[str, ...], signer: str,
                   started: float, recovered: list[str], as_json: bool, extra: dict | None = None):
    """Run ``restore`` (Compose or Swarm), audit it on every locked host, print its table. Under the locks."""
    from deploy.backup.restore import RestoreFailed

    console = runtime.console
    extra = extra or {}
    try:
        report = restore.run()
    except RestoreFailed as exc:
        entry = {"event": "restore", "set": path.name, "result": "failed", "reason": exc.cause_message,
                 "stores": exc.states, "safety_backup": restore.report.safety_backup,
                 "duration_s": round(time.monotonic() - started, 1), **extra}
        for session in sessions.values():
            try:
                session.audit(entry)
            except HealthdeployError:
                pass
        if as_json:
            console.json({**restore.report.record(), "result": "failed", "error": exc.message})
        else:
            console.table(["store", "state"], [[k, v] for k, v in exc.states.items()])
        raise
    except HealthdeployError as exc:
        restore.data.audit({"event": "restore", "set": path.name, "result": "failed", "reason": exc.message,
                            "duration_s": round(time.monotonic() - started, 1), **extra})
        raise
    report.recovered = recovered
    entry = {"event": "restore", "set": path.name, "result": "ok", "services": list(services),
             "stores": report.states, "safety_backup": report.safety_backup, "signed_by": signer or None,
             "duration_s": round(time.monotonic() - started, 1),
             "writers_down_s": round(report.writers_down_seconds, 1), **extra}
    for session in sessions.values():
        session.audit(entry)
    if as_json:
        console.json({**report.record(), "result": "ok"})
    else:
        console.table(["store", "state", "detail"],
                      [[k, v, report.details.get(k, "")] for k, v in report.states.items()])
        console.result(f"restored {', '.join(services)} from {path.name} on {restore.data.alias} in "
                       f"{time.monotonic() - started:.1f}s"
                       + (f"; safety backup {report.safety_backup} (drill {report.safety_verified})"
                          if report.safety_backup else ""))
    return report


def run_verify(runtime: Runtime, set_name: str, as_json: bool = False) -> int:
    s = runtime.settings
    if s.swarm:
        from deploy.cli import swarm

        return swarm.run_verify(runtime, set_name, as_json=as_json)
    path = bk.resolve_set(BACKUP_ROOT, s.env_name, set_name)
    bk.check_origin(s, path, runtime.console)  # before anything else of the set is read
    manifest = bk.check_set(path)
    _check_env(s, path, manifest, "verify")  # a drill of another env's set would compare the wrong settings
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
    listed = bk.list_sets(BACKUP_ROOT, env)
    for entry in listed:
        if entry["problem"]:
            continue  # not ours to judge: left alone, reported below
        finished = _dt.datetime.fromisoformat(entry["finished"].replace("Z", "+00:00"))
        sets.append(retention.BackupSet(entry["set"], finished, entry["verified"] == "ok"))
    kept = retention.keep(sets, policy)
    error = bk.unreadable_sets_error(env, listed)
    rows = [{"set": x["set"], "finished": None, "verified": False, "action": "left alone (manifest unreadable)"}
            for x in listed if x["problem"]]
    for s in sorted(sets, key=lambda x: x.finished):
        action = f"keep ({kept[s.name]})" if s.name in kept else ("would delete" if dry_run else "deleted")
        if s.name not in kept and not dry_run:
            shutil.rmtree(BACKUP_ROOT / env / s.name)
        rows.append({"set": s.name, "finished": s.finished.isoformat(), "verified": s.verified, "action": action})
    if as_json:
        runtime.console.json({"sets": rows, **({"error": error.to_json()} if error else {})})
    else:
        runtime.console.table(["set", "finished", "verified", "action"],
                              [[r["set"], r["finished"] or "-", "yes" if r["verified"] else "no", r["action"]]
                               for r in rows])
    if error:
        error.json_reported = as_json
        raise error
    return EXIT_OK
