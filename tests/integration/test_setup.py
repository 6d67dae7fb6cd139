"""The machine set-up routine through the real task: `inv sandbox.install` on this machine.

Hiding dockerd makes the routine see this machine kind's fresh state (a docker CLIENT, no engine):
it must choose docker.io, and the engine must answer afterwards. A bogus package proves a failing
install is one `error:` line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import subprocess

from deploy.core.settings import PROJECT_ROOT


def inv(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
    full_env.pop("HEALTHDEPLOY_SETUP_HIDE", None) if "HEALTHDEPLOY_SETUP_HIDE" not in env else None
    return subprocess.run(["inv", *args], capture_output=True, text=True, timeout=1800, cwd=PROJECT_ROOT, env=full_env)


def test_install_with_dockerd_hidden_chooses_docker_io_and_the_engine_answers():
    proc = inv("sandbox.install", HEALTHDEPLOY_SETUP_HIDE="dockerd")
    assert proc.returncode == 0, proc.stderr
    assert "installing docker.io with apt-get (missing dockerd)" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    server = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    assert server.returncode == 0 and server.stdout.strip(), server.stderr


def test_a_failing_install_is_one_error_line_and_no_traceback():
    proc = inv("sandbox.install", HEALTHDEPLOY_SETUP_EXTRA_PACKAGES="healthdeploy-no-such-package")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "healthdeploy-no-such-package" in errors[0]
