"""MinIO objects through the S3 API, over an SSH tunnel to the object store's loopback port on the host.

Backup: every bucket's objects, with their metadata (content type, cache/encoding/disposition/language
headers, user ``x-amz-meta-*``, tags), into ONE streamed PAX tar:

    healthdeploy-s3/buckets.json           the bucket names, first (so a restore can create them)
    objects/<bucket>/<key>                 one member per object; its PAX headers carry bucket, key,
                                           ETag and the metadata (the member name is only a label)
    healthdeploy-s3/summary.json           objects and bytes per bucket, last

Each object's bytes are checked against what the server said: the byte count against Content-Length and,
for a single-part upload, the MD5 against its ETag. Memory stays constant: objects are copied in 1 MiB
pieces (a restore's upload holds at most a few 5 MiB parts).

The client is the MinIO SDK (minio-py, also correct for any S3 API such as the sandbox's SeaweedFS); its
HTTP connections are SSH channels handed over by ``open_socket``, so no local port is opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import urllib3
from minio import Minio
from minio.commonconfig import Tags
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from deploy.core.errors import HealthdeployError, IntegrityError

PAX = "HEALTHDEPLOY.s3."
BUCKETS_MEMBER = "healthdeploy-s3/buckets.json"
SUMMARY_MEMBER = "healthdeploy-s3/summary.json"
KEPT_HEADERS = ("content-type", "cache-control", "content-encoding", "content-disposition", "content-language")
PIECE = 1 << 20


def client_over(open_socket: Callable[[], object], endpoint: str, access_key: str, secret_key: str,
                timeout: float = 60) -> Minio:
    """An S3 client whose every HTTP connection is ``open_socket()`` (an SSH channel or a plain socket)."""

    class ChannelConnection(urllib3.connection.HTTPConnection):
        def _new_conn(self):
            return open_socket()

    class ChannelPool(urllib3.HTTPConnectionPool):
        ConnectionCls = ChannelConnection

    pool = urllib3.PoolManager(
        num_pools=2, maxsize=4, timeout=urllib3.Timeout(connect=timeout, read=timeout),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    pool.pool_classes_by_scheme = {"http": ChannelPool, "https": ChannelPool}
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False, http_client=pool)


@dataclass
class BucketTotals:
    objects: int = 0
    bytes: int = 0


@dataclass
class ObjectsSummary:
    buckets: dict[str, BucketTotals] = field(default_factory=dict)
    removed: int = 0
    missing_buckets: list[str] = field(default_factory=list)  # restore: live buckets the set does not have

    def record(self) -> dict:
        return {name: {"objects": t.objects, "bytes": t.bytes} for name, t in sorted(self.buckets.items())}

    @property
    def objects(self) -> int:
        return sum(t.objects for t in self.buckets.values())

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.buckets.values())


class _HashingReader:
    """Reads an HTTP body for tarfile in bounded pieces while taking its MD5 (compared with the ETag)."""

    def __init__(self, body):
        self.body, self.md5 = body, hashlib.md5(usedforsecurity=False)

    def read(self, size: int = -1) -> bytes:
        data = self.body.read(PIECE if size is None or size < 0 else min(size, PIECE))
        self.md5.update(data)
        return data


def _json_member(tar: tarfile.TarFile, name: str, payload: dict) -> None:
    data = json.dumps(payload, indent=1, sort_keys=True).encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    tar.addfile(info, io.BytesIO(data))


def _s3_error(action: str, exc: S3Error) -> HealthdeployError:
    return HealthdeployError(f"S3 {action}: {exc.code}: {exc.message}",
                             "check MINIO_USER/MINIO_PASSWORD and that the object store is healthy")


def backup_objects(client: Minio, out: BinaryIO, progress: Callable[[int], None] | None = None) -> ObjectsSummary:
    """Write every bucket's objects with their metadata as one tar stream into ``out``."""
    summary = ObjectsSummary()
    total = 0
    from deploy.plan.restore import is_staging_name

    try:
        # The staging and previous buckets of a restore that did not end are not the application's data.
        buckets = sorted(b.name for b in client.list_buckets() if not is_staging_name(b.name))
    except S3Error as exc:
        raise _s3_error("list buckets", exc) from None
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _json_member(tar, BUCKETS_MEMBER, {"buckets": buckets})
        for bucket in buckets:
            totals = summary.buckets.setdefault(bucket, BucketTotals())
            try:
                for entry in client.list_objects(bucket, recursive=True):  # paged lazily: memory stays flat
                    if entry.is_dir:
                        continue
                    total += _copy_object(client, tar, bucket, entry.object_name, totals)
                    if progress:
                        progress(total)
            except S3Error as exc:
                raise _s3_error(f"read {bucket}", exc) from None
        _json_member(tar, SUMMARY_MEMBER, {"buckets": summary.record()})
    return summary


