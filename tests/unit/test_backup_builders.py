"""Backup/restore command builders, including the engines no server runs for here (MongoDB, InfluxDB 2):
the right tool and flags, credentials taken from the container's environment, never on a command line."""

from deploy.commands import backup as bk


def rendered(command) -> str:
    return command.render()


def test_postgres_dump_runs_in_an_exported_snapshot_and_counts_rows():
    text = rendered(bk.postgres_dump("prod-postgres-1"))
    assert text.startswith("docker exec -i prod-postgres-1 bash -c ")
    assert "pg_export_snapshot()" in text and 'pg_dump -Fc --snapshot="$snapshot"' in text
    assert "gexec" in text and "HEALTHDEPLOY-ROWS" in text
    assert bk.postgres_dump("x").readonly


def test_postgres_restore_is_clean_if_exists_in_one_transaction():
    assert "pg_restore --clean --if-exists --single-transaction --exit-on-error" in rendered(bk.postgres_restore("pg"))
    globals_ = rendered(bk.postgres_restore_globals("pg"))
    assert "ALTER ROLE" in globals_ and "$POSTGRES_PASSWORD" in globals_ and "-v pw=" not in globals_


def test_mongo_dump_and_restore_keep_the_password_off_the_command_line():
    dump = rendered(bk.mongo_dump("prod-mongodb-1"))
    assert "mongodump --quiet --archive --gzip --config" in dump
    assert "--authenticationDatabase admin" in dump and "-p " not in dump and "--password" not in dump
    assert "printf 'password:" in bk.MONGO_DUMP and "umask 077" in bk.MONGO_DUMP  # builtin, into a 0600 file
    restore = rendered(bk.mongo_restore("prod-mongodb-1"))
    assert "mongorestore --quiet --archive --gzip --drop --config" in restore


def test_influx2_backup_and_restore_use_the_token_from_the_environment():
    backup = rendered(bk.influx_backup("prod-influxdb-1", "2", "health_data"))
    assert 'INFLUX_TOKEN="$DOCKER_INFLUXDB_INIT_ADMIN_TOKEN" influx backup' in backup
    assert "--token" not in backup
    restore = rendered(bk.influx_restore("prod-influxdb-1", "2", "health_data"))
    assert "--token" not in restore and "--full" not in restore and restore.endswith(" sh health_data")
    # into a new bucket first; the live one is deleted only after that worked, then the new one renamed
    text = bk.INFLUX2_RESTORE
    assert text.index('--new-bucket "$tmp"') < text.index("bucket delete") < text.index('bucket update --id "$new_id" --name "$1"')
    assert text.startswith("set -e")


def test_influx1_restore_is_staged_under_a_new_name_and_dropped_on_any_failure():
    import pytest

    text = rendered(bk.influx_stage("influx", "health_data", "health_data__hd_new_1"))
    assert "influxd restore -portable" in text and '-db "$1" -newdb "$2"' in text and '"error"' in text
    assert text.endswith(" sh health_data health_data__hd_new_1")
    stage = bk.INFLUX1_STAGE
    # the EXIT trap drops the new database when anything failed; TERM/INT/HUP end through it
    assert "trap cleanup EXIT" in stage and "trap 'exit 143' TERM INT HUP" in stage
    assert 'DROP DATABASE \\"$2\\"' in stage and stage.index("trap cleanup EXIT") < stage.index("influxd restore")
    with pytest.raises(ValueError, match="beside the live database"):
        bk.influx_restore("influx", "1", "health_data")


def test_row_parser():
    assert bk.parse_rows("HEALTHDEPLOY-ROWS public.patients 12\nnoise\nHEALTHDEPLOY-ROWS public.x 0\n") == {
        "public.patients": 12, "public.x": 0}


def test_influx1_backup_records_points_and_series_up_to_a_cutoff_first():
    text = rendered(bk.influx_backup("influx", "1", "health_data"))
    assert text.index("HEALTHDEPLOY-T0") < text.index('influx_counts "$1" "$t0"') < text.index("influxd backup -portable")
    assert "WHERE time <= '$2'" in bk.INFLUX1_BACKUP and "SHOW SERIES EXACT CARDINALITY" in text


