"""A container's health as its own health check says now, not at Docker's next scheduled probe.

Docker (20.10, Debian 12's) first probes a new container one full ``interval`` after it starts and has no
``start_interval``: every wait on a new container (a roll, the writers after a restore) waited for that probe,
so the interval had to be short, and every idle container paid for it all day (each probe is an exec: about
60 ms of CPU with the engine's share, measured here). So while healthdeploy waits on a container that Docker
still calls ``starting``, it runs the container's own test itself (``docker exec``: the same command, user and
environment as Docker's probe), at most once a second, with Docker's rules: one pass is ``healthy``; failures
count only after the start period, and ``retries`` of them in a row are ``unhealthy``. Docker's own verdict,
when it has one, always wins. Docker's status catches up at its next probe (``fab health`` says "still starting"
meanwhile, a warning).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from deploy.commands import docker as dk
from deploy.core.errors import HealthdeployError
from deploy.execute.executor import ConnectionLost
from deploy.facts.containers import Container

EVERY_S = 1.0  # at most one own probe a second per container


class HealthNow:
    def __init__(self, run: Callable, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.run = run  # Session.run (the executor layer runs the command)
        self.every_s, self.clock = every_s, clock
        self.first_seen: dict[str, float] = {}
        self.last_probe: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.passed: set[str] = set()

    def of(self, container: Container) -> Container:
        """``container`` with the health its own check gives now (unchanged unless Docker says ``starting``)."""
        if container.health != "starting" or not container.running:
            return container
        command = dk.health_test(container.id, container.health_test, container.health_timeout_s)
        if command is None:
            return container
        if container.id in self.passed:
            return replace(container, health="healthy")
        now = self.clock()
        self.first_seen.setdefault(container.id, now)
        if now - self.last_probe.get(container.id, float("-inf")) >= self.every_s:
            self.last_probe[container.id] = now
            try:
                ok = self.run(command, check=False).ok
            except ConnectionLost:
                raise
            except HealthdeployError:  # past its deadline (and killed): a failed probe, as in Docker
                ok = False
            if ok:
                self.passed.add(container.id)
                return replace(container, health="healthy")
            # Failures in the start period do not count (Docker's rule); it is measured from when this wait first
            # saw the container, which is after it started: never sooner than Docker would.
            if now - self.first_seen[container.id] >= container.health_start_period_s:
                self.failures[container.id] = self.failures.get(container.id, 0) + 1
        if self.failures.get(container.id, 0) >= (container.health_retries or 3):
            return replace(container, health="unhealthy")
        return container

    def all_of(self, containers: list[Container]) -> list[Container]:
        return [self.of(c) for c in containers]
