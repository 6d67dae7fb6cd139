"""APP_SOURCE as a git repository: fetched on the host, one commit exported per release."""

from __future__ import annotations

import json
import subprocess

from sandbox_env import MAIN_ADDRESS, get_json


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


def test_deploy_from_a_git_repository(make_env, tmp_path):
    env = make_env("git")
    work = env.app  # the sample app copy becomes a repository
    git(work, "init", "-q", "-b", "main")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "v1")
    bare = tmp_path / "app.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    env.write(APP_SOURCE=f"file://{bare}", APP_REF="main")
    proc = env.fab("deploy", "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"][0]
    assert first["result"] == "deployed" and "exported file://" in proc.stderr
    assert get_json(f"http://{MAIN_ADDRESS}:5000/api/build")["build"] == "backend-v1"

    (work / "backend" / "build_id").write_text("backend-from-git\n")
    git(work, "commit", "-q", "-am", "v2")
    git(work, "push", "-q", str(bare), "main")
    proc = env.fab("deploy", "--json")
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"][0]
    # Only the SOURCE pointer is sent; every image is built again from the new tree, and only the backend's differs.
    assert second["services"] == ["backend"] and second["uploaded_files"] == 1, proc.stderr[-3000:]
    assert get_json(f"http://{MAIN_ADDRESS}:5000/api/build")["build"] == "backend-from-git"
    again = env.fab("deploy", "--json")
    assert json.loads(again.stdout[again.stdout.index("{"):])["hosts"][0]["result"] == "unchanged"

    env.write(APP_SOURCE=f"file://{bare}", APP_REF="no-such-branch")
    proc = env.fab("deploy")
    assert proc.returncode == 1 and "ref no-such-branch not found" in proc.stderr
