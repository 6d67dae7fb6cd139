"""A git token in APP_SOURCE against a REAL git server over HTTP that requires it (git http-backend behind
Basic auth on loopback): deployed from, while the host's process list is sampled every 0.1 s; the token is
never on a command line, in the mirror, in the output, in the audit log or anywhere under the deploy path."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from urllib.parse import quote

from git_http import GitHttpServer, ProcessSampler, files_containing
from sandbox_env import MAIN_ADDRESS, get_json
from test_git_source import git

TOKEN = "hdtok-7Qz/9+Kp=Lw2xR"  # '/', '+' and '=' make its URL-encoded form differ from it
ENCODED = quote(TOKEN, safe="")


def test_a_token_in_app_source_never_shows(make_env, tmp_path):
    env = make_env("gtok")
    work = env.app
    git(work, "init", "-q", "-b", "main")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "v1")
    repos = tmp_path / "repos"
    repos.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(repos / "app.git")], check=True)
    with GitHttpServer(repos, "deployer", TOKEN) as server:
        clean = f"http://127.0.0.1:{server.port}/app.git"
        env.write(APP_SOURCE=f"http://deployer:{ENCODED}@127.0.0.1:{server.port}/app.git", APP_REF="main")
        # The server really requires the token.
        anonymous = subprocess.run(["git", "ls-remote", clean], capture_output=True, text=True,
                                   env={"PATH": "/usr/bin:/bin", "GIT_TERMINAL_PROMPT": "0", "HOME": str(tmp_path)})
        assert anonymous.returncode != 0 and server.counts["401"] >= 1

        with ProcessSampler(0.1) as ps:
            # Positive control: a process with the token in its arguments IS seen by the sampler.
            subprocess.run(["sh", "-c", "sleep 0.5", "sh", TOKEN])
            control = len(ps.hits(TOKEN))
            proc = env.fab("deploy", "--json")
        assert control >= 1, "the sampler must see a token on a command line"
        assert proc.returncode == 0, proc.stderr
        assert server.counts["ok"] >= 2  # ls-remote and the clone, authenticated
        host = json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"][0]
        assert host["result"] == "deployed"
        assert get_json(f"http://{MAIN_ADDRESS}:5000/api/build")["build"] == "backend-v1"
        output = proc.stdout + proc.stderr
        assert clean in output  # the URL is shown, without its credentials
        hits = [line for line in ps.hits(TOKEN, ENCODED) if "sleep 0.5" not in line]
        print(f"ps samples: {len(ps.samples)}, token hits outside the control: {len(hits)}")
        assert len(ps.samples) >= 20 and hits == []
        for needle in (TOKEN, ENCODED, f"deployer:{ENCODED}"):
            assert needle not in output

        root = env.deploy_root()
        mirrors = root / "shared" / "git"
        (mirror,) = list(mirrors.iterdir())
        assert stat.S_IMODE(mirrors.stat().st_mode) == 0o700 and stat.S_IMODE(mirror.stat().st_mode) == 0o700
        config = (mirror / "config").read_text()
        assert f"url = {clean}" in config
        assert files_containing(root, TOKEN, ENCODED) == []  # mirror, releases, shared/env, audit.log, state
        audit = (root / "shared" / "audit.log").read_text()
        assert '"event": "deploy"' in audit and TOKEN not in audit and ENCODED not in audit
        # The exported source is 0640/0750 like every release file.
        src = root / "current" / "src"
        assert stat.S_IMODE((src / "app.py").stat().st_mode) == 0o640
        assert stat.S_IMODE((src / "backend").stat().st_mode) == 0o750

        # A wrong ref: one clear line, without the token.
        env.write(APP_SOURCE=f"http://deployer:{ENCODED}@127.0.0.1:{server.port}/app.git", APP_REF="no-such-branch")
        wrong = env.fab("deploy")
        assert wrong.returncode == 1
        assert wrong.stderr.strip().splitlines()[-1].startswith("error: ") and "ref no-such-branch not found" in wrong.stderr
        lines = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and clean in lines[0], wrong.stderr
        assert TOKEN not in wrong.stderr + wrong.stdout and ENCODED not in wrong.stderr + wrong.stdout

        # A wrong token: refused by the server, one line, neither token shown.
        env.write(APP_SOURCE=f"http://deployer:wrong-{ENCODED}@127.0.0.1:{server.port}/app.git", APP_REF="main")
        bad = env.fab("deploy")
        assert bad.returncode == 1 and "cannot read" in bad.stderr, bad.stderr
        assert ENCODED not in bad.stderr and TOKEN not in bad.stderr
