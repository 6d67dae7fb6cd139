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
    assert "influx restore" in restore and "--full" in restore and "--token" not in restore


def test_influx1_restore_goes_through_a_temporary_database_and_checks_bodies():
    text = rendered(bk.influx_restore("influx", "1", "health_data"))
    assert "influxd restore -portable" in text and "-newdb" in text
    assert "SELECT * INTO" in text and '"error"' in text
    assert text.endswith(" sh health_data")


def test_row_parser():
    assert bk.parse_rows("HEALTHDEPLOY-ROWS public.patients 12\nnoise\nHEALTHDEPLOY-ROWS public.x 0\n") == {
        "public.patients": 12, "public.x": 0}
