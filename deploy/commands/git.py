"""Application source from git, fetched on the host into a bare mirror; each release gets `git archive`.

A token of an https APP_SOURCE (``https://user:token@host/repo.git``) never reaches a command line, a file
or the output: the scripts get the URL WITHOUT credentials as an argument, and the user and token as two
lines on the SSH channel's stdin (``Command.stdin``, never printed), which they keep in shell variables and
hand to git through a credential helper that reads them from its environment (``echo`` is a shell builtin,
so the helper runs no process whose arguments hold them). Nothing is written: the mirror's config stores
the URL without credentials, and the mirror is 0700.
"""

from __future__ import annotations

from deploy.core.urls import UrlCredentials, split_credentials

from .base import Command, script

# Read the credentials (two lines of stdin; empty without them) and define `g`: git with our helper.
# `credential.helper=` first empties the list, so no helper of the host stores or offers anything else.
# GIT_TERMINAL_PROMPT=0: a wrong token fails at once instead of waiting for a prompt nobody sees.
_CREDENTIALS = r"""
IFS= read -r HD_GIT_USER || true
IFS= read -r HD_GIT_TOKEN || true
export HD_GIT_USER HD_GIT_TOKEN GIT_TERMINAL_PROMPT=0 GIT_ASKPASS=/bin/false SSH_ASKPASS=/bin/false
g() {
  if [ -n "$HD_GIT_TOKEN" ]; then
    git -c credential.helper= -c credential.interactive=false \
        -c 'credential.helper=!hd() { [ "$1" = get ] && echo "username=$HD_GIT_USER" && echo "password=$HD_GIT_TOKEN"; true; }; hd' "$@"
  else
    git "$@"
  fi
}
"""

# -- application source from git, fetched on the host -------------------------------------------------
# A bare mirror per repository under shared/git (0700); each release gets `git archive` of one commit.
# $1 URL without credentials, $2 mirror, $3 commit, $4 an older mirror of the same source whose config may
# hold the token (mirrors were once named after the URL with its credentials): removed.
GIT_FETCH = _CREDENTIALS + r"""
set -e
umask 077
command -v git >/dev/null || { echo "git is not installed on this host" >&2; exit 3; }
[ -z "$4" ] || [ "$4" = "$2" ] || rm -rf -- "$4"
mkdir -p "$(dirname "$2")"
chmod 0700 "$(dirname "$2")"
if [ -d "$2" ]; then
  chmod 0700 "$2"
  git -C "$2" remote set-url origin "$1"
  g -C "$2" remote update --prune >/dev/null 2>&1 || g -C "$2" fetch --prune origin '+refs/*:refs/*' >/dev/null
else
  g clone --quiet --mirror "$1" "$2"
  chmod 0700 "$2"
fi
git -C "$2" rev-parse --verify --quiet "$3^{commit}" || { echo "ref $3 not found in $1" >&2; exit 4; }
"""

# Release files 0640, directories 0750 (umask 027; --no-same-permissions applies it to the archive's modes).
GIT_EXPORT = r"""
set -e
umask 027
rm -rf "$3"; mkdir -p "$3"
git -C "$1" archive --format=tar "$2" | tar -x -m -C "$3" --no-same-owner --no-same-permissions
"""


GIT_RESOLVE = _CREDENTIALS + r"""
command -v git >/dev/null || { echo "git is not installed on this host" >&2; exit 3; }
case "$2" in
  [0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]*) [ ${#2} -eq 40 ] && { echo "$2"; exit 0; } ;;
esac
rc=0
out=$(g ls-remote --exit-code "$1" "refs/heads/$2" "refs/tags/$2^{}" "refs/tags/$2" "$2" 2>&1) || rc=$?
if [ "$rc" = 2 ]; then echo "ref $2 not found in $1" >&2; exit 4; fi
if [ "$rc" != 0 ]; then echo "cannot read $1: $(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')" >&2; exit 5; fi
line=$(printf '%s\n' "$out" | head -n 1)
echo "${line%%[[:space:]]*}"
"""


def _stdin(credentials: UrlCredentials | None) -> bytes | None:
    return credentials.stdin() if credentials and credentials.token else None


def git_resolve(url: str, ref: str) -> Command:
    """The commit a branch/tag names, without fetching anything (a fact)."""
    clean, credentials = split_credentials(url)
    return script(GIT_RESOLVE, clean, ref, description="resolve the application ref", readonly=True,
                  stdin=_stdin(credentials))


def git_fetch(url: str, mirror: str, ref: str, legacy_mirror: str = "") -> Command:
    """Fetch ``url`` into the host's mirror and print the commit ``ref`` names."""
    clean, credentials = split_credentials(url)
    return script(GIT_FETCH, clean, mirror, ref, legacy_mirror, description="fetch application source",
                  stdin=_stdin(credentials))


def git_export(mirror: str, commit: str, directory: str) -> Command:
    return script(GIT_EXPORT, mirror, commit, directory, description="export application source")
