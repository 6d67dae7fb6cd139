"""Remote file-system command builders: release directories, atomic writes, manifests, the lock."""

from __future__ import annotations

from .base import Command, cmd, script


def mkdirs(*paths: str, mode: str = "0755") -> Command:
    """``mkdir -p`` where the parents it creates get ``mode`` too (``-m`` alone sets only the last one)."""
    umask = f"{0o777 & ~int(mode, 8):03o}"
    return script('umask "$1"; m="$2"; shift 2; exec mkdir -p -m "$m" -- "$@"', umask, mode, *paths,
                  description="create directories", intent=("mkdir", *paths))


def write_file(path: str, content: bytes, mode: str = "0644") -> Command:
    """Atomic write: a temporary file in the same directory, then rename (never a half-written file)."""
    return script(
        'set -e; umask 077; mkdir -p "$(dirname "$1")"; tmp=$(mktemp "$1.XXXXXX"); '
        'cat > "$tmp"; chmod "$2" "$tmp"; mv -f "$tmp" "$1"',
        path, mode, description=f"write {path}", stdin=content, intent=("write", path),
    )


def append_line(path: str, line: bytes) -> Command:
    """Append to a log file, creating its directory (0700) and the file (0600) when missing: one round trip."""
    return script('umask 077; mkdir -p "$(dirname "$1")" && cat >> "$1"', path, description="append to audit log",
                  stdin=line, intent=("append", path))


def extract_tar(directory: str) -> Command:
    """Unpack the tar arriving on stdin into ``directory`` (which must exist). Directories it creates are
    0750 (umask 027: tar creates a file's missing parents itself); files keep the tar's modes (0640)."""
    # -m: files get the time of extraction (nanoseconds): BuildKit skips re-sending a context file whose
    # size and mtime look unchanged, so a same-size edit with an old mtime would build from a stale copy.
    return script('umask 027; exec tar -x -m -f - -C "$1" --no-same-owner', directory, description="unpack files",
                  intent=("extract", directory))


def copy_release(source: str, target: str) -> Command:
    """Start a release from the previous one (host-local copy; only changed files cross the network).
    Written under a temporary name and renamed, so a failed copy leaves no partial release behind."""
    # `cp -a` keeps modes: a release made before files were 0640/0750 is tightened on the copy.
    return script('set -e; umask 027; rm -rf "$2.partial"; mkdir -p "$2.partial"; if [ -n "$1" ] && [ -d "$1" ]; then '
                  'cp -a "$1/." "$2.partial/"; chmod -R go-w,o-rwx "$2.partial"; fi; rm -f "$2.partial/MANIFEST"; '
                  'mv -T "$2.partial" "$2"',
                  source, target, description="start the new release", intent=("new-release", target))


def remove_paths(directory: str, names: tuple[str, ...]) -> Command:
    return script('cd "$1" && shift && rm -f -- "$@"', directory, *names, description="remove stale files",
                  intent=("remove", directory, *names))


def switch_symlink(link: str, target: str) -> Command:
    """Atomically point ``link`` at ``target`` (rename over the old link)."""
    return script('set -e; ln -sfn "$2" "$1.new"; mv -Tf "$1.new" "$1"', link, target,
                  description="switch current release", intent=("switch", target))


# A secrets version is staged under shared/env/.versions/<version>/ (0700/0600). Installing it copies each
# file over the live one atomically (a temporary file in the same directory, then rename): the env
# files Compose reads, each data service's runtime copy (shared/env/run/<svc>/secrets.env, mounted
# read-only as a directory so a rename is seen), and the TLS files the gateway mounts.
INSTALL_SECRETS = r"""set -e
umask 077
v="$1/.versions/$2"
[ -d "$v" ] || { echo "secrets version $2 is not staged" >&2; exit 3; }
mkdir -p "$1/run" "$3/tls"
for f in "$v"/env/*.env; do
  [ -f "$f" ] || continue
  n=$(basename "$f"); svc=${n%.env}
  cp "$f" "$1/.installing" && mv -f "$1/.installing" "$1/$n"
  mkdir -p "$1/run/$svc"; cp "$f" "$1/run/$svc/.installing" && mv -f "$1/run/$svc/.installing" "$1/run/$svc/secrets.env"
done
for f in "$v"/tls/*.pem; do
  [ -f "$f" ] || continue
  cp "$f" "$3/tls/.installing" && mv -f "$3/tls/.installing" "$3/tls/$(basename "$f")"
done
echo "$2" > "$1/.installing" && mv -f "$1/.installing" "$1/.version"
"""


def install_secrets(env_dir: str, version: str, gateway_dir: str) -> Command:
    """Make a staged secrets version the live one (each file replaced atomically, mode 0600)."""
    return script(INSTALL_SECRETS, env_dir, version, gateway_dir, description="install env and TLS files",
                  intent=("install-secrets", version))


def stage_dir(env_dir: str, version: str) -> str:
    return f"{env_dir}/.versions/{version}"


PRUNE_SECRET_VERSIONS = r"""cd "$1/.versions" 2>/dev/null || exit 0
shift
for v in *; do
  [ -d "$v" ] || continue
  keep=0; for k in "$@"; do [ "$v" = "$k" ] && keep=1; done
  [ "$keep" = 1 ] || rm -rf -- "$v"
done
"""


def prune_secret_versions(env_dir: str, keep: tuple[str, ...]) -> Command:
    return script(PRUNE_SECRET_VERSIONS, env_dir, *keep, description="remove unused secrets versions",
                  intent=("prune-secrets",))


def remove_tree(path: str) -> Command:
    return cmd("rm", "-rf", "--one-file-system", "--", path, description=f"remove {path}", intent=("rmtree", path))


