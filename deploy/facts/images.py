"""Image facts: the image IDs behind release tags."""

from __future__ import annotations

from deploy.commands.base import Command, script

IMAGE_IDS = (
    'for ref in "$@"; do id=$(docker image inspect --format "{{.Id}}" "$ref" 2>/dev/null) || id=-; '
    'echo "$ref $id"; done'
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
