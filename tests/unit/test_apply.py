"""Orchestration without sshd: the pure planner and the apply engine against a model of a host (tests/fakes.py)
through the recording executor.

- plan == apply: for every scenario, what the dry run prints (the plan's steps) is exactly what apply runs,
  conditional steps resolved by what the build produced;
- every undo path: a failure (a command error, a lost connection, Ctrl-C) at ANY command of a deploy leaves
  the host serving the old release completely, with the old secrets and the old containers.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from deploy.core.console import Console
from deploy.core.errors import HealthdeployError
from deploy.core.settings import PROJECT_ROOT, load_settings
from deploy.execute.apply import DeployApply
from deploy.execute.executor import ConnectionLost, Interrupted
from deploy.execute.recording import RecordingHost
from deploy.execute.session import Session
from deploy.plan.deploy import plan_deploy
from deploy.plan.desired import desired_for
from deploy.plan.steps import StepKind
from deploy.stack import payload as pl
from deploy.stack.render import Target, image_prefix
from fakes import World

APP = PROJECT_ROOT / "deploy" / "sandbox" / "app"


class Killed(BaseException):
    """Our process dies at this command (SIGKILL): nothing local runs after it."""
FAST = {"HOSTS": "h1", "DRAIN_SECONDS": "0", "DRAIN_LIMIT": "0", "HEALTH_TIMEOUT": "5"}


class Host:
    """One fake host, deployed to again and again like a real one."""

    def __init__(self, tmp_path: Path, **overrides):
        self.app = tmp_path / "app"
        shutil.copytree(APP, self.app, ignore=shutil.ignore_patterns("__pycache__"))
        self.overrides = {**FAST, "APP_SOURCE": str(self.app), **overrides}
        self.n = 0
        s = self.settings()
        self.target = Target.of(s, "h1", "10.0.0.1")
        self.world = World(self.target.deploy_path, self.target.project, image_prefix(s, self.target))

    def settings(self, **more):
        return load_settings("sandbox", overrides={**self.overrides, **more})

    def plan(self, fail_at=None, fail_when=None, error=None, **more):
        self.n += 1
        s = self.settings(**more)
        self.host = RecordingHost(self.world, fail_at=fail_at, fail_when=fail_when, error=error)
        self.session = Session(self.host, s, Target.of(s, "h1", "10.0.0.1"), Console(out=io.StringIO(), err=io.StringIO()))
        release = f"2026010{self.n}T000000Z-r{self.n}"
        source = pl.collect_source(str(self.app))
        key = (release, tuple(sorted(more.items())), tuple(sorted((p, pl.sha256(d)) for p, d in source.items())))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:  # rendering is the slow part; the failure-injection loop plans the same deploy often
            cache[key] = desired_for(s, self.session.t, source, release, True)
        self.desired, self.payload = cache[key]
        self.observed = self.session.observe()
        return plan_deploy(self.desired, self.observed)

    def apply(self, plan, killed_at: int | None = None):
        """Run the plan as the CLI does: on any error undo, then release the lock (the host's lock holder runs
        whatever the journal still holds: the undo could not reach the host, or we were "killed")."""
        self.apply_ = DeployApply(self.session, plan, self.desired, self.payload, self.observed)
        try:
            report = self.apply_.run(plan.steps)
            self.apply_.commit()
        except Killed:
            self.world.client_vanished()  # no local undo at all: only the host's holder acts
            raise
        except BaseException:
            try:
                self.apply_.abort()
            finally:
                self.world.client_vanished()
            raise
        self.world.client_vanished()
        return report

    def deploy(self, **more):
        plan = self.plan(**more)
        return plan, self.apply(plan)

    def snapshot(self):
        """What serves: the live release, each service's running containers (id, image), the installed secrets."""
        w = self.world
        running = sorted((c.service, c.id, c.image, c.env_digest) for c in w.containers if c.state == "running")
        secrets = {p: d for p, d in w.files.items() if p.startswith(f"{w.shared}/env/") and ".versions" not in p}
        from deploy.facts.upstreams import parse_upstreams

        upstreams = parse_upstreams("\n".join(d.decode() for p, d in sorted(w.files.items()) if "/upstreams/" in p))
        # The gateway sends each service's traffic to exactly its running containers.
        consistent = all(upstreams.get(s) == {c.ip for c in w.running(s)} for s in upstreams)
        return w.current, running, secrets, w.files.get(f"{w.shared}/gateway/nginx.conf"), consistent


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    h.deploy()  # a live first release, like every real host after its first deploy
    return h


