"""The payload filter against a real deploy: a source holding a file that looks like a secret stops before
connecting and names it; left out by .deployignore the deploy works and the file is not on the host; release
files on the host are 0640 and directories 0750."""

from __future__ import annotations

import os
import stat


def test_secret_looking_file_stops_before_connecting_then_deployignore_leaves_it_out(make_env, tmp_path):
    env = make_env("pf")
    (env.app / "backend" / ".env.production").write_text("DB_PASSWORD=leaked-from-a-checkout-5c2e\n")
    # With no known host key any connection would end in exit 6: exit 2 shows nothing connected.
    empty_known = tmp_path / "known_hosts"
    env.write(SSH_KNOWN_HOSTS=str(empty_known))
    proc = env.fab("deploy")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "backend/.env.production (env file)" in errors[0] and ".deployignore" in errors[0]
    assert "Traceback" not in proc.stderr and not env.deploy_root().exists() and not empty_known.exists()

    (env.app / ".deployignore").write_text("# local settings never leave this machine\n.env*\n")
    env.write()
    proc = env.fab("deploy")
    assert proc.returncode == 0, proc.stderr
    root = env.deploy_root()
    release = (root / "current").resolve()
    assert not (release / "src" / "backend" / ".env.production").exists()
    assert not any("leaked-from-a-checkout" in p.read_text(errors="replace")
                   for p in release.rglob("*") if p.is_file())

    modes = {}
    for dirpath, dirnames, filenames in os.walk(root / "releases"):
        for name in dirnames:
            modes[os.path.join(dirpath, name)] = stat.S_IMODE(os.lstat(os.path.join(dirpath, name)).st_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                modes[path] = stat.S_IMODE(os.lstat(path).st_mode)
    loose = {p: oct(m) for p, m in modes.items() if m & 0o027}  # group write or anything for others
    assert len(modes) > 10 and loose == {}, loose
    assert stat.S_IMODE((root / "releases").stat().st_mode) == 0o750
    assert stat.S_IMODE((release / "src" / "app.py").stat().st_mode) == 0o640
    assert stat.S_IMODE((release / "src" / "backend").stat().st_mode) == 0o750

    # A second release starts from a copy of the first (`cp -a`): the modes stay tight.
    env.set_build("backend", "backend-v2")
    assert env.fab("deploy").returncode == 0
    second = (root / "current").resolve()
    assert second != release and stat.S_IMODE((second / "src" / "backend" / "build_id").stat().st_mode) == 0o640
    assert stat.S_IMODE((second / "compose.yaml").stat().st_mode) == 0o640

    # DEPLOY_ALLOW ships a file on purpose.
    (env.app / "frontend-web" / "public-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert env.fab("deploy").returncode == 2
    env.write(DEPLOY_ALLOW="frontend-web/*.pem")
    assert env.fab("deploy").returncode == 0
    assert ((root / "current").resolve() / "src" / "frontend-web" / "public-ca.pem").is_file()
