"""The restore plan (pure): which stores, in which order, where each is loaded beside its live data, what is
compared, how it is switched and undone, which writers stop on which hosts, the safety backup, the checks
made before anything is touched, and the resources a restore or a drill needs. ``inv restore --dry-run``
prints it; the restore (backup/restore.py) runs exactly it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The order stores are loaded, checked and switched in (the undo runs the other way round).
STORE_ORDER = ("postgres", "influxdb", "mongodb", "minio")
PG_NAME_MAX = 63


@dataclass(frozen=True)
class StorePlan:
    service: str
    artifacts: tuple[str, ...]
    live: str  # the live database / bucket(s)
    staging: str  # where the set is loaded beside it
    previous: str  # where the live data is kept until the restore is done ("" when the switch keeps it)
    check: str
    switch: str
    undo: str
    tested: str = "integration"  # or "builder only" (no server of that engine runs here)


@dataclass(frozen=True)
class WriterStop:
    host: str
    services: tuple[str, ...]
    scaled: bool = False  # TARGET=swarm: scaled to 0 and back through this manager (a stopped task is replaced)


@dataclass(frozen=True)
class RestorePlan:
    set_name: str
    env: str
    data_host: str
    stamp: str
    stores: tuple[StorePlan, ...]
    writers: tuple[WriterStop, ...]
    lock_hosts: tuple[str, ...]
    safety_backup: bool
    safety_services: tuple[str, ...]
    checks: tuple[str, ...]
    signed_by: str = ""  # fingerprint of the verified signer; "" = unsigned (sandbox/staging only)
    apply_globals: bool = False
    buckets: tuple[str, ...] = ()
    need_disk_mb: int = 0
    need_memory_mb: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(s.service for s in self.stores)

    def store(self, service: str) -> StorePlan | None:
        return next((s for s in self.stores if s.service == service), None)

    def record(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"restore {self.set_name} onto {self.data_host} (env {self.env}), all or nothing:"]
        out.append("  before anything is touched:")
        out += [f"    - {c}" for c in self.checks]
        out.append(f"  locks: {', '.join(self.lock_hosts)}")
        for w in self.writers:
            if w.scaled:
                out.append(f"  scale writers to 0 through {w.host}: {', '.join(w.services)} (back to their replica "
                           "counts at the end, whatever happens)")
            else:
                out.append(f"  stop writers on {w.host}: {', '.join(w.services)} (started again at the end, whatever "
                           "happens)")
        if self.safety_backup:
            out.append(f"  safety backup after the writers stop: {', '.join(self.safety_services)} "
                       "(kind=safety, checksummed, restore drill before going on)")
        else:
            out.append("  NO safety backup (confirmed)")
        out.append(f"  resources needed on {self.data_host}: {self.need_disk_mb} MB free disk, "
                   f"{self.need_memory_mb} MB available memory")
        out.append("  1. load beside the live data and check:")
        for s in self.stores:
            out.append(f"     {s.service}: {', '.join(s.artifacts)} -> {s.staging}; check {s.check}"
                       + (f" [{s.tested}]" if s.tested != "integration" else ""))
            if s.previous:
                out.append(f"       live data kept as {s.previous} until the end")
        out.append("  2. switch every store (only when ALL loaded and checked):")
        for s in self.stores:
            out.append(f"     {s.service}: {s.switch}; undo: {s.undo}")
        if any(w.scaled for w in self.writers):
            out.append("  3. writers scaled back, their tasks healthy (the gateways follow them through Swarm's DNS); "
                       "then the previous copies and staging are dropped")
        else:
            out.append("  3. writers started, gateway re-pointed at their addresses, health checked; then the previous "
                       "copies and staging are dropped")
        if self.apply_globals:
            out.append("  roles (postgres-globals.sql) applied from the verified set before the load")
        elif any(s.service == "postgres" for s in self.stores):
            out.append("  roles (postgres-globals.sql) NOT applied: the set is not signed")
        return out


def pg_names(database: str, stamp: str) -> tuple[str, str]:
    """(staging, previous) database names beside ``database``."""
    def name(kind: str) -> str:
        suffix = f"__hd_{kind}_{stamp}"
        return database[: PG_NAME_MAX - len(suffix)] + suffix
    return name("new"), name("old")


def influx_names(database: str, stamp: str) -> tuple[str, str]:
    return f"{database}__hd_new_{stamp}", f"{database}__hd_prev_{stamp}"


def bucket_names(buckets: tuple[str, ...], stamp: str) -> dict[str, tuple[str, str]]:
    """{live bucket: (staging bucket, previous bucket)}: S3 names are 3-63 lowercase characters."""
    return {b: (f"hd-new-{stamp}-{i}", f"hd-prev-{stamp}-{i}") for i, b in enumerate(sorted(buckets))}


def is_staging_name(name: str) -> bool:
    return "__hd_new_" in name or "__hd_old_" in name or "__hd_prev_" in name or name.startswith(("hd-new-", "hd-prev-"))


def store_plans(services: tuple[str, ...], stamp: str, db_name: str, influx_db: str, influx_version: str,
                buckets: tuple[str, ...], artifacts: dict[str, tuple[str, ...]]) -> tuple[StorePlan, ...]:
    plans = []
    for service in STORE_ORDER:
        if service not in services:
            continue
        files = artifacts.get(service, ())
        if service == "postgres":
            new, old = pg_names(db_name, stamp)
            plans.append(StorePlan(service, files, db_name, new, old, "rows per table exactly as recorded in the set",
                                   f"one transaction: {db_name} -> {old}, {new} -> {db_name} (sessions ended first)",
                                   f"rename back ({db_name} -> {new}, {old} -> {db_name})"))
        elif service == "influxdb" and influx_version == "1":
            new, prev = influx_names(influx_db, stamp)
            plans.append(StorePlan(service, files, influx_db, new, prev,
                                   "points per retention policy, measurement and field up to the set's T0, series",
                                   f"{influx_db} recreated with the set's retention policies and continuous queries, "
                                   f"copied from {new} in bounded batches (measurement x time range), then checked again",
                                   f"{influx_db} recreated from {prev} the same way"))
        elif service == "influxdb":
            plans.append(StorePlan(service, files, influx_db, f"{influx_db}-restore-<time>", "",
                                   "restore exit status (no counts recorded for 2.x)",
                                   "live bucket deleted, the new one renamed to its name", "none after the rename",
                                   tested="builder only"))
        elif service == "mongodb":
            new, old = f"{db_name}__hd_new_{stamp}", f"{db_name}__hd_old_{stamp}"
            plans.append(StorePlan(service, files, db_name, new, old, "mongorestore exit status",
                                   f"collections renamed: {db_name}.* -> {old}.*, {new}.* -> {db_name}.*",
                                   "renamed back", tested="builder only"))
        elif service == "minio":
            names = bucket_names(buckets, stamp)
            plans.append(StorePlan(service, files, ", ".join(sorted(buckets)) or "(no bucket)",
                                   ", ".join(n for n, _ in names.values()) or "-",
                                   ", ".join(p for _, p in names.values()) or "-",
                                   "objects and bytes per bucket exactly as recorded",
                                   "objects copied server-side from staging into each live bucket, objects the set "
                                   "lacks removed, then checked again",
                                   "objects copied back from the previous buckets"))
    return tuple(plans)


def resource_needs(content_bytes: dict[str, int], services: tuple[str, ...], drill: bool = False) -> tuple[int, int]:
    """(disk MB, memory MB) a restore beside the live data (or a drill) needs on the data host.

    A restore holds the set loaded beside the live data plus a previous copy of InfluxDB and the objects
    (x2), a drill one copy; every engine's on-disk form is taken as twice its dump (indexes, WAL) with
    256 MB spare. Memory: a throwaway server per drilled engine (512 MB limit each), or 256 MB for a restore."""
    mb = sum(b for s, b in content_bytes.items() if s in services) / 1e6
    copies = 1 if drill else 2
    disk = int(mb * 2 * copies) + 256
    memory = 512 * len([s for s in services if s in ("postgres", "influxdb", "minio")]) if drill else 256
    return disk, memory


def resource_problems(need_disk_mb: int, need_memory_mb: int, docker_free_mb: int, deploy_free_mb: int,
                      mem_available_mb: int, docker_root: str, what: str) -> list[str]:
    problems = []
    if docker_free_mb and docker_free_mb < need_disk_mb:
        problems.append(f"{what} needs about {need_disk_mb} MB free under the Docker root {docker_root}, "
                        f"it has {docker_free_mb} MB")
    if deploy_free_mb and deploy_free_mb < 64:
        problems.append(f"the deploy path has only {deploy_free_mb} MB free")
    if mem_available_mb and mem_available_mb < need_memory_mb:
        problems.append(f"{what} needs about {need_memory_mb} MB of available memory, the host has {mem_available_mb} MB")
    return problems