def assert_plan_equals_apply(plan, report):
    """Every step the plan lists ran, in order, or (only a conditional one) was skipped with its reason."""
    done = report.applied.done
    assert [key for key, _ in done] == [s.key for s in plan.steps]
    for step, (_, outcome) in zip(plan.steps, done):
        assert outcome == "ran" or (step.condition and outcome.startswith("skipped: ")), (step, outcome)
    # each step that ran has its wall time (the deploy's JSON shows where the time goes); a skipped one has none
    assert sorted(report.step_seconds) == sorted(k for k, outcome in done if outcome == "ran")
    assert all(seconds >= 0 for seconds in report.step_seconds.values())


def kinds(plan):
    return [s.kind for s in plan.steps]


# -- plan == apply, scenario by scenario -----------------------------------------------------------------
def test_first_deploy(tmp_path):
    h = Host(tmp_path)
    plan, report = h.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.action == "deploy" and plan.migrates and set(plan.rolls) == {"backend", "ai-service", "frontend-web",
                                                                             "frontend-patient"}
    assert plan.step(StepKind.START).items == ("postgres", "redis", "influxdb", "emqx", "minio", "gateway")
    assert h.world.current == plan.release and report.migrated


def test_no_change_is_unchanged_and_runs_nothing(host):
    plan, report = host.deploy()
    assert plan.action == "unchanged" and plan.steps == ()
    assert [i[0] for i in host.host.intents()] == ["observe"]


def test_env_only_change_rolls_only_the_service_that_reads_it(host):
    plan, report = host.deploy(JWT_EXPIRES_IN="1d")
    assert_plan_equals_apply(plan, report)
    assert plan.action == "deploy" and ("env/backend.env", "changed") in plan.files
    assert plan.rolls == ("backend",) and "env changed" in plan.step(StepKind.ROLL, "backend").reason
    assert not plan.has(StepKind.BUILD) and plan.step(StepKind.TAG).items == (
        "backend", "ai-service", "frontend-web", "frontend-patient")
    assert not plan.migrates  # the backend image did not change


def test_source_change_builds_that_service_and_migrates(host):
    (host.app / "backend" / "build_id").write_text("backend-v2\n")
    plan, report = host.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.builds == ("backend",) and plan.rolls == ("backend",) and plan.migrates
    assert [o for k, o in report.applied.done if k == "roll:backend"] == ["ran"]


def test_nginx_t_runs_only_when_the_gateway_would_run_something_new(host, tmp_path):
    """The throwaway nginx -t container is the dearest command of a validate: it runs for new gateway files,
    certificates or image, and not when only an app changed (the live gateway config already passed it)."""
    def nginx_checks():
        return [i for i in host.host.intents() if i[0] == "nginx-check"]

    (host.app / "backend" / "build_id").write_text("backend-v2\n")
    plan, report = host.deploy()
    assert plan.step(StepKind.VALIDATE).items == ("compose",) and "no nginx -t" in plan.step(StepKind.VALIDATE).reason
    assert not nginx_checks() and [i for i in host.host.intents() if i[0] == "compose-config"]
    plan, report = host.deploy(SERVER_NAMES="clinic.example.com")  # a new gateway/nginx.conf
    assert plan.step(StepKind.VALIDATE).items == ("compose", "nginx") and len(nginx_checks()) == 1
    cert, key = make_cert(tmp_path, "a")
    plan, report = host.deploy(SERVER_NAMES="clinic.example.com", TLS_CERT_FILE=cert, TLS_KEY_FILE=key)
    assert plan.step(StepKind.VALIDATE).items == ("compose", "nginx") and len(nginx_checks()) == 1


def test_source_change_that_leaves_the_image_alone_skips_the_roll(host):
    (host.app / "backend" / "migrations" / "README").write_text("notes\n")  # not part of the fake's image
    plan, report = host.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.step(StepKind.ROLL, "backend").condition == "image-changed:backend"
    assert dict(report.applied.done)["roll:backend"] == "skipped: the backend image did not change"
    assert dict(report.applied.done)["migrate:backend"].startswith("skipped")


def test_limits_change_rolls_the_service(host):
    plan, report = host.deploy(BACKEND_CPUS="1.0")
    assert_plan_equals_apply(plan, report)
    assert plan.rolls == ("backend",) and "definition changed" in plan.step(StepKind.ROLL, "backend").reason


def test_infra_limits_change_recreates_it(host):
    plan, report = host.deploy(REDIS_MEMORY="256m")
    assert_plan_equals_apply(plan, report)
    assert plan.step(StepKind.RECREATE, "redis").reason == "definition changed" and plan.rolls == ()


