"""Fault points for the guarantees suite (tests/integration/test_faults.py), like a database's failpoints.

``HEALTHDEPLOY_FAULT=<point>=<action>`` makes the process, on reaching ``<point>``:
- ``kill``: SIGKILL itself (nothing local runs after it: the host's lock holder must undo);
- ``drop``: cut its SSH connection to that host (the socket closed under paramiko: every later command fails,
  the host sees the channel end and its lock holder undoes).
``<point>`` names: ``after:<step key>`` / ``before:<step key>`` (e.g. ``after:send-files``, ``before:switch``),
``roll:<service>:healthy`` (new containers healthy, before the switch), ``roll:<service>:drain`` (switched,
draining), ``during:build`` (1 s into the image build, on the host or off it), ``during:ship`` (once 1 MB of a
host's pull of images built off it has crossed the tunnel: a point in time, however fast the pull). Unset, every
call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

ENV = "HEALTHDEPLOY_FAULT"


def _wanted() -> tuple[str, str] | None:
    spec = os.environ.get(ENV, "")
    point, sep, action = spec.rpartition("=")
    return (point, action) if sep and action in ("kill", "drop") else None


def point(name: str, host=None, delay: float = 0.0) -> None:
    wanted = _wanted()
    if wanted is None or wanted[0] != name:
        return
    if delay:
        timer = threading.Timer(delay, lambda: _act(wanted[1], host))
        timer.daemon = True
        timer.start()
        return
    _act(wanted[1], host)


@contextlib.contextmanager
def armed_while(name: str, host, reached: Callable[[], bool], every: float = 0.02) -> Iterator[None]:
    """Within the block, act once ``reached()`` turns true (checked every ``every`` s); never after the block."""
    wanted = _wanted()
    if wanted is None or wanted[0] != name:
        yield
        return
    over = threading.Event()

    def watch() -> None:
        while not over.wait(every):
            if reached():
                _act(wanted[1], host)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        over.set()


def _act(action: str, host) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "drop" and host is not None:
        transport = getattr(getattr(host, "connection", None), "transport", None)
        sock = getattr(transport, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(2)
            finally:
                sock.close()
