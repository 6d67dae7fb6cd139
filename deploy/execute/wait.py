"""The one wait loop: poll a check until it answers, a deadline passes, or a signal asks to stop."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from deploy.core.errors import HealthdeployError
from deploy.execute.executor import check_cancelled

T = TypeVar("T")


class WaitTimeout(HealthdeployError):
    pass


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5,
             hint: str = "", sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``check`` until it returns something that is not None; raise WaitTimeout at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        check_cancelled()
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{what}: no success within {timeout:.0f}s", hint or None)
        sleep(interval)
