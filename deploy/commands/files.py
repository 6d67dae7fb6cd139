"""Remote file-system command builders: release directories, atomic writes, manifests, the lock."""

from __future__ import annotations

from .base import Command, cmd, script


def mkdirs(*paths: str, mode: str = "0755") -> Command:
    return cmd("mkdir", "-p", "-m", mode, *paths, description="create directories")


def write_file(path: str, content: bytes, mode: str = "0644") -> Command:
    """Atomic write: a temporary file in the same directory, then rename (never a half-written file)."""
    return script(
        'set -e; umask 077; mkdir -p "$(dirname "$1")"; tmp=$(mktemp "$1.XXXXXX"); '
        'cat > "$tmp"; chmod "$2" "$tmp"; mv -f "$tmp" "$1"',
        path, mode, description=f"write {path}", stdin=content,
    )


def append_line(path: str, line: bytes) -> Command:
    """Append to a log file, creating its directory (0700) and the file (0600) when missing: one round trip."""
    return script('umask 077; mkdir -p "$(dirname "$1")" && cat >> "$1"', path, description="append to audit log",
                  stdin=line)


def extract_tar(directory: str) -> Command:
    """Unpack the tar arriving on stdin into ``directory`` (which must exist)."""
    # -m: files get the time of extraction (nanoseconds): BuildKit skips re-sending a context file whose
    # size and mtime look unchanged, so a same-size edit with an old mtime would build from a stale copy.
    return cmd("tar", "-x", "-m", "-f", "-", "-C", directory, "--no-same-owner", description="unpack files")


def read_file(path: str) -> Command:
    return script('cat "$1" 2>/dev/null || true', path, description=f"read {path}", readonly=True)


def file_hashes(directory: str, names: tuple[str, ...] = ()) -> Command:
    """``sha256  relative/path`` for each file under ``directory`` (or just ``names``); nothing if absent."""
    return script(
        'cd "$1" 2>/dev/null || exit 0; shift; '
        'if [ $# -gt 0 ]; then for f in "$@"; do [ -f "$f" ] && sha256sum "$f"; done; exit 0; fi; '
        'find . -type f -print0 | xargs -0 -r sha256sum | sed "s| \\./| |"',
        directory, *names, description="hash files", readonly=True,
    )


def copy_release(source: str, target: str) -> Command:
    """Start a release from the previous one (host-local copy; only changed files cross the network)."""
    return script('set -e; mkdir -p "$2"; if [ -d "$1" ]; then cp -a "$1/." "$2/"; fi', source, target,
                  description="copy previous release")


def remove_paths(directory: str, names: tuple[str, ...]) -> Command:
    return script('cd "$1" && shift && rm -f -- "$@"', directory, *names, description="remove stale files")


def switch_symlink(link: str, target: str) -> Command:
    """Atomically point ``link`` at ``target`` (rename over the old link)."""
    return script('set -e; ln -sfn "$2" "$1.new"; mv -Tf "$1.new" "$1"', link, target,
                  description="switch current release")


INSTALL_SECRETS = r"""set -e
umask 077
mkdir -p "$2/env" "$2/gateway/tls"
for f in "$1"/env/*.env "$1"/tls/*.pem; do
  [ -f "$f" ] || continue
  case "$f" in *.pem) d="$2/gateway/tls" ;; *) d="$2/env" ;; esac
  cp "$f" "$d/.installing"
  mv -f "$d/.installing" "$d/$(basename "$f")"
done
"""


def install_secrets(staged: str, shared: str) -> Command:
    """Copy a release's staged env/TLS files into shared/ (each replaced atomically, mode 0600)."""
    return script(INSTALL_SECRETS, staged, shared, description="install env and TLS files")


def remove_tree(path: str) -> Command:
    return cmd("rm", "-rf", "--one-file-system", "--", path, description=f"remove {path}")


HOST_FACTS = r"""
base="$1"
p="$base"; while [ ! -d "$p" ]; do p=$(dirname "$p"); done
echo "docker=$(docker version --format '{{.Server.Version}}' 2>/dev/null)"
echo "compose=$(docker compose version --short 2>/dev/null)"
echo "free_mb=$(df -Pm "$p" | awk 'NR==2 {print $4}')"
echo "current=$(basename "$(readlink "$base/current" 2>/dev/null)" 2>/dev/null)"
echo "releases=$(ls -1 "$base/releases" 2>/dev/null | tr '\n' ' ')"
echo "bash=$(command -v bash)"
echo "user=$(id -un)"
"""


def host_facts(deploy_path: str) -> Command:
    return script(HOST_FACTS, deploy_path, description="read host facts", readonly=True)


def current_release(deploy_path: str) -> Command:
    """Just the live release id (what a backup records): no docker/compose start-up like host_facts."""
    return script('basename "$(readlink "$1/current" 2>/dev/null)" 2>/dev/null; exit 0', deploy_path,
                  description="read the live release", readonly=True)


# -- the deploy lock ---------------------------------------------------------------------------------
# mkdir is atomic: exactly one deploy creates the directory. The holder is a process on the host that
# lives as long as the deploy's SSH channel (it exits when its stdin closes), so a lock whose holder
# is gone is provably stale, whatever happened to the operator's machine.
LOCK_ACQUIRE = r"""
mkdir "$1" 2>/dev/null || { echo "held"; cat "$1/info.json" 2>/dev/null; exit 0; }
echo "$$" > "$1/holder.pid"
echo acquired
exec cat > /dev/null
"""

# /proc/<pid> rather than kill -0: a holder of another user is alive even though we may not signal it.
# A lock directory younger than a minute without its pid file is being taken right now: held.
LOCK_STATE = r"""
lock_state() {
  [ -d "$1" ] || { echo free; return; }
  pid=$(cat "$1/holder.pid" 2>/dev/null)
  if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then echo held
  elif [ -z "$pid" ] && [ -n "$(find "$1" -maxdepth 0 -mmin -1 2>/dev/null)" ]; then echo held
  else echo stale; fi
}
"""

LOCK_STATUS = LOCK_STATE + r"""
lock_state "$1"
cat "$1/info.json" 2>/dev/null
exit 0
"""

# Removes the lock only if it is still stale at that moment (not a lock someone just took).
LOCK_BREAK = LOCK_STATE + r"""
if [ "$(lock_state "$1")" = stale ]; then rm -rf -- "$1"; echo broken; else lock_state "$1"; fi
"""


def lock_hold(lock_dir: str) -> Command:
    return script(LOCK_ACQUIRE, lock_dir, description="take the deploy lock")


def lock_info_write(lock_dir: str, info: bytes) -> Command:
    return write_file(f"{lock_dir}/info.json", info, "0644")


def lock_status(lock_dir: str) -> Command:
    return script(LOCK_STATUS, lock_dir, description="read the deploy lock", readonly=True)


def lock_break(lock_dir: str) -> Command:
    return script(LOCK_BREAK, lock_dir, description="break a stale deploy lock")


def lock_release(lock_dir: str) -> Command:
    return cmd("rm", "-rf", "--", lock_dir, description="release the deploy lock")


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
