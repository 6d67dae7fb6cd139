"""A container's own health check run by healthdeploy while Docker still says "starting" (execute/health_now.py):
the command, the parsed check, and Docker's rules (one pass is healthy; retries after the start period)."""

import json
from dataclasses import dataclass

from deploy.commands import docker as dk
from deploy.execute.health_now import HealthNow
from deploy.facts.containers import parse_containers

INSPECT = [{
    "Id": "c0ffee", "Name": "/p-backend-2", "Image": "sha256:1",
    "Config": {"Image": "backend:1", "Labels": {"com.docker.compose.service": "backend"}, "Env": [],
               "Healthcheck": {"Test": ["CMD-SHELL", "curl -fsS -o /dev/null \"http://127.0.0.1:${PORT}/health\" || exit 1"],
                               "Interval": 10000000000, "Timeout": 3000000000, "StartPeriod": 2000000000, "Retries": 3}},
    "State": {"Status": "running", "Health": {"Status": "starting"}},
    "NetworkSettings": {"Networks": {}}, "HostConfig": {},
}]


def container(**state):
    item = json.loads(json.dumps(INSPECT))
    item[0]["State"].update(state)
    return parse_containers(json.dumps(item), "p")[0]


def test_the_check_docker_runs_is_parsed_from_inspect():
    c = container()
    assert c.health_test[0] == "CMD-SHELL" and "${PORT}/health" in c.health_test[1]
    assert (c.health_timeout_s, c.health_start_period_s, c.health_retries) == (3.0, 2.0, 3)


def test_the_command_is_an_exec_of_the_same_test():
    shell = dk.health_test("c0ffee", ("CMD-SHELL", "pg_isready -q || exit 1"), 3.0)
    assert shell.render() == "docker exec c0ffee /bin/sh -c 'pg_isready -q || exit 1'"
    assert shell.readonly and shell.timeout == 8.0
    assert dk.health_test("c0ffee", ("CMD", "mqtt-healthcheck", "--quick"), 0).render() == \
        "docker exec c0ffee mqtt-healthcheck --quick"
    assert dk.health_test("c0ffee", ("NONE",), 3.0) is None and dk.health_test("c0ffee", (), 3.0) is None


@dataclass
class Result:
    ok: bool


class Host:
    """Answers the health test with the next of ``answers``; counts the commands run."""

    def __init__(self, *answers: bool):
        self.answers, self.commands = list(answers), []

    def run(self, command, check=True):
        self.commands.append(command.render())
        return Result(self.answers.pop(0))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_one_pass_is_healthy_and_no_more_probes_follow():
    host, clock = Host(False, True), Clock()
    own = HealthNow(host.run, clock=clock)
    assert own.of(container()).health == "starting"
    assert own.of(container()).health == "starting" and len(host.commands) == 1  # at most one probe a second
    clock.now += 1
    assert own.of(container()).health == "healthy"
    clock.now += 1
    assert own.of(container()).health == "healthy" and len(host.commands) == 2


def test_failures_count_after_the_start_period_and_retries_make_it_unhealthy():
    host, clock = Host(*[False] * 10), Clock()
    own = HealthNow(host.run, clock=clock)
    verdicts = []
    for _ in range(6):  # probes at 0, 1, 2 s (start period 2 s: the one at 0 and 1 do not count), 3, 4 s
        verdicts.append(own.of(container()).health)
        clock.now += 1
    assert verdicts == ["starting"] * 4 + ["unhealthy", "unhealthy"]


def test_docker_s_own_verdict_wins_and_stopped_containers_are_not_probed():
    host = Host()
    own = HealthNow(host.run, clock=Clock())
    assert own.of(container(Health={"Status": "unhealthy"})).health == "unhealthy"
    assert own.of(container(Health={"Status": "healthy"})).health == "healthy"
    assert own.of(container(Status="exited")).state == "exited"
    assert host.commands == []


def test_a_probe_past_its_deadline_is_a_failure_and_a_lost_connection_is_not_hidden():
    from deploy.core.errors import HealthdeployError
    from deploy.execute.executor import ConnectionLost

    clock = Clock()

    def timed_out(command, check=True):
        raise HealthdeployError("run the container's health check on h timed out after 8s")

    own = HealthNow(timed_out, clock=clock)
    verdicts = []
    for _ in range(6):
        verdicts.append(own.of(container()).health)
        clock.now += 1
    assert verdicts == ["starting"] * 4 + ["unhealthy", "unhealthy"]

    def lost(command, check=True):
        raise ConnectionLost("connection to h was lost")

    try:
        HealthNow(lost, clock=Clock()).of(container())
    except ConnectionLost:
        pass
    else:
        raise AssertionError("a lost connection must reach the roll")
