"""A model of one host for the recording executor: files, releases, images, containers, the gateway's upstream
files, the lock. It answers healthdeploy's commands by their ``intent`` (no shell parsing) and keeps just
enough state for a deploy, a rollback and their undo paths to behave as they would on a real host.

Used by tests/unit/test_apply.py; the real thing is tested through sshd in tests/integration/.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from dataclasses import dataclass, field

from deploy.commands.base import Command
from deploy.execute.executor import Result

OK = Result(0, b"", b"")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeContainer:
    id: str
    service: str
    release: str
    image: str
    ip: str
    env_digest: str = ""
    definition: str = ""
    state: str = "running"
    health: str = "healthy"
    created: int = 0

    def inspect(self, project: str) -> dict:
        return {"Id": self.id, "Name": f"/{project}-{self.service}-{self.id[:4]}",
                "Config": {"Labels": {"com.docker.compose.service": self.service,
                                      "healthdeploy.env-digest": self.env_digest,
                                      "healthdeploy.definition": self.definition},
                           "Image": f"img/{self.service}:{self.release}", "Env": [f"RELEASE_ID={self.release}"]},
                "State": {"Status": self.state, "Health": {"Status": self.health} if self.health else {}},
                "Image": self.image, "NetworkSettings": {"Networks": {f"{project}_default": {"IPAddress": self.ip}}},
                "Created": f"2026-01-01T00:00:{self.created:02d}Z", "RestartCount": 0, "HostConfig": {}}

    @property
    def name(self) -> str:
        return self.id


@dataclass
class World:
    """State of the fake host. ``deploy_path`` and ``project`` must match the target the test uses."""

    deploy_path: str
    project: str
    prefix: str
    files: dict[str, bytes] = field(default_factory=dict)  # absolute path -> content
    current: str = ""
    images: dict[str, str] = field(default_factory=dict)  # repo:tag -> id
    containers: list[FakeContainer] = field(default_factory=list)
    lock_held: bool = False
    lock_info: str = ""
    lock_last: str = ""  # the last holder's identity, as "$lock.last" (commands.lock)
    lock_previous: str = ""  # the holder's before it, as "$lock/previous"
    lock_takes: int = 0
    unhealthy_new: set[str] = field(default_factory=set)
    passwords: dict[str, str] = field(default_factory=dict)  # service -> env file its password was last set from
    journal: list[tuple[int, int, str, Command]] = field(default_factory=list)  # the undo journal in the lock  # services whose new containers come up unhealthy
    events: list[tuple] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def shared(self) -> str:
        return f"{self.deploy_path}/shared"

    def rel(self, release: str) -> str:
        return f"{self.deploy_path}/releases/{release}"

    def new_id(self) -> str:
        return f"c{next(self._ids):04d}" + "0" * 8

    def new_ip(self) -> str:
        return f"172.18.0.{next(self._ids) % 250 + 2}"

    def releases(self) -> list[str]:
        out = set()
        for path in self.files:
            if path.startswith(f"{self.deploy_path}/releases/"):
                out.add(path[len(self.deploy_path) + len("/releases/"):].split("/")[0])
        return sorted(r for r in out if not r.endswith(".partial"))

    def under(self, directory: str) -> dict[str, bytes]:
        prefix = directory.rstrip("/") + "/"
        return {p[len(prefix):]: d for p, d in self.files.items() if p.startswith(prefix)}

    def running(self, service: str) -> list[FakeContainer]:
        return [c for c in self.containers if c.service == service and c.state == "running"]

    def release_env(self, release: str) -> dict[str, str]:
        text = self.files.get(f"{self.rel(release)}/release.env", b"").decode()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    # -- the observation ------------------------------------------------------------------------------
    def observation(self) -> str:
        out = ["=== host", "docker=20.10.24", "compose=2.40.3", "free_mb=50000", f"current={self.current}",
               f"releases={' '.join(self.releases())}", "bash=/bin/bash", "user=root", "boot_id=b1", "mem_free_mb=8000"]
        out += ["=== lock", "held" if self.lock_held else "free", self.lock_info, "=== lock-last", self.lock_last]
        out.append("=== live-files")
        if self.current:
            out += [f"{sha(d)}  {p}" for p, d in sorted(self.under(self.rel(self.current)).items())]
        out.append("=== release-env")
        if self.current:
            out += [f"{k}={v}" for k, v in self.release_env(self.current).items()]
        out.append("=== secrets-env")
        out += [f"{sha(d)}  env/{p}" for p, d in sorted(self.under(f"{self.shared}/env").items()) if "/" not in p]
        out.append("=== secrets-tls")
        out += [f"{sha(d)}  tls/{p}" for p, d in sorted(self.under(f"{self.shared}/gateway/tls").items())]
        versions = sorted({p.split("/")[0] for p in self.under(f"{self.shared}/env/.versions")})
        out += ["=== secret-versions", *versions]
        out.append("=== secret-version-files")
        out += [f"{sha(d)}  {p}" for p, d in sorted(self.under(f"{self.shared}/env/.versions").items())]
        out.append("=== releases-meta")
        for release in self.releases():
            out.append(f"--- {release}")
            out += [f"{k}={v}" for k, v in self.release_env(release).items()]
            for p, d in sorted(self.under(self.rel(release)).items()):
                if (p.startswith("env/") and p.endswith(".env")) or p == "gateway/nginx.conf":
                    out.append(f"# {sha(d)}  {p}")
        out.append("=== gateway-conf")
        conf = self.files.get(f"{self.shared}/gateway/nginx.conf")
        if conf is not None:
            out.append(f"{sha(conf)}  nginx.conf")
        out.append("=== upstreams")
        out += [d.decode() for p, d in sorted(self.under(f"{self.shared}/gateway/upstreams").items())]
        out += ["=== state", self.files.get(f"{self.shared}/state.json", b"").decode()]
        out.append("=== images")
        out += [f"{ref} {iid}" for ref, iid in sorted(self.images.items())]
        out += ["=== containers", json.dumps([c.inspect(self.project) for c in self.containers])]
        return "\n".join(out) + "\n"

    # -- answering commands ---------------------------------------------------------------------------
    def answer(self, command: Command) -> Result:
        intent = command.intent or ("?",)
        kind, args = intent[0], intent[1:]
        self.events.append(intent)
        handler = getattr(self, "on_" + kind.replace("-", "_"), None)
        if handler is None:
            return OK
        result = handler(command, *args)
        return result if isinstance(result, Result) else OK

    def text(self, text: str) -> Result:
        return Result(0, text.encode(), b"")

    def on_observe(self, command):
        return self.text(self.observation())

    def on_containers(self, command):
        return self.text(json.dumps([c.inspect(self.project) for c in self.containers]))

    def on_inspect(self, command, *ids):
        return self.text(json.dumps([c.inspect(self.project) for c in self.containers if c.id in ids]))

    def on_lock_status(self, command):
        return self.text(("held" if self.lock_held else "free") + "\n" + self.lock_info)

    def on_write(self, command, path):
        self.files[path] = command.stdin or b""

    def on_upstream(self, command, service, addresses, backups):
        self.files[f"{self.shared}/gateway/upstreams/{service}.conf"] = command.stdin or b""

    def on_append(self, command, path):
        self.files[path] = self.files.get(path, b"") + (command.stdin or b"")

    def on_new_release(self, command, target):
        previous = self.rel(self.current) if self.current else None
        for path, data in (self.under(previous).items() if previous else []):
            if path != "MANIFEST":
                self.files[f"{target}/{path}"] = data

    def on_rmtree(self, command, path):
        for p in [p for p in self.files if p == path or p.startswith(path.rstrip("/") + "/")]:
            del self.files[p]

    def on_remove(self, command, directory, *names):
        for name in names:
            self.files.pop(f"{directory}/{name}", None)

    def on_switch(self, command, target):
        self.current = target.split("/", 1)[1]

    def on_image_ids(self, command, *refs):
        return self.text("".join(f"{r} {self.images.get(r, '-')}\n" for r in refs))

    def on_build(self, command, *services):
        release = self._release_of(command)
        for service in services:
            content = self.files.get(f"{self.rel(release)}/src/{service}/build_id", b"") + self.files.get(
                f"{self.rel(release)}/src/app.py", b"")
            self.images[f"{self.prefix}/{service}:{release}"] = "sha256:" + sha(service.encode() + content)[:20]

    def on_ship(self, command, registry, *words):
        """Images built off the host arrive by digest and get their release tags."""
        for image_id, _repository, _digest, tag in zip(words[0::4], words[1::4], words[2::4], words[3::4]):
            self.images[tag] = image_id
        return self.text("".join(f"HEALTHDEPLOY-SHIPPED {t}\n" for t in words[3::4]))

    def on_rmi(self, command, *refs):
        """``docker image rm TAG...`` ignoring errors: a tag goes unless it is an image's last and a container uses it."""
        for ref in refs:
            image_id = self.images.get(ref)
            if image_id is None:
                continue
            others = [r for r, i in self.images.items() if i == image_id and r != ref]
            if others or not any(c.image == image_id for c in self.containers):
                del self.images[ref]

    def on_unship(self, command, count, *words):
        """The release tags go as with ``on_rmi``; this fake keeps no pull references to forget."""
        self.on_rmi(command, *words[:int(count)])

    def on_tag(self, command, *words):
        for source, target in zip(words[0::2], words[1::2]):
            self.images[target] = self.images[source]

    def _release_of(self, command: Command) -> str:
        text = command.render()
        marker = f"{self.deploy_path}/releases/"
        return text[text.index(marker) + len(marker):].split("/")[0]

    def _env_of(self, command: Command) -> dict[str, str]:
        words = command.render().split()
        env = {}
        if words and words[0] == "env":
            for word in words[1:]:
                if "=" not in word:
                    break
                k, v = word.split("=", 1)
                env[k] = v
        return env

    def _definition(self, release: str, service: str) -> str:
        return self.release_env(release).get("DEFINITION_" + service.upper().replace("-", "_"), "")

    def on_start(self, command, *services):
        release = self._release_of(command)
        for service in services:
            stopped = [c for c in self.containers if c.service == service]
            if stopped:
                for c in stopped:
                    c.state = "running"
                continue
            self.containers.append(FakeContainer(self.new_id(), service, release, f"sha256:{service}-image",
                                                 self.new_ip(), definition=self._definition(release, service)))

    def on_recreate(self, command, service):
        release = self._release_of(command)
        self.containers = [c for c in self.containers if c.service != service]
        self.containers.append(FakeContainer(self.new_id(), service, release, f"sha256:{service}-image", self.new_ip(),
                                             definition=self._definition(release, service)))

    def on_scale(self, command, service, count):
        release = self._release_of(command)
        env = self._env_of(command)
        digest = env.get("ENV_DIGEST_" + service.upper().replace("-", "_"), "")
        have = [c for c in self.containers if c.service == service]
        for c in have:  # as Compose does: stopped containers count toward the scale and are started again
            c.state = "running"
        for _ in range(count - len(have)):
            self.containers.append(FakeContainer(
                self.new_id(), service, release, self.images.get(f"{self.prefix}/{service}:{release}", "sha256:none"),
                self.new_ip(), env_digest=digest, definition=self._definition(release, service),
                health="unhealthy" if service in self.unhealthy_new else "healthy", created=len(self.containers)))

    def on_rm(self, command, *ids):
        self.containers = [c for c in self.containers if c.id not in ids and f"{self.project}-{c.service}-{c.id[:4]}" not in ids]

    def on_stop(self, command, *ids):
        for c in self.containers:
            if c.id in ids:
                c.state = "exited"

    def on_restart(self, command, *ids):
        for c in self.containers:
            if c.id in ids:
                c.state, c.health = "running", "healthy"

    def on_probes(self, command, *urls):
        ips = {c.ip for c in self.containers if c.state == "running" and c.health == "healthy"}
        return self.text("".join(f"{'ok' if u.split('/')[2].split(':')[0] in ips else 'fail'} {u}\n" for u in urls))

    def on_probe(self, command, url):
        return OK

    def on_hashes(self, command, directory, *names):
        files = self.under(directory)
        if names:
            files = {n: files[n] for n in names if n in files}
        return self.text("".join(f"{sha(d)}  {p}\n" for p, d in sorted(files.items())))

    def on_install_secrets(self, command, version):
        staged = self.under(f"{self.shared}/env/.versions/{version}")
        for path, data in staged.items():
            if path.startswith("env/"):
                self.files[f"{self.shared}/{path}"] = data
                service = path[4:-4]
                self.files[f"{self.shared}/env/run/{service}/secrets.env"] = data
            elif path.startswith("tls/"):
                self.files[f"{self.shared}/gateway/{path}"] = data
        self.files[f"{self.shared}/env/.version"] = version.encode()

    def on_install_conf(self, command, source, target):
        self.files[target] = self.files[source]

    def on_snapshot_secrets(self, command, version):
        for path, data in list(self.under(f"{self.shared}/env").items()):
            if "/" not in path:
                self.files[f"{self.shared}/env/.versions/{version}/env/{path}"] = data

    def on_state(self, command, release, secrets):
        self.files[f"{self.shared}/state.json"] = command.stdin or b""

    def on_rotate(self, command, service, env_file):
        self.passwords[service] = env_file

    def on_journal_add(self, command, phase, seq, description, undo):
        self.journal.append((phase, seq, description, undo))

    def on_journal_clear(self, command):
        self.journal.clear()

    def on_journal_run(self, command):
        return self.text(self.run_journal())

    def run_journal(self) -> str:
        lines = []
        for phase in (0, 1, 2):
            for _, _, description, undo in sorted((e for e in self.journal if e[0] == phase), key=lambda e: -e[1]):
                result = self.answer(undo)
                lines.append(f"undone {description}" if result.ok else f"failed {description}: {result.err}")
        self.journal.clear()
        return "\n".join(lines) + "\n"

    def client_vanished(self) -> None:
        """What the lock's holder does when our process dies or the connection drops: run the journal."""
        if self.journal:
            self.run_journal()
        self.lock_held = False

    def on_roll_back(self, command, name, old, new):
        service = next(c.service for c in self.containers if c.id in old)
        for c in self.containers:
            if c.id in old:
                c.state, c.health = "running", "healthy"
        self.containers = [c for c in self.containers if c.id not in new]
        ips = [c.ip for c in self.containers if c.id in old]
        servers = "".join(f"    server {ip}:1 max_fails=0;\n" for ip in ips)
        self.files[f"{self.shared}/gateway/upstreams/{service}.conf"] = f"upstream {name} {{\n{servers}}}\n".encode()

    def on_connections(self, command, *names):
        return self.text("".join(f"=== {n}\n" for n in names))

    # -- streams and the lock -------------------------------------------------------------------------
    def receive(self, command: Command, data: bytes) -> Result:
        kind = (command.intent or ("?",))[0]
        self.events.append(command.intent)
        if kind == "extract":
            self._untar(data, command.intent[1])
        elif kind == "stage-secrets":
            self._untar(data, f"{self.shared}/env/.versions/{command.intent[1]}")
        return OK

    def _untar(self, data: bytes, directory: str) -> None:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                self.files[f"{directory}/{member.name}"] = tar.extractfile(member).read()

    def send(self, command: Command):
        return b"", ""

    def hold(self, command: Command):
        self.events.append(("lock-hold",))
        if self.lock_held:
            return "held", self.lock_info
        self.lock_held = True
        self.lock_takes += 1
        self.lock_previous, self.lock_last = self.lock_last, f"{1000 + self.lock_takes} boot-1 {self.lock_takes}"
        return "acquired", ""

    def on_lock_info(self, command):
        self.lock_info = (command.stdin or b"").decode()
        return self.text(self.lock_previous + "\n")

    def drop_holder(self, command: Command) -> None:
        self.events.append(("lock-dropped",))

    def on_lock_release(self, command):
        self.lock_held = False
        self.lock_info = ""


