"""Image facts: the image IDs behind release tags."""

from __future__ import annotations

from deploy.commands.base import Command, script

# One CLI call for every ref (a docker CLI start costs about 50 ms of CPU; a deploy asks for 4 refs twice per host):
# the reference filters of one `docker images` are OR-ed, then each ref is looked up in its output.
IMAGE_IDS = (
    'set -f; refs="$*"; n=$#; for ref in "$@"; do set -- "$@" --filter "reference=$ref"; done; shift "$n"; '
    'have=$(docker images --no-trunc --format "{{.Repository}}:{{.Tag}} {{.ID}}" "$@" 2>/dev/null); '
    'for ref in $refs; do id=$(printf "%s\\n" "$have" | awk -v r="$ref" \'$1 == r { print $2; exit }\'); '
    'echo "$ref ${id:--}"; done'
)

# Every tag under a prefix with its full ID, in one CLI call (the observation of a deploy).
PROJECT_IMAGES = 'docker images --no-trunc --format "{{.Repository}}:{{.Tag}} {{.ID}}" --filter "reference=$1/*" 2>/dev/null; exit 0'


def image_ids(refs: tuple[str, ...]) -> Command:
    """``ref id`` per line; a missing image prints ``ref -``."""
    return script(IMAGE_IDS, *refs, description="inspect images", readonly=True, intent=("image-ids", *refs))


def project_images(prefix: str) -> Command:
    return script(PROJECT_IMAGES, prefix, description="list release images", readonly=True)


def parse_image_ids(text: str) -> dict[str, str | None]:
    ids = {}
    for line in text.splitlines():
        ref, _, image_id = line.partition(" ")
        if ref:
            ids[ref] = None if image_id.strip() in ("", "-") else image_id.strip()
    return ids
