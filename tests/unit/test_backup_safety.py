"""Backups that stay trustworthy: every structured stderr line kept (2,000 tables), signed manifests, damaged
manifests listed not crashed on, killed backups' partial directories removed, the checklist's protection item,
the restore builders (PostgreSQL rename switch, bounded InfluxDB copies, MongoDB builders: no server here)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from deploy.commands import backup as bk
from deploy.commands import restore as rs
from deploy.core.errors import IntegrityError, UsageError
from deploy.execute.ssh import StderrKeeper


# -- D: every structured line is kept -----------------------------------------------------------------------
def test_row_counts_of_2000_tables_survive_a_megabyte_of_other_stderr():
    keeper = StderrKeeper(bk.STRUCTURED, keep=64 << 10)
    rows = "".join(f"HEALTHDEPLOY-ROWS public.t{i:04d} {i}\n" for i in range(2000)).encode()
    keeper.feed(b"HEALTHDEPLOY-VERSION postgres (PostgreSQL) 15.8\n")
    for i in range(0, len(rows), 777):  # split anywhere, mid-line included
        keeper.feed(rows[i:i + 777])
    keeper.feed(b"pg_dump: noise\n" * 80_000 + b"x" * 200_000)  # a megabyte of other output, one long line
    keeper.feed(b"\nHEALTHDEPLOY-SHA256 abc\n")
    text = keeper.finish().decode()
    assert bk.parse_rows(text) == {f"public.t{i:04d}": i for i in range(2000)}
    assert bk.parse_version(text) == "postgres (PostgreSQL) 15.8"
    assert text.endswith("HEALTHDEPLOY-SHA256 abc\n") and len(text) < 200_000


def test_too_many_structured_lines_fail_clearly():
    keeper = StderrKeeper(("HEALTHDEPLOY-ROWS ",), cap=1000, what="pg_dump on h1")
    with pytest.raises(IntegrityError, match="pg_dump on h1 printed more than"):
        for i in range(100):
            keeper.feed(f"HEALTHDEPLOY-ROWS public.t{i} {i}\n".encode())


def test_without_prefixes_only_the_tail_is_kept():
    keeper = StderrKeeper((), keep=10)
    keeper.feed(b"0123456789abcdef")
    assert keeper.finish() == b"6789abcdef"


def test_an_influx_drill_without_a_cutoff_fails_clearly(tmp_path):
    from deploy.backup.run import _drill_influx
    from deploy.core.settings import load_settings

    s = load_settings("sandbox")
    manifest = {"artifacts": [{"service": "influxdb", "artifact": "influxdb.tar", "file": "influxdb.tar",
                               "influx": {"points": {"bp": {"sys": 1}}, "series": {"bp": 1}}}]}
    with pytest.raises(IntegrityError, match=r"recorded InfluxDB counts but no cut-off time \(T0\)"):
        _drill_influx(s, None, None, tmp_path, manifest, "x")


# -- G: signed manifests ------------------------------------------------------------------------------------
def make_set(tmp_path: Path, name="20260101T000000Z") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"format": 2, "env": "sandbox", "artifacts": []}))
    return path


def test_a_signed_set_verifies_and_ssh_keygen_agrees(tmp_path):
    from deploy.backup import signing

    key, allowed = tmp_path / "k", tmp_path / "allowed"
    signing.write_keypair(str(key), str(allowed))
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    path = make_set(tmp_path)
    signer = signing.sign_set(path, str(key))
    assert signing.verify_set(path, str(allowed)) == signer
    if subprocess.run(["which", "ssh-keygen"], capture_output=True).returncode == 0:
        proc = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", signing.PRINCIPAL, "-n",
                               signing.NAMESPACE, "-s", str(path / signing.SIGNATURE_FILE)],
                              input=(path / "manifest.json").read_bytes(), capture_output=True)
        assert proc.returncode == 0, proc.stderr


def test_unsigned_changed_or_foreign_sets_are_refused(tmp_path):
    from deploy.backup import signing

    signing.write_keypair(str(tmp_path / "k"), str(tmp_path / "allowed"))
    signing.write_keypair(str(tmp_path / "other"), str(tmp_path / "other-allowed"))
    unsigned = make_set(tmp_path, "unsigned")
    with pytest.raises(IntegrityError, match="is not signed") as e:
        signing.verify_set(unsigned, str(tmp_path / "allowed"))
    assert e.value.exit_code == 8
    changed = make_set(tmp_path, "changed")
    signing.sign_set(changed, str(tmp_path / "k"))
    (changed / "manifest.json").write_text(json.dumps({"format": 2, "env": "sandbox", "artifacts": [1]}))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        signing.verify_set(changed, str(tmp_path / "allowed"))
    foreign = make_set(tmp_path, "foreign")
    signing.sign_set(foreign, str(tmp_path / "other"))
    with pytest.raises(IntegrityError, match="not in BACKUP_ALLOWED_SIGNERS"):
        signing.verify_set(foreign, str(tmp_path / "allowed"))
    (foreign / signing.SIGNATURE_FILE).write_text("garbage")
    with pytest.raises(IntegrityError, match="not an SSH signature"):
        signing.verify_set(foreign, str(tmp_path / "other-allowed"))


def test_production_refuses_a_set_it_cannot_check(tmp_path):
    from deploy.backup.run import check_origin
    from deploy.core.settings import load_settings

    s = dataclasses.replace(load_settings("sandbox"), env_kind="production", backup_allowed_signers="",
                            backup_signing_key="")
    with pytest.raises(IntegrityError, match="BACKUP_ALLOWED_SIGNERS is not set"):
        check_origin(s, make_set(tmp_path))
    staging = dataclasses.replace(s, env_kind="staging")
    assert check_origin(staging, make_set(tmp_path, "b")) == ""  # accepted, but nothing runs as superuser from it


def test_the_sandbox_makes_its_signing_pair_on_first_use(tmp_path):
    from deploy.backup import signing
    from deploy.backup.run import check_origin, signing_key
    from deploy.core.settings import load_settings

    s = dataclasses.replace(load_settings("sandbox"), backup_signing_key=str(tmp_path / "sk"),
                            backup_allowed_signers=str(tmp_path / "allowed"))
    path = make_set(tmp_path)
    signing.sign_set(path, signing_key(s))
    assert check_origin(s, path).startswith("SHA256:")
    with pytest.raises(UsageError, match="does not exist"):
        signing_key(dataclasses.replace(s, env_kind="production", backup_signing_key=str(tmp_path / "none")))


# -- F: damaged manifests ----------------------------------------------------------------------------------
def test_a_truncated_manifest_is_listed_as_damaged_and_latest_skips_it_and_safety_sets(tmp_path):
    from deploy.backup.run import list_sets, resolve_set

    root = tmp_path / "backups"
    env = root / "sandbox"
    env.mkdir(parents=True)
    for name, kind in (("20260101T000000Z", "backup"), ("20260102T000000Z", "safety")):
        (env / name).mkdir()
        (env / name / "manifest.json").write_text(json.dumps({"kind": kind, "finished": "2026-01-01T00:00:00Z", "artifacts": [
            {"service": "postgres", "file": "postgres.dump", "bytes": 3}]}))
    (env / "20260103T000000Z").mkdir()
    (env / "20260103T000000Z" / "manifest.json").write_text('{"format": 2, "artifacts": [{"serv')
    listing = {x["set"]: x for x in list_sets(root, "sandbox")}
    assert listing["20260103T000000Z"]["kind"] == "damaged" and listing["20260102T000000Z"]["kind"] == "safety"
    assert resolve_set(root, "sandbox", "latest").name == "20260101T000000Z"


# -- C: partial directories of killed backups --------------------------------------------------------------
def test_stale_partials_go_but_not_a_live_one_nor_a_newer_one(tmp_path):
    from deploy.backup import run

    dead = tmp_path / ".partial-20260101T000000Z"
    dead.mkdir()
    (dead / run.OWNER_FILE).write_text(json.dumps({"pid": 999999, "start": "1", "boot_id": run._boot_id()}))
    ownerless = tmp_path / ".partial-20260101T000001Z"
    ownerless.mkdir()
    live = tmp_path / ".partial-20260101T000002Z"
    live.mkdir()
    run._write_owner(live)  # this very process
    newer = tmp_path / ".partial-20260101T000009Z"
    newer.mkdir()
    removed = run.clean_stale_partials(tmp_path, "20260101T000005Z")
    assert removed == [dead, ownerless] and live.exists() and newer.exists()


# -- G: the checklist item ---------------------------------------------------------------------------------
def test_backup_protection_fails_on_production_only():
    import datetime as dt

    from deploy.core.settings import load_settings
    from deploy.plan import checklist as cl

    item = cl.Item("protected", "backup_protection", {})
    s = load_settings("sandbox")
    facts = cl.Facts(settings=s, now=dt.datetime.now(dt.timezone.utc))
    assert cl.check_backup_protection(facts, item).status == "warn"  # sandbox: signed but not encrypted
    prod = dataclasses.replace(s, env_kind="production")
    outcome = cl.check_backup_protection(cl.Facts(settings=prod, now=facts.now), item)
    assert outcome.status == "fail" and "not encrypted at rest" in outcome.reason
    ok = dataclasses.replace(prod, backup_age_recipients=("age1x",))
    assert cl.check_backup_protection(cl.Facts(settings=ok, now=facts.now), item).status == "pass"
    unsigned = dataclasses.replace(ok, backup_signing_key="")
    assert "not signed" in cl.check_backup_protection(cl.Facts(settings=unsigned, now=facts.now), item).reason


# -- A: the restore builders --------------------------------------------------------------------------------
def test_postgres_switch_renames_in_one_transaction_after_ending_sessions():
    text = rs.PG_SWAP
    assert text.index("pg_terminate_backend") < text.index("RENAME TO %I', live, old") < text.index(
        "RENAME TO %I', new, live")
    assert "DO $$" in text and "being accessed by other users" in text  # retried while a session comes back
    switch = rs.postgres_switch("pg", "health_mgmt", "health_mgmt__hd_old_1", "health_mgmt__hd_new_1").render()
    undo = rs.postgres_unswitch("pg", "health_mgmt", "health_mgmt__hd_old_1", "health_mgmt__hd_new_1").render()
    assert switch.endswith("health_mgmt health_mgmt__hd_old_1 health_mgmt__hd_new_1")
    assert undo.endswith("health_mgmt health_mgmt__hd_new_1 health_mgmt__hd_old_1")
    assert "-v db=\"$1\"" in rs.PG_CREATE and ":\"db\"" in rs.PG_CREATE  # quoted by psql, not pasted


def test_influx_copies_are_bounded_per_policy_measurement_and_day():
    shards = {"autogen": [("2023-11-13T00:00:00Z", "2023-11-20T00:00:00Z")],
              "weekly": [("2023-11-13T00:00:00Z", "2023-11-20T00:00:00Z")]}
    statements = rs.copy_statements("new", "live", ["bp", 'we"ird'], shards)
    assert len(statements) == 2 * 7 * 2  # policies x days x measurements
    first = statements[0][1]
    assert first == ('SELECT * INTO "live"."autogen"."bp" FROM "new"."autogen"."bp" WHERE time >= '
                     "'2023-11-13T00:00:00Z' AND time < '2023-11-14T00:00:00Z' GROUP BY *")
    assert any('"we\\"ird"' in s for _, s in statements)
    rps = [{"name": "autogen", "duration": "0s", "shard_duration": "168h0m0s", "replication": 1, "default": True},
           {"name": "weekly", "duration": "87360h0m0s", "shard_duration": "24h0m0s", "replication": 1, "default": False}]
    recreate = [s for _, s in rs.recreate_statements("live", rps)]
    assert recreate[:2] == ['DROP DATABASE "live"', 'CREATE DATABASE "live"']
    assert 'ALTER RETENTION POLICY "autogen" ON "live" DURATION INF REPLICATION 1 SHARD DURATION 604800s DEFAULT' in recreate
    assert 'CREATE RETENTION POLICY "weekly" ON "live" DURATION 314496000s REPLICATION 1 SHARD DURATION 86400s' in recreate
    cq = rs.cq_statements("live", [{"database": "live", "name": "c", "query": "CREATE CONTINUOUS QUERY c ON live BEGIN x END"}])
    assert cq == [("", "CREATE CONTINUOUS QUERY c ON live BEGIN x END")]
    body = rs.influx_exec("influx", statements[:1], "copy").stdin.decode()
    assert body.startswith("new\tSELECT * INTO") and "-\t" in rs.influx_exec("i", [("", "DROP DATABASE x")], "d").stdin.decode()
    with pytest.raises(ValueError):
        rs.influx_exec("i", [("", "a\nb")], "d")


def test_the_guard_runs_the_undo_only_when_armed_and_detached():
    assert rs.GUARD.index('operator_wait "$2"') < rs.GUARD.index('if [ -f "$j/armed" ]') < rs.GUARD.index('sh "$j/undo.sh"')
    assert "trap '' HUP INT TERM PIPE" in rs.GUARD and "recovery.log" in rs.GUARD
    from deploy.commands import docker as dk

    script, inputs = rs.undo_script([dk.start_containers(("a",)), rs.influx_exec("i", [("", "DROP DATABASE x")], "d")],
                                    "/j")
    text = script.decode()
    assert text.index("< /j/undo-0.in") < text.index("docker start a")  # newest first
    assert inputs == {"undo-0.in": b"-\tDROP DATABASE x\n"}


def test_mongo_beside_the_live_data_keeps_the_password_off_argv():
    stage = bk.mongo_stage("m", "health_mgmt", "health_mgmt__hd_new_1").render()
    assert stage.endswith(" sh health_mgmt health_mgmt__hd_new_1")
    assert '--nsFrom "$1.*" --nsTo "$2.*"' in bk.MONGO_STAGE and "--config" in bk.MONGO_STAGE
    swap = bk.mongo_swap("m", "health_mgmt", "old", "new").render()
    assert "process.env.MONGO_INITDB_ROOT_PASSWORD" in swap and "--password" not in swap and "-p " not in swap
    assert "renameCollection" in swap and swap.index("to: old") < swap.index("to: live")


# -- B: what is refused before any host is touched ------------------------------------------------------------
def signed_set(tmp_path: Path, recipients=()) -> tuple[object, Path]:
    """A production-like settings object and one signed set of env 'sandbox' on host 'sandbox'."""
    import hashlib

    from deploy.backup import signing
    from deploy.backup.sealing import Sealing, open_sealed_writer
    from deploy.core.settings import load_settings

    key, allowed = tmp_path / "sign.key", tmp_path / "allowed"
    signing.write_keypair(str(key), str(allowed))
    s = dataclasses.replace(load_settings("sandbox"), env_kind="production", backup_signing_key=str(key),
                            backup_allowed_signers=str(allowed))
    root = tmp_path / "backups"
    path = root / "sandbox" / "20260101T000000Z"
    path.mkdir(parents=True)
    content = b"PGDMP not really"
    sealing = Sealing(recipients=tuple(recipients))
    with open_sealed_writer(path / ("postgres.dump" + sealing.suffix()), sealing) as writer:
        writer.write(content)
    stored = (path / ("postgres.dump" + sealing.suffix())).read_bytes()
    manifest = {"format": 2, "env": "sandbox", "host": "sandbox", "kind": "backup", "artifacts": [
        {"service": "postgres", "artifact": "postgres.dump", "file": "postgres.dump" + sealing.suffix(),
         "bytes": len(stored), "sha256": hashlib.sha256(stored).hexdigest(), "content_bytes": len(content),
         "content_sha256": hashlib.sha256(content).hexdigest(), "sealing": sealing.record(), "rows": {}}]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    signing.sign_set(path, str(key))
    return s, path


def no_connection(settings, alias):
    raise AssertionError(f"connected to {alias}: the host must not be touched")


def test_no_safety_backup_on_production_needs_its_own_confirmation(tmp_path, monkeypatch):
    import io

    from deploy.cli import Runtime
    from deploy.cli import backup as cli_backup
    from deploy.core.console import Console

    s, path = signed_set(tmp_path)
    monkeypatch.setattr(cli_backup, "BACKUP_ROOT", path.parent.parent)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: nobody to ask
    runtime = Runtime(s, Console(out=io.StringIO(), err=io.StringIO()), connector=no_connection)
    with pytest.raises(UsageError, match="--no-safety-backup on production 'sandbox' needs its own confirmation") as e:
        cli_backup.run_restore(runtime, path.name, None, None, yes=True, safety_backup=False)
    assert e.value.exit_code == 2 and e.value.hint == "rerun with --yes-really"
    out = io.StringIO()
    runtime = Runtime(s, Console(out=out, err=io.StringIO()), connector=no_connection)
    assert cli_backup.run_restore(runtime, path.name, None, None, yes=True, safety_backup=False, yes_really=True,
                                  dry_run=True) == 0
    assert "NO safety backup (confirmed)" in out.getvalue() and "postgres.dump -> health_mgmt__hd_new_" in out.getvalue()


def test_a_set_encrypted_to_another_key_is_refused_before_the_host_is_touched(tmp_path, monkeypatch):
    import io

    from deploy.backup.sealing import generate_identity
    from deploy.cli import Runtime
    from deploy.cli import backup as cli_backup
    from deploy.core.console import Console

    _, public = generate_identity()
    other_secret, _ = generate_identity()
    (tmp_path / "other.key").write_text(other_secret + "\n")
    s, path = signed_set(tmp_path, recipients=(public,))
    s = dataclasses.replace(s, backup_age_identity_file=str(tmp_path / "other.key"))
    monkeypatch.setattr(cli_backup, "BACKUP_ROOT", path.parent.parent)
    runtime = Runtime(s, Console(out=io.StringIO(), err=io.StringIO()), connector=no_connection)
    with pytest.raises(IntegrityError, match="cannot decrypt") as e:
        cli_backup.run_restore(runtime, path.name, None, None, yes=True)
    assert e.value.exit_code == 8
    # and a manifest changed after signing is refused before anything else of the set is read
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["artifacts"][0]["rows"] = {"public.x": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="signature is not valid"):
        cli_backup.run_restore(runtime, path.name, None, None, yes=True)


def test_sets_of_the_same_second_get_their_own_names(tmp_path):
    """Cells: `inv backup` takes every host one after the other; two sets finishing within one second once
    collided on the name (a traceback: Directory not empty) and the second host had no set."""
    from deploy.backup.run import publish_set

    names = []
    for host in ("node2", "node3", "node4"):
        partial = tmp_path / f".partial-20261204T192342Z-{host}"
        partial.mkdir()
        (partial / "manifest.json").write_text(host)
        names.append(publish_set(partial, tmp_path, "20261204T192342Z"))
    assert [p.name for p in names] == ["20261204T192342Z", "20261204T192342Z-2", "20261204T192342Z-3"]
    assert [(p / "manifest.json").read_text() for p in sorted(tmp_path.iterdir())] == ["node2", "node3", "node4"]
