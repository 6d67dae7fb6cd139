"""Application source from git, fetched on the host into a bare mirror; each release gets `git archive`."""

from __future__ import annotations

from .base import Command, script

# -- application source from git, fetched on the host -------------------------------------------------
# A bare mirror per repository under shared/git; each release gets `git archive` of one commit.
GIT_FETCH = r"""
set -e
command -v git >/dev/null || { echo "git is not installed on this host" >&2; exit 3; }
if [ -d "$2" ]; then git -C "$2" remote update --prune >/dev/null 2>&1 || git -C "$2" fetch --prune origin '+refs/*:refs/*' >/dev/null
else mkdir -p "$(dirname "$2")"; git clone --quiet --mirror "$1" "$2"; fi
git -C "$2" rev-parse --verify --quiet "$3^{commit}" || { echo "ref $3 not found in $1" >&2; exit 4; }
"""

GIT_EXPORT = r"""
set -e
rm -rf "$3"; mkdir -p "$3"
git -C "$1" archive --format=tar "$2" | tar -x -m -C "$3" --no-same-owner
"""


GIT_RESOLVE = r"""
command -v git >/dev/null || { echo "git is not installed on this host" >&2; exit 3; }
case "$2" in
  [0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]*) [ ${#2} -eq 40 ] && { echo "$2"; exit 0; } ;;
esac
out=$(git ls-remote --exit-code "$1" "refs/heads/$2" "refs/tags/$2^{}" "refs/tags/$2" "$2" 2>&1) || {
  echo "ref $2 not found in the repository${out:+: $out}" >&2; exit 4; }
line=$(printf '%s\n' "$out" | head -n 1)
echo "${line%%[[:space:]]*}"
"""


def git_resolve(url: str, ref: str) -> Command:
    """The commit a branch/tag names, without fetching anything (a fact)."""
    return script(GIT_RESOLVE, url, ref, description="resolve the application ref", readonly=True)


def git_fetch(url: str, mirror: str, ref: str) -> Command:
    """Fetch ``url`` into the host's mirror and print the commit ``ref`` names."""
    return script(GIT_FETCH, url, mirror, ref, description="fetch application source")


def git_export(mirror: str, commit: str, directory: str) -> Command:
    return script(GIT_EXPORT, mirror, commit, directory, description="export application source")
