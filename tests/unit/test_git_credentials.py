"""A token in APP_SOURCE: never on a command line, redacted everywhere, stripped from what is stored."""

from __future__ import annotations

import subprocess
from urllib.parse import quote

from deploy.commands.git import git_export, git_fetch, git_resolve
from deploy.core.secret import redact
from deploy.core.settings import build_settings
from deploy.core.urls import display_url, split_credentials
from deploy.stack import payload as pl

TOKEN = "ghp_T0k/en+with=chars"
URL = f"https://deployer:{quote(TOKEN, safe='')}@git.example.org:8443/health/app.git"


def test_the_url_is_split_into_a_clean_url_and_credentials():
    clean, creds = split_credentials(URL)
    assert clean == "https://git.example.org:8443/health/app.git" == display_url(URL)
    assert creds.username == "deployer" and creds.token.reveal() == TOKEN
    assert split_credentials("https://TOKEN123@github.com/a/b.git")[1].token.reveal() == "TOKEN123"
    for url in ("git@github.com:a/b.git", "ssh://git@host/r.git", "file:///srv/r.git", "https://host/r.git"):
        assert split_credentials(url) == (url, None)


def test_no_command_line_holds_the_token_it_travels_on_stdin():
    for command in (git_resolve(URL, "main"), git_fetch(URL, "/srv/x/shared/git/abc.git", "f" * 40, "/old.git")):
        line = command.render()
        assert TOKEN not in line and quote(TOKEN, safe="") not in line and "deployer:" not in line
        assert "https://git.example.org:8443/health/app.git" in line
        assert command.stdin == f"deployer\n{TOKEN}\n".encode()
        assert TOKEN not in command.display() and "stdin:" in command.display()
    assert git_resolve("file:///srv/app.git", "main").stdin is None  # no credentials, nothing sent
    assert TOKEN not in git_export("/m.git", "f" * 40, "/r/src").render()


def test_the_token_is_a_secret_of_the_settings_raw_and_encoded():
    s = build_settings("t", {"HOSTS": "h", "ENV_KIND": "sandbox", "STACK_VARIANT": "sandbox", "APP_SOURCE": URL})
    text = f"fatal: {URL} and {TOKEN} and {quote(TOKEN, safe='')}"
    assert TOKEN not in redact(text, s.secrets) and quote(TOKEN, safe="") not in redact(text, s.secrets)
    assert pl.git_source_files(URL, "a" * 40)[pl.SOURCE_FILE] == b"git https://git.example.org:8443/health/app.git " + b"a" * 40 + b"\n"


def test_the_helper_hands_git_the_credentials_from_stdin(tmp_path):
    """Run GIT_RESOLVE's credential part for real: git asks the helper, which answers from the variables read
    from stdin (git credential fill is what git runs inside ls-remote/fetch)."""
    from deploy.commands.git import _CREDENTIALS

    script = _CREDENTIALS + 'exec 0</dev/null; printf "protocol=https\\nhost=git.example.org\\n\\n" | g credential fill'
    proc = subprocess.run(["sh", "-c", script, "sh"], input=f"deployer\n{TOKEN}\n", capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"username=deployer\npassword={TOKEN}\n" in proc.stdout