def _copy_object(client: Minio, tar: tarfile.TarFile, bucket: str, key: str, totals: BucketTotals) -> int:
    response = client.get_object(bucket, key)
    try:
        headers = {k.lower(): v for k, v in response.headers.items()}
        size = int(headers["content-length"])
        etag = headers.get("etag", "").strip('"')
        kept = {k: v for k, v in headers.items() if k in KEPT_HEADERS or k.startswith("x-amz-meta-")}
        tags = {}
        if int(headers.get("x-amz-tagging-count", "0") or 0):
            tags = dict(client.get_object_tags(bucket, key) or {})
        body = _HashingReader(response)
        info = tarfile.TarInfo(f"objects/{bucket}/{key}")
        info.size, info.mode = size, 0o600
        info.pax_headers = {PAX + "bucket": bucket, PAX + "key": key, PAX + "etag": etag,
                            PAX + "headers": json.dumps(kept, sort_keys=True),
                            **({PAX + "tags": json.dumps(tags, sort_keys=True)} if tags else {})}
        # tarfile copies exactly `size` bytes and raises if the body ends early.
        tar.addfile(info, body)
        if body.read(1):
            raise IntegrityError(f"S3 object {bucket}/{key} is longer than its Content-Length", "run the backup again")
    except OSError as exc:
        raise IntegrityError(f"S3 object {bucket}/{key}: {exc}", "the object changed or the stream broke; run it again") from None
    finally:
        response.close()
        response.release_conn()
    if etag and "-" not in etag and len(etag) == 32 and body.md5.hexdigest() != etag:
        raise IntegrityError(f"S3 object {bucket}/{key}: MD5 {body.md5.hexdigest()} differs from its ETag {etag}",
                             "the stream was corrupted; run the backup again")
    totals.objects += 1
    totals.bytes += size
    return size


def restore_objects(client: Minio, source: BinaryIO, progress: Callable[[int], None] | None = None,
                    bucket_of: Callable[[str], str] | None = None) -> ObjectsSummary:
    """Put every object of the archive back (overwriting) with its metadata, create missing buckets, and
    remove objects of the archived buckets that the archive does not have. Buckets the archive does not
    know are left alone and reported.

    ``bucket_of`` maps an archived bucket to the bucket it is loaded into (a staging bucket beside the live
    one); the summary is kept under the archived names."""
    bucket_of = bucket_of or (lambda name: name)
    summary = ObjectsSummary()
    keys: dict[str, set[str]] = {}
    total = 0
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            for member in tar:
                if member.name == BUCKETS_MEMBER:
                    for bucket in json.load(tar.extractfile(member))["buckets"]:
                        keys.setdefault(bucket, set())
                        summary.buckets.setdefault(bucket, BucketTotals())
                        if not client.bucket_exists(bucket_of(bucket)):
                            client.make_bucket(bucket_of(bucket))
                    continue
                if PAX + "key" not in member.pax_headers:
                    continue
                bucket, key = member.pax_headers[PAX + "bucket"], member.pax_headers[PAX + "key"]
                headers = json.loads(member.pax_headers.get(PAX + "headers", "{}"))
                tags = json.loads(member.pax_headers.get(PAX + "tags", "{}"))
                object_tags = None
                if tags:
                    object_tags = Tags(for_object=True)
                    object_tags.update(tags)
                content_type = headers.pop("content-type", "application/octet-stream")
                if bucket not in keys and not client.bucket_exists(bucket_of(bucket)):
                    client.make_bucket(bucket_of(bucket))
                client.put_object(bucket_of(bucket), key, tar.extractfile(member), member.size, content_type=content_type,
                                  metadata=headers or None, tags=object_tags, num_parallel_uploads=1)
                keys.setdefault(bucket, set()).add(key)
                totals = summary.buckets.setdefault(bucket, BucketTotals())
                totals.objects += 1
                totals.bytes += member.size
                total += member.size
                if progress:
                    progress(total)
        for bucket, wanted in keys.items():
            summary.removed += _remove_others(client, bucket_of(bucket), wanted)
        loaded = {bucket_of(b) for b in keys}
        summary.missing_buckets = sorted(b.name for b in client.list_buckets() if b.name not in loaded)
    except S3Error as exc:
        raise _s3_error("restore", exc) from None
    except tarfile.TarError as exc:
        raise IntegrityError(f"the object archive is not a readable tar: {exc}", "this set cannot be trusted") from None
    return summary


