"""The object archive (deploy/objects.py) against an in-memory stand-in for the S3 client: the tar format,
metadata and tags kept, extra objects removed, and a body that disagrees with its headers refused.
(The real S3 server path, through an SSH tunnel, is covered in tests/integration/test_backup.py.)"""

from __future__ import annotations

import hashlib
import io
import os
from types import SimpleNamespace

import pytest

from deploy.backup import objects
from deploy.core.errors import IntegrityError


class FakeResponse:
    def __init__(self, data: bytes, headers: dict):
        self.body, self.headers = io.BytesIO(data), headers

    def read(self, size: int = -1) -> bytes:
        return self.body.read(size)

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeS3:
    """Just the calls objects.py makes, with S3's answers (ETag = MD5 of a single-part object)."""

    def __init__(self, buckets: dict | None = None):
        self.buckets = buckets or {}  # bucket -> key -> (bytes, headers, tags)
        self.corrupt: set[str] = set()
        self.short: set[str] = set()

    def list_buckets(self):
        return [SimpleNamespace(name=name) for name in sorted(self.buckets)]

    def list_objects(self, bucket, recursive=True):
        return [SimpleNamespace(object_name=k, is_dir=False, size=len(v[0])) for k, v in sorted(self.buckets[bucket].items())]

    def get_object(self, bucket, key):
        data, headers, tags = self.buckets[bucket][key]
        head = {"Content-Length": str(len(data)), "ETag": f'"{hashlib.md5(data).hexdigest()}"', **headers}
        if tags:
            head["x-amz-tagging-count"] = str(len(tags))
        if key in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        if key in self.short:
            data = data[:-10]
        return FakeResponse(data, head)

    def get_object_tags(self, bucket, key):
        return self.buckets[bucket][key][2]

    def bucket_exists(self, bucket):
        return bucket in self.buckets

    def make_bucket(self, bucket):
        self.buckets[bucket] = {}

    def put_object(self, bucket, key, data, length, content_type="application/octet-stream", metadata=None, tags=None,
                   num_parallel_uploads=3):
        body = data.read(length)
        assert len(body) == length
        headers = {"Content-Type": content_type}
        for name, value in (metadata or {}).items():
            headers[name if name.lower().startswith("x-amz-meta-") or name.lower() in objects.KEPT_HEADERS
                    else "X-Amz-Meta-" + name] = value
        self.buckets[bucket][key] = (body, headers, dict(tags) if tags else {})

    def remove_objects(self, bucket, delete_objects):
        for d in delete_objects:
            del self.buckets[bucket][d.name]
        return iter(())


def normalized(store: FakeS3, buckets) -> dict:
    return {(b, k): (v[0], {h.lower(): x for h, x in v[1].items()}, v[2])
            for b in buckets for k, v in store.buckets[b].items()}


def source_store() -> FakeS3:
    return FakeS3({
        "health-files": {
            "reports/p1.pdf": (b"%PDF" * 1000, {"Content-Type": "application/pdf", "Cache-Control": "max-age=60",
                                                "x-amz-meta-patient": "1"}, {}),
            "中文/报告 1.txt": ("血压".encode(), {"Content-Type": "text/plain; charset=utf-8"}, {}),
            "scans/big.bin": (os.urandom(3 << 20), {"Content-Type": "application/octet-stream"}, {}),
        },
        "avatars": {"p1.png": (b"\x89PNG" + os.urandom(100), {"Content-Type": "image/png"}, {"kind": "avatar"})},
    })


def test_round_trip_keeps_bytes_metadata_and_tags_and_removes_extras():
    source = source_store()
    archive = io.BytesIO()
    summary = objects.backup_objects(source, archive)
    assert summary.record() == {"avatars": {"objects": 1, "bytes": 104},
                                "health-files": {"objects": 3, "bytes": 4000 + 6 + (3 << 20)}}
    target = FakeS3({"health-files": {"extra/junk": (b"x", {"Content-Type": "text/plain"}, {}),
                                      "reports/p1.pdf": (b"old", {"Content-Type": "text/plain"}, {})},
                     "unrelated": {"keep": (b"k", {"Content-Type": "text/plain"}, {})}})
    archive.seek(0)
    restored = objects.restore_objects(target, archive)
    assert restored.removed == 1 and restored.missing_buckets == ["unrelated"]
    assert restored.record() == summary.record()
    assert normalized(target, ("health-files", "avatars")) == normalized(source, ("health-files", "avatars"))
    assert "keep" in target.buckets["unrelated"]  # a bucket the set does not know is left alone


@pytest.mark.parametrize("damage", ["corrupt", "short"])
def test_a_body_that_disagrees_with_its_headers_is_refused(damage):
    source = source_store()
    getattr(source, damage).add("reports/p1.pdf")
    with pytest.raises(IntegrityError, match="health-files/reports/p1.pdf"):
        objects.backup_objects(source, io.BytesIO())


def test_a_damaged_archive_is_refused_by_the_restore():
    archive = io.BytesIO()
    objects.backup_objects(source_store(), archive)
    data = archive.getvalue()[:1000]  # cut inside the first object's header/data
    with pytest.raises(IntegrityError):
        objects.restore_objects(FakeS3(), io.BytesIO(data))