def test_db_password_rotation_changes_it_in_place_then_rolls_clients(host):
    plan, report = host.deploy(DB_PASSWORD="sandbox-db-rotated-2a7c")
    assert_plan_equals_apply(plan, report)
    order = [s.key for s in plan.steps]
    assert order.index("install-secrets:" + host.desired.secrets_version) < order.index("rotate:postgres") < order.index("roll:backend")
    assert plan.action == "converge" and not plan.has(StepKind.RECREATE, "postgres")
    assert host.world.passwords["postgres"].endswith(f"/.versions/{host.desired.secrets_version}/env/postgres.env")


def test_redis_password_rotation_accepts_both_during_the_roll(host):
    plan, report = host.deploy(REDIS_PASSWORD="sandbox-redis-rotated-77")
    assert_plan_equals_apply(plan, report)
    order = [s.key for s in plan.steps]
    assert order.index("rotate-prepare:redis") < order.index("roll:backend") < order.index("rotate-finish:redis")


def test_object_store_password_rotation_recreates_it_before_the_clients_roll(host):
    plan, report = host.deploy(MINIO_PASSWORD="sandbox-s3-rotated-5511")
    assert_plan_equals_apply(plan, report)
    order = [s.key for s in plan.steps]
    assert "credentials changed" in plan.step(StepKind.RECREATE, "minio").reason
    assert order.index("recreate:minio") < order.index("roll:backend")


def test_stopped_infra_is_started(host):
    for c in host.world.containers:
        if c.service == "redis":
            c.state = "exited"
    plan, report = host.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.action == "converge" and plan.step(StepKind.START).items == ("redis",)
    assert host.world.running("redis")


def test_unhealthy_backend_is_replaced(host):
    for c in host.world.running("backend"):
        c.health = "unhealthy"
    plan, report = host.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.action == "converge" and plan.rolls == ("backend",)
    assert all(c.health == "healthy" for c in host.world.running("backend"))


def test_stale_upstream_is_repaired(host):
    for c in host.world.running("ai-service"):
        c.ip = "172.18.0.250"  # restarted outside healthdeploy with another address
    plan, report = host.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.step(StepKind.REPAIR_UPSTREAMS).items == ("ai-service",)
    assert b"172.18.0.250" in host.world.files[f"{host.world.shared}/gateway/upstreams/ai-service.conf"]


def test_container_left_by_an_interrupted_deploy_is_removed(host):
    old = host.world.running("backend")[0]
    from fakes import FakeContainer

    host.world.containers.append(FakeContainer("stray0000000", "backend", old.release, old.image, "172.18.0.99",
                                               old.env_digest, old.definition))
    plan, report = host.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.step(StepKind.REMOVE_ORPHANS, "backend").items == ("hd-sandbox-h1-backend-stra",)
    assert [c.id for c in host.world.running("backend")] == [old.id]


def test_renewed_certificate_reloads_the_gateway(tmp_path):
    cert, key = make_cert(tmp_path, "a")
    h = Host(tmp_path, TLS_CERT_FILE=cert, TLS_KEY_FILE=key)
    h.deploy()
    make_cert(tmp_path, "b")  # same paths, new material
    plan, report = h.deploy()
    assert_plan_equals_apply(plan, report)
    assert plan.step(StepKind.RELOAD_GATEWAY).reason == "certificate changed"
    assert plan.step(StepKind.INSTALL_SECRETS).items == ("tls/cert.pem", "tls/key.pem")
    assert plan.action == "converge" and plan.rolls == ()


def test_enabling_tls_recreates_the_gateway_to_publish_443(host, tmp_path):
    cert, key = make_cert(tmp_path, "a")
    plan, report = host.deploy(TLS_CERT_FILE=cert, TLS_KEY_FILE=key)
    assert_plan_equals_apply(plan, report)
    assert plan.step(StepKind.RECREATE, "gateway").reason == "definition changed"
    assert plan.has(StepKind.INSTALL_GATEWAY_CONF) and not plan.has(StepKind.RELOAD_GATEWAY)