# -- the data stores, for the restore orchestration (tests/unit/test_restore.py) -----------------------------
def _influx_lines(counts: dict) -> str:
    """What influx_counts prints for a database modelled as {"points": {m: {f: n}}, "series": {m: n}}."""
    rps = {"results": [{"series": [{"columns": ["name", "duration", "shardGroupDuration", "replicaN", "default"],
                                    "values": [["autogen", "0s", "168h0m0s", 1, True]]}]}]}
    points = {"results": [{"series": [{"name": m, "columns": ["time", *[f"count_{f}" for f in fields]],
                                       "values": [["1970-01-01T00:00:00Z", *fields.values()]]}
                                      for m, fields in sorted(counts.get("points", {}).items())]}]}
    series = {"results": [{"series": [{"name": m, "columns": ["count"], "values": [[n]]}
                                      for m, n in sorted(counts.get("series", {}).items())]}]}
    return (f"HEALTHDEPLOY-INFLUX-RPS {json.dumps(rps)}\nHEALTHDEPLOY-INFLUX-CQS {json.dumps({'results': [{}]})}\n"
            f"HEALTHDEPLOY-INFLUX-RP autogen {json.dumps(points)}\nHEALTHDEPLOY-INFLUX {json.dumps(series)}\n")


@dataclass
class RestoreWorld(World):
    """A data host: PostgreSQL databases (table -> rows), InfluxDB databases (points and series), the guard."""

    pg: dict[str, dict[str, int]] = field(default_factory=dict)
    influx: dict[str, dict] = field(default_factory=dict)
    set_rows: dict[str, int] = field(default_factory=dict)  # what loading the set's dump yields
    set_influx: dict = field(default_factory=dict)
    guards: int = 0

    def hold(self, command: Command):
        if command.intent and command.intent[0] == "guard-hold":
            self.guards += 1
            return "acquired", ""
        return super().hold(command)

    def on_start_ids(self, command, *ids):
        for c in self.containers:
            if c.id in ids:
                c.state = "running"

    def on_resources(self, command, path):
        return self.text("docker_root=/var/lib/docker\ndocker_free_mb=50000\ndeploy_free_mb=50000\nmem_available_mb=8000\n")

    def on_pg_create(self, command, db):
        self.pg[db] = {}

    def on_pg_drop(self, command, *dbs):
        for db in dbs:
            self.pg.pop(db, None)

    def on_pg_rows(self, command, db):
        return self.text("".join(f"HEALTHDEPLOY-ROWS {t} {n}\n" for t, n in sorted(self.pg.get(db, {}).items())))

    def on_pg_switch(self, command, live, old, new):
        if new in self.pg:
            if live in self.pg:
                self.pg[old] = self.pg.pop(live)
            self.pg[live] = self.pg.pop(new)

    def on_pg_unswitch(self, command, live, old, new):
        if old in self.pg:
            if live in self.pg:
                self.pg[new] = self.pg.pop(live)
            self.pg[live] = self.pg.pop(old)

    def on_influx_counts(self, command, db, t0):
        if db not in self.influx:
            return Result(1, b"", b"influx: database not found")
        return Result(0, b"", _influx_lines(self.influx[db]).encode())

    def on_influx_query(self, command, db, query):
        if query == "SHOW MEASUREMENTS":
            names = sorted(self.influx.get(db, {}).get("points", {}))
            return self.text(json.dumps({"results": [{"series": [{"name": "measurements", "columns": ["name"],
                                                                  "values": [[n] for n in names]}]}]}))
        if query == "SHOW SHARDS":
            rows = [[i, name, "autogen", i, "2023-11-13T00:00:00Z", "2023-11-14T00:00:00Z", "", ""]
                    for i, name in enumerate(sorted(self.influx))]
            return self.text(json.dumps({"results": [{"series": [{"name": name, "columns": [
                "id", "database", "retention_policy", "shard_group", "start_time", "end_time", "expiry_time",
                "owners"], "values": [r for r in rows if r[1] == name]} for name in sorted(self.influx)]}]}))
        return self.text('{"results": [{}]}')

    def on_influx_exec(self, command, description, statements):
        import re

        for _db, statement in statements:
            words = statement.split()
            if statement.startswith("DROP DATABASE"):
                self.influx.pop(json.loads(words[2]), None)
            elif statement.startswith("CREATE DATABASE"):
                self.influx[json.loads(words[2])] = {"points": {}, "series": {}}
            elif statement.startswith("SELECT * INTO"):
                m = re.search(r'INTO "([^"]+)"\."[^"]+"\."([^"]+)" FROM "([^"]+)"', statement)
                dst, measurement, src = m.group(1), m.group(2), m.group(3)
                self.influx[dst]["points"][measurement] = dict(self.influx[src]["points"].get(measurement, {}))
                if measurement in self.influx[src]["series"]:
                    self.influx[dst]["series"][measurement] = self.influx[src]["series"][measurement]

    def receive(self, command: Command, data: bytes) -> Result:
        kind = (command.intent or ("?",))[0]
        self.events.append(command.intent)
        if kind == "pg-load":
            self.pg[command.intent[1]] = dict(self.set_rows)
        elif kind == "influx-stage":
            self.influx[command.intent[2]] = json.loads(json.dumps(self.set_influx))
        return super().receive(command, data) if kind not in ("pg-load", "influx-stage") else OK
