"""The only module that runs commands on the operator's machine (sandbox set-up, image builds, bench)."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass

from deploy.core.errors import HealthdeployError


@dataclass(frozen=True)
class LocalResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_local(argv: list[str] | tuple[str, ...], check: bool = True, input: bytes | None = None,
              capture: bool = True, timeout: float | None = None, cwd: str | None = None,
              env: dict[str, str] | None = None) -> LocalResult:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=capture, timeout=timeout, cwd=cwd, env=env)
    except FileNotFoundError:
        raise HealthdeployError(f"{argv[0]} is not installed", "run `inv sandbox.install` or install it") from None
    out = proc.stdout.decode("utf-8", "replace") if capture else ""
    err = proc.stderr.decode("utf-8", "replace") if capture else ""
    if check and proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise HealthdeployError(f"`{shlex.join(argv)[:200]}` failed with exit status {proc.returncode}"
                                + (": " + " | ".join(tail) if tail else ""))
    return LocalResult(proc.returncode, out, err)