def _remove_others(client: Minio, bucket: str, wanted: set[str]) -> int:
    """Remove the objects of ``bucket`` whose keys are not in ``wanted``; how many."""
    extra = [o.object_name for o in client.list_objects(bucket, recursive=True)
             if not o.is_dir and o.object_name not in wanted]
    for error in client.remove_objects(bucket, (DeleteObject(k) for k in extra)):
        raise HealthdeployError(f"S3 remove {bucket}/{error.name}: {error.code}: {error.message}",
                                "remove it by hand or run the restore again")
    return len(extra)


COPY_LIMIT = 5 << 30  # S3 CopyObject copies up to 5 GiB; larger objects are copied by parts (ComposeObject)


def sync_bucket(client: Minio, source: str, target: str) -> BucketTotals:
    """Make ``target`` hold exactly the objects of ``source`` (server-side copies, metadata and tags kept,
    nothing through this machine); objects of ``target`` that ``source`` lacks are removed."""
    from minio.commonconfig import ComposeSource, CopySource

    totals = BucketTotals()
    wanted: set[str] = set()
    try:
        if not client.bucket_exists(target):
            client.make_bucket(target)
        for entry in client.list_objects(source, recursive=True):
            if entry.is_dir:
                continue
            key = entry.object_name
            if (entry.size or 0) > COPY_LIMIT:
                stat = client.stat_object(source, key)
                headers = {k: v for k, v in stat.metadata.items()
                           if k.lower() in KEPT_HEADERS[1:] or k.lower().startswith("x-amz-meta-")}
                tags = client.get_object_tags(source, key)
                client.compose_object(target, key, [ComposeSource(source, key)], metadata=headers or None, tags=tags)
            else:
                client.copy_object(target, key, CopySource(source, key))
            wanted.add(key)
            totals.objects += 1
            totals.bytes += entry.size or 0
        _remove_others(client, target, wanted)
    except S3Error as exc:
        raise _s3_error(f"copy {source} to {target}", exc) from None
    return totals


def remove_bucket(client: Minio, bucket: str) -> None:
    """Remove ``bucket`` and every object in it (staging and previous copies of a restore); absent is fine."""
    try:
        if not client.bucket_exists(bucket):
            return
        _remove_others(client, bucket, set())
        client.remove_bucket(bucket)
    except S3Error as exc:
        raise _s3_error(f"remove bucket {bucket}", exc) from None


def list_bucket_names(client: Minio) -> list[str]:
    try:
        return sorted(b.name for b in client.list_buckets())
    except S3Error as exc:
        raise _s3_error("list buckets", exc) from None


def count_objects(client: Minio, buckets: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Objects and bytes per bucket (all, or ``buckets``), as the server lists them (the drill's comparison)."""
    counted = {}
    try:
        for bucket in sorted(b.name for b in client.list_buckets()) if buckets is None else buckets:
            objects = [o for o in client.list_objects(bucket, recursive=True) if not o.is_dir]
            counted[bucket] = {"objects": len(objects), "bytes": sum(o.size or 0 for o in objects)}
    except S3Error as exc:
        raise _s3_error("list", exc) from None
    return counted
