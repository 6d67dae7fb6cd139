"""File facts: SHA-256 of files under a directory, and file contents."""

from __future__ import annotations

from deploy.commands.base import Command, script

FILE_HASHES = (
    'cd "$1" 2>/dev/null || exit 0; shift; '
    'if [ $# -gt 0 ]; then for f in "$@"; do [ -f "$f" ] && sha256sum "$f"; done; exit 0; fi; '
    'find . -type f -print0 | xargs -0 -r sha256sum | sed "s| \\./| |"'
)


def file_hashes(directory: str, names: tuple[str, ...] = ()) -> Command:
    """``sha256  relative/path`` for each file under ``directory`` (or just ``names``); nothing if absent."""
    return script(FILE_HASHES, directory, *names, description="hash files", readonly=True,
                  intent=("hashes", directory, *names))


def read_file(path: str) -> Command:
    return script('cat "$1" 2>/dev/null || true', path, description=f"read {path}", readonly=True, intent=("read", path))


def parse_hashes(text: str) -> dict[str, str]:
    hashes = {}
    for line in text.splitlines():
        digest, _, path = line.partition(" ")
        path = path.strip().lstrip("*")
        if digest and path:
            hashes[path] = digest
    return hashes