def test_influx_count_parser_skips_fields_a_measurement_lacks():
    import json

    counts = {"results": [{"statement_id": 0, "series": [
        {"name": "bp", "columns": ["time", "count_bpm", "count_sys"], "values": [["1970-01-01T00:00:00Z", None, 2]]},
        {"name": "hr", "columns": ["time", "count_bpm", "count_sys"], "values": [["1970-01-01T00:00:00Z", 7, None]]}]}]}
    series = {"results": [{"statement_id": 0, "series": [{"name": "bp", "columns": ["count"], "values": [[2]]}]}]}
    text = (f"noise\nHEALTHDEPLOY-T0 2026-11-28T10:00:00Z\nHEALTHDEPLOY-INFLUX {json.dumps(counts)}\n"
            f"HEALTHDEPLOY-INFLUX {json.dumps(series)}\n")
    assert bk.parse_influx_counts(text) == {"t0": "2026-11-28T10:00:00Z", "points": {"bp": {"sys": 2}, "hr": {"bpm": 7}},
                                            "series": {"bp": 2}}


def test_influx_counts_per_retention_policy_and_continuous_queries():
    import json

    rps = {"results": [{"series": [{"columns": ["name", "duration", "shardGroupDuration", "replicaN", "default"],
                                    "values": [["autogen", "0s", "168h0m0s", 1, True],
                                               ["weekly", "87360h0m0s", "168h0m0s", 1, False]]}]}]}
    cqs = {"results": [{"series": [{"name": "health_data", "columns": ["name", "query"],
                                    "values": [["cq1", "CREATE CONTINUOUS QUERY cq1 ON health_data BEGIN x END"]]},
                                   {"name": "other", "columns": ["name", "query"], "values": [["c", "q"]]}]}]}
    auto = {"results": [{"series": [{"name": "bp", "columns": ["time", "count_sys"], "values": [["0", 2]]}]}]}
    weekly = {"results": [{"series": [{"name": "bp_mean", "columns": ["time", "count_mean"], "values": [["0", 1]]}]}]}
    text = (f"HEALTHDEPLOY-T0 T\nHEALTHDEPLOY-INFLUX-RPS {json.dumps(rps)}\nHEALTHDEPLOY-INFLUX-CQS {json.dumps(cqs)}\n"
            f"HEALTHDEPLOY-INFLUX-RP autogen {json.dumps(auto)}\nHEALTHDEPLOY-INFLUX-RP weekly {json.dumps(weekly)}\n")
    counts = bk.parse_influx_counts(text, "health_data")
    assert counts["points"] == {"bp": {"sys": 2}} and counts["rp_points"] == {"weekly": {"bp_mean": {"mean": 1}}}
    assert [r["name"] for r in counts["retention_policies"]] == ["autogen", "weekly"]
    assert counts["continuous_queries"] == [{"database": "health_data", "name": "cq1",
                                             "query": "CREATE CONTINUOUS QUERY cq1 ON health_data BEGIN x END"}]


def test_influx1_restores_wait_until_the_restored_shards_are_enabled():
    # every retention policy, two clean rounds in a row; each query also retries "shard is disabled"
    assert "shard is disabled" in bk.INFLUX1_HTTP and 'while [ "$ok" -lt 2 ]' in bk.INFLUX1_WAIT_SHARDS
    assert 'for rp in $(influx_rps "$1")' in bk.INFLUX1_WAIT_SHARDS
    drill = rendered(bk.influx_drill_restore("drill", "health_data"))
    assert '-db "$1" -newdb "$2"' in drill and 'wait_shards "$2"' in drill and drill.endswith(" health_data healthdeploy_drill")