def make_cert(directory: Path, tag: str):
    """A real self-signed pair (settings validation parses both and checks that they belong together)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"{tag}.example.com")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return str(directory / "cert.pem"), str(directory / "key.pem")


# -- undo: a failure at any command leaves the old release serving completely ---------------------------
CHANGES = {
    "backend source": lambda h: (h.app / "backend" / "build_id").write_text("backend-v9\n"),
    "secret rotation": None,
}


@pytest.mark.parametrize("error", [HealthdeployError("injected"), ConnectionLost("cut"), Interrupted(), Killed()],
                         ids=["command fails", "connection lost", "interrupted", "process killed"])
def test_a_failure_at_any_command_leaves_the_old_release_serving(tmp_path, error):
    h = Host(tmp_path)
    h.deploy()
    before = h.snapshot()
    (h.app / "backend" / "build_id").write_text("backend-v9\n")
    # How many commands the full deploy runs (on a copy of the world), then fail at each of them in turn.
    import copy

    probe_world = copy.deepcopy(h.world)
    probe = Host.__new__(Host)
    probe.__dict__.update({**h.__dict__, "world": probe_world})
    probe.apply(probe.plan(DB_PASSWORD="sandbox-db-rotated-9f1e", JWT_EXPIRES_IN="2d"))
    total = len(probe.host.commands)
    assert total > 30
    outcomes = {"undone": 0, "completed": 0}
    for n in range(2, total + 1):  # command 1 is the observation itself
        world = copy.deepcopy(h.world)
        trial = Host.__new__(Host)
        trial.__dict__.update({**h.__dict__, "world": world})
        plan = trial.plan(fail_at=n, error=error, DB_PASSWORD="sandbox-db-rotated-9f1e", JWT_EXPIRES_IN="2d")
        try:
            trial.apply(plan)
        except (HealthdeployError, KeyboardInterrupt, Killed):
            if trial.apply_.committed:  # killed after the commit point: the new release is complete
                outcomes["completed"] += 1
                expect, state = probe.snapshot(), "new"
            else:
                outcomes["undone"] += 1
                expect, state = before, "old"
        else:  # a failure the deploy may carry on past (an old container that would not stop): all new
            outcomes["completed"] += 1
            expect, state = probe.snapshot(), "new"
        after = trial.snapshot()
        where = f"failure at command {n} ({trial.host.failed.description}), {state} release expected"
        assert after[0] == expect[0], f"{where}: current is {after[0]}"
        # The same service runs the same image with the same settings (a container may be a new one of it).
        assert [(s, img, env) for s, _, img, env in after[1]] == [(s, img, env) for s, _, img, env in expect[1]], where
        assert after[2] == expect[2], f"{where}: secrets differ"
        assert after[3] == expect[3] and after[4] == expect[4], f"{where}: gateway config or upstreams differ"
        if state == "old":
            assert not [r for r in world.releases() if r not in h.world.releases()], f"{where}: release dir left"
            password = world.passwords.get("postgres")
            assert password is None or f"/.versions/{trial.apply_.prev_secrets}/" in password, \
                f"{where}: PostgreSQL keeps the new password ({password})"
    assert outcomes["undone"] > 25


def test_a_deploy_path_that_holds_a_swarm_release_is_refused_before_any_change(host):
    from deploy.plan.deploy import preflight_problems

    w = host.world
    w.files[f"{w.rel(w.current)}/stack.yaml"] = b"services: {}\n"  # what a TARGET=swarm deploy leaves in its release
    w.files[f"{w.rel(w.current)}/release.env"] = f"RELEASE_ID={w.current}\nSTACK=healthdeploy-prod\n".encode()
    observed = host.session.observe()
    problems = preflight_problems(observed, 100, w.deploy_path)
    assert problems == [f"{w.deploy_path} holds a TARGET=swarm release (stack healthdeploy-prod), not one of a Compose "
                        "deploy: give this environment a DEPLOY_PATH of its own"]
    del w.files[f"{w.rel(w.current)}/stack.yaml"], w.files[f"{w.rel(w.current)}/release.env"]
    assert preflight_problems(host.session.observe(), 100, w.deploy_path) == []  # its own release: fine


def test_a_rollback_on_a_path_whose_live_release_is_a_swarm_one_is_refused(host):
    from deploy.plan.deploy import PreflightError
    from deploy.plan.rollback import plan_rollback

    w = host.world
    live = w.current
    host.deploy(JWT_EXPIRES_IN="2d")  # an earlier release to roll back to
    w.files[f"{w.rel(w.current)}/release.env"] += b"STACK=healthdeploy-prod\n"
    with pytest.raises(PreflightError) as caught:
        plan_rollback(host.session.observe(), "h1", ("backend",), "img")
    assert caught.value.message == (f"h1: the live release {w.current} is a TARGET=swarm release (stack "
                                    "healthdeploy-prod), not one of a Compose deploy")
    assert live != w.current