def test_drill_containers_take_credentials_from_the_env_file_not_argv():
    from deploy.commands import docker as dk

    text = dk.run_throwaway("hd-verify-x-minio", "minio/minio:RELEASE", "server", "/data", publish=9000,
                            tmpfs=("/tmp",), env_files=("/srv/hd/current/env/minio.env", "/srv/hd/shared/env/minio.env"),
                            description="d").render()
    assert text.startswith("bash -c ")
    assert "--env-file \"$f\"" in text and "umask 077" in text and "rm -f \"$f\"" in text  # unquoted 0600 copy
    assert ("bash 2 /srv/hd/current/env/minio.env /srv/hd/shared/env/minio.env -d --rm --name hd-verify-x-minio "
            "--label healthdeploy.role=drill") in text  # both halves of the env file, never a value on argv
    assert "-p 127.0.0.1::9000" in text and text.endswith("minio/minio:RELEASE server /data")
    plain = dk.run_throwaway("n", "img", network="none", environment=("A=1",), description="d").render()
    assert plain == "docker run -d --rm --name n --label healthdeploy.role=drill --network none -e A=1 img"


def test_published_port_parser_prefers_loopback():
    from deploy.facts.ports import parse_published_port

    assert parse_published_port("127.0.0.1:32768\n") == ("127.0.0.1", 32768)
    assert parse_published_port("0.0.0.0:9000\n[::]:9000\n") == ("127.0.0.1", 9000)
    assert parse_published_port("[::]:9000\n") == ("::1", 9000)
    assert parse_published_port("Error: No public port '9000/tcp' published\n") is None


def test_sealing_skips_zstd_for_what_the_engine_compresses():
    from deploy.backup.run import artifacts_for, sealing_for
    from deploy.core.settings import load_settings

    s = load_settings("sandbox")
    import dataclasses

    s = dataclasses.replace(s, backup_compression="zstd", backup_age_recipients=())
    suffixes = {a.file: sealing_for(s, a).suffix() for service in ("postgres", "influxdb", "minio", "redis")
                for a in artifacts_for(s, service, "c")}
    assert suffixes == {"postgres.dump": "", "postgres-globals.sql": ".zst", "influxdb.tar": "", "minio.tar": ".zst",
                        "redis.rdb": ".zst"}


def test_an_encrypted_set_needs_the_identity_before_anything_runs():
    import dataclasses

    import pytest

    from deploy.backup.run import artifact_record, restore_services as restore_plan
    from deploy.core.errors import UsageError
    from deploy.core.settings import load_settings

    s = load_settings("sandbox")
    manifest = {"artifacts": [
        {"service": "postgres", "artifact": "postgres.dump", "file": "postgres.dump.age",
         "sealing": {"compression": None, "encryption": {"scheme": "age", "recipients": ["age1x"]}}},
        {"service": "redis", "file": "redis.rdb"}]}  # format 1 record: no "artifact", no sealing
    with pytest.raises(UsageError, match="postgres.dump.age is encrypted with age and BACKUP_AGE_IDENTITY_FILE"):
        restore_plan(s, manifest, None)
    with pytest.raises(UsageError, match="restoring redis is not supported"):
        restore_plan(dataclasses.replace(s, backup_age_identity_file="/nonexistent"), manifest, ("redis",))
    with pytest.raises(UsageError, match="mongodb is disabled"):
        restore_plan(s, {"artifacts": [{"service": "mongodb", "file": "m"}]}, ("mongodb",))
    assert artifact_record(manifest, "redis.rdb")["file"] == "redis.rdb"
    assert artifact_record(manifest, "postgres.dump")["file"] == "postgres.dump.age"


def test_an_empty_influx_database_restores_as_an_empty_database():
    # `influxd restore` refuses a backup without shard files; both restores recreate the database instead.
    stage = bk.INFLUX1_STAGE
    assert stage.index('ls "$d"/*.tar.gz') < stage.index("influxd restore -portable")
    assert 'CREATE DATABASE \\"$2\\"' in stage


def test_influx_counts_fail_loudly_when_a_query_fails():
    import pytest

    from deploy.core.errors import IntegrityError

    assert 'the query failed" >&2; return 1' in bk.INFLUX1_COUNTS  # not an empty line parsed later
    with pytest.raises(IntegrityError, match="not JSON"):
        bk.parse_influx_counts("HEALTHDEPLOY-INFLUX \n")
