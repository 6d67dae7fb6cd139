"""Sealed artifacts (zstd and/or age at rest): round trips, on-disk formats, key handling, failure modes,
no stray threads, and constant memory on a 256 MiB stream."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from deploy.backup import sealing as sl
from deploy.core.errors import IntegrityError, UsageError
from deploy.backup.sealing import (Sealing, generate_identity, load_identities, open_sealed_writer, open_unsealed_reader,
                            parse_recipients)

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 4 << 20  # what the SSH side hands to write()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(identity file, public key) for an age key pair, plus a second unrelated identity file."""
    directory = tmp_path_factory.mktemp("keys")
    secret, public = generate_identity()
    other_secret, _ = generate_identity()
    good = directory / "identity.txt"
    good.write_text(f"# created by the test\n# public key: {public}\n\n{secret}\n")
    wrong = directory / "other.txt"
    wrong.write_text(other_secret + "\n")
    return str(good), public, str(wrong)


def seal(path: Path, sealing: Sealing, data: bytes, chunk: int = CHUNK) -> sl.SealedWriter:
    with open_sealed_writer(path, sealing) as writer:
        for i in range(0, len(data), chunk):
            assert writer.write(data[i:i + chunk]) == len(data[i:i + chunk])
        writer.flush()
    return writer


def unseal(path: Path, sealing: Sealing, identity: str | None, size: int = 1 << 20) -> bytes:
    parts = []
    with open_unsealed_reader(path, sealing, identity) as reader:
        while chunk := reader.read(size):
            assert len(chunk) <= size
            parts.append(chunk)
        assert reader.read(size) == b""
    return b"".join(parts)


def sealing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("healthdeploy-age")]


def sample(size: int) -> bytes:
    """Part random, part repetitive, so zstd has something to do and nothing lines up with chunk sizes."""
    half = size // 2
    return os.urandom(half) + (b"INSERT INTO t VALUES (1, 'x');\n" * (size // 31 + 1))[:size - half]


COMBINATIONS = [(None, False), ("zstd", False), (None, True), ("zstd", True)]


@pytest.mark.parametrize("compression,encrypted", COMBINATIONS, ids=["plain", "zstd", "age", "zstd+age"])
@pytest.mark.parametrize("size", [0, 1, 65535, 65536 * 3 + 17, CHUNK + 12345, 3 * CHUNK - 1])
def test_round_trip(tmp_path, keys, compression, encrypted, size):
    identity, public, _ = keys
    sealing = Sealing(compression=compression, recipients=(public,) if encrypted else ())
    data = sample(size)
    path = tmp_path / f"dump{sealing.suffix()}"
    writer = seal(path, sealing, data, chunk=CHUNK if size % 2 else 100_003)  # odd write sizes too

    stored = path.read_bytes()
    assert writer.stored_bytes == len(stored)
    assert writer.stored_sha256 == hashlib.sha256(stored).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert unseal(path, sealing, identity if encrypted else None, size=65536 + 7) == data
    if not sealing.sealed:
        assert stored == data
    assert sealing_threads() == []


def test_formats_on_disk_are_standard(tmp_path, keys):
    identity, public, _ = keys
    data = b"hello " * 10000
    seal(tmp_path / "a.zst", Sealing("zstd"), data)
    assert (tmp_path / "a.zst").read_bytes()[:4] == sl.ZSTD_MAGIC
    assert len((tmp_path / "a.zst").read_bytes()) < len(data) // 10
    seal(tmp_path / "a.age", Sealing(recipients=(public,)), data)
    assert (tmp_path / "a.age").read_bytes().startswith(b"age-encryption.org/v1\n")
    seal(tmp_path / "a.zst.age", Sealing("zstd", recipients=(public,)), data)
    sealed = (tmp_path / "a.zst.age").read_bytes()
    assert sealed.startswith(b"age-encryption.org/v1\n") and len(sealed) < len(data) // 10
    # zstd inside age: decrypting with the plain age API yields a zstd frame
    import pyrage
    inner = pyrage.decrypt(sealed, load_identities(identity))
    assert inner[:4] == sl.ZSTD_MAGIC


def test_record_suffix_and_from_record():
    plain = Sealing()
    assert not plain.sealed and plain.suffix() == ""
    assert plain.record() == {"compression": None, "encryption": None}
    full = Sealing("zstd", level=9, recipients=["age1abc", " ssh-ed25519 AAAA x "])
    assert full.recipients == ("age1abc", "ssh-ed25519 AAAA x") and full.sealed
    assert full.suffix() == ".zst.age" and Sealing("zstd").suffix() == ".zst"
    assert Sealing(recipients=("age1abc",)).suffix() == ".age"
    record = full.record()
    assert record == {"compression": "zstd", "zstd_level": 9,
                      "encryption": {"scheme": "age", "recipients": ["age1abc", "ssh-ed25519 AAAA x"]}}
    assert Sealing.from_record(json.loads(json.dumps(record))) == full
    assert Sealing.from_record(plain.record()) == plain
    assert Sealing.from_record({"file": "postgres.dump", "sha256": "00"}) == plain  # artifacts of older manifests
    with pytest.raises(UsageError, match="unsupported encryption scheme"):
        Sealing.from_record({"encryption": {"scheme": "gpg"}})
    with pytest.raises(UsageError, match="unknown compression"):
        Sealing(compression="gzip")
    with pytest.raises(UsageError, match="zstd level"):
        Sealing("zstd", level=40)


def test_file_is_created_exclusively(tmp_path):
    (tmp_path / "x").write_bytes(b"already here")
    with pytest.raises(FileExistsError):
        open_sealed_writer(tmp_path / "x", Sealing("zstd"))
    assert (tmp_path / "x").read_bytes() == b"already here"


def test_wrong_identity_is_an_integrity_error_at_open(tmp_path, keys):
    _, public, wrong = keys
    sealing = Sealing("zstd", recipients=(public,))
    seal(tmp_path / "a", sealing, sample(300_000))
    with pytest.raises(IntegrityError, match=r"cannot decrypt \(wrong key or corrupt file\)") as info:
        open_unsealed_reader(tmp_path / "a", sealing, wrong)
    assert str(tmp_path / "a") in info.value.message and "\n" not in info.value.message
    assert sealing_threads() == []


def test_missing_identity_is_a_usage_error(tmp_path, keys):
    _, public, _ = keys
    sealing = Sealing(recipients=(public,))
    seal(tmp_path / "a", sealing, b"data")
    with pytest.raises(UsageError, match="is encrypted with age") as info:
        open_unsealed_reader(tmp_path / "a", sealing, None)
    assert "BACKUP_AGE_IDENTITY_FILE" in info.value.hint
    with pytest.raises(UsageError, match="cannot read the age identity file"):
        open_unsealed_reader(tmp_path / "a", sealing, str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_flipped_byte_in_an_encrypted_file(tmp_path, keys, compression, where):
    identity, public, _ = keys
    sealing = Sealing(compression, recipients=(public,))
    path = tmp_path / "a"
    seal(path, sealing, os.urandom(700_000))
    stored = bytearray(path.read_bytes())
    stored[{"header": 40, "middle": len(stored) // 2, "end": len(stored) - 3}[where]] ^= 0x01
    path.write_bytes(bytes(stored))
    with pytest.raises(IntegrityError, match="cannot decrypt"):
        unseal(path, sealing, identity)
    assert sealing_threads() == []


def test_truncated_encrypted_file(tmp_path, keys):
    identity, public, _ = keys
    sealing = Sealing(recipients=(public,))
    path = tmp_path / "a"
    seal(path, sealing, os.urandom(300_000))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="cannot decrypt"):
        unseal(path, sealing, identity)


def test_corrupt_truncated_or_padded_zstd(tmp_path):
    sealing = Sealing("zstd")
    path = tmp_path / "a.zst"
    seal(path, sealing, sample(1_000_000))
    good = path.read_bytes()
    for damaged, message in [(good[:-1], "truncated zstd"), (good[:len(good) // 2], "truncated zstd"),
                             (good + b"junk", "zstd"), (good + good, "after the zstd frame"),
                             (b"not zstd at all", "zstd"),
                             (good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:], "zstd"), (b"", "truncated zstd")]:
        path.write_bytes(damaged)
        with pytest.raises(IntegrityError, match=message):
            unseal(path, sealing, None)


def test_a_failed_reader_stays_failed(tmp_path):
    path = tmp_path / "a.zst"
    seal(path, Sealing("zstd"), sample(200_000))
    path.write_bytes(path.read_bytes()[:-1])
    reader = open_unsealed_reader(path, Sealing("zstd"), None)
    with pytest.raises(IntegrityError):
        while reader.read(1 << 20):
            pass
    with pytest.raises(IntegrityError):  # never a clean-looking EOF afterwards
        reader.read(1 << 20)
    reader.close()


@pytest.mark.parametrize("text,message", [
    ("age1notakey", "invalid age recipient 'age1notakey'"),
    ("ssh-ed25519 AAAAnotbase64", "invalid ssh recipient"),
    ("ssh-dss AAAAB3NzaC1kc3M", "is not an age or ssh public key"),
    ("hello", "'hello' is not an age or ssh public key"),
])
def test_bad_recipient_is_a_usage_error(tmp_path, text, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_recipients([text])
    assert "\n" not in info.value.message and info.value.hint
    with pytest.raises(UsageError):  # also refused by the writer, before any file exists
        open_sealed_writer(tmp_path / "a", Sealing(recipients=(text,)))
    assert not (tmp_path / "a").exists()


def test_private_key_given_as_recipient_is_not_echoed():
    secret, _ = generate_identity()
    with pytest.raises(UsageError, match="is a private key") as info:
        parse_recipients([secret])
    assert secret not in info.value.message and secret[16:30] not in str(info.value.lines())


def test_parse_recipients_accepts_lists_and_text(keys):
    _, public, _ = keys
    assert len(parse_recipients([public, public])) == 2
    assert len(parse_recipients(f"# team keys\n{public}\n\n")) == 1
    assert parse_recipients([]) == []


def test_bad_identity_files(tmp_path):
    secret, _ = generate_identity()
    cases = {
        "empty.txt": ("# only a comment\n\n", "contains no age identity"),
        "public.txt": ("age1qqqq\n", "line 1: not an age identity"),
        "broken.txt": (f"# ok\n{secret[:-4]}XXXX\n", "line 2: malformed age identity"),
        "binary.bin": (b"\xff\xfe\x00", "not an age identity file"),
        "bad.pem": ("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
                    "not a usable OpenSSH private key"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(UsageError, match=message) as info:
            load_identities(str(path))
        assert secret[16:] not in info.value.message
    with pytest.raises(UsageError, match="cannot read"):
        load_identities(str(tmp_path / "missing"))


def test_ssh_ed25519_recipient_round_trip(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode() + " backup@ops"
    (tmp_path / "id_ed25519").write_bytes(private)
    sealing = Sealing("zstd", recipients=(public,))
    data = sample(2_000_000)
    seal(tmp_path / "a", sealing, data)
    assert (tmp_path / "a").read_bytes().startswith(b"age-encryption.org/v1\n-> ssh-ed25519 ")
    assert unseal(tmp_path / "a", sealing, str(tmp_path / "id_ed25519")) == data

    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                               serialization.BestAvailableEncryption(b"passphrase"))
    (tmp_path / "locked").write_bytes(locked)
    with pytest.raises(UsageError, match="passphrase-protected"):
        load_identities(str(tmp_path / "locked"))


def test_several_recipients_each_can_decrypt(tmp_path):
    pairs = [generate_identity() for _ in range(2)]
    sealing = Sealing(recipients=tuple(public for _, public in pairs))
    seal(tmp_path / "a", sealing, b"shared secret data")
    for i, (secret, _) in enumerate(pairs):
        (tmp_path / f"id{i}").write_text(secret)
        assert unseal(tmp_path / "a", sealing, str(tmp_path / f"id{i}")) == b"shared secret data"


def run_with_timeout(action, seconds: float = 20.0):
    """Run ``action`` in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(action()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "deadlocked"
    return outcome[0] if outcome else None


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_reader_closed_early_does_not_hang(tmp_path, keys, compression):
    identity, public, _ = keys
    sealing = Sealing(compression, recipients=(public,))
    seal(tmp_path / "a", sealing, os.urandom(16 << 20))  # far more than the pipe holds

    def read_a_little_then_close():
        reader = open_unsealed_reader(tmp_path / "a", sealing, identity)
        assert len(reader.read(1000)) > 0
        reader.close()
        reader.close()  # idempotent
        return reader.closed

    assert run_with_timeout(read_a_little_then_close) is True
    assert sealing_threads() == []


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_writer_exception_leaves_no_thread_and_no_valid_file(tmp_path, keys, compression):
    identity, public, _ = keys
    sealing = Sealing(compression, recipients=(public,))

    def fail_midway():
        with pytest.raises(RuntimeError):
            with open_sealed_writer(tmp_path / "a", sealing) as writer:
                writer.write(os.urandom(3 << 20))
                raise RuntimeError("ssh channel died")
        return writer

    writer = run_with_timeout(fail_midway)
    assert sealing_threads() == [] and writer.stored_sha256 is None
    assert (tmp_path / "a").exists()  # the caller removes the partial directory
    with pytest.raises(IntegrityError):  # an aborted stream never reads as a complete, shorter one
        unseal(tmp_path / "a", sealing, identity)
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_disk_error_in_the_encryptor_reaches_the_caller(tmp_path, keys, monkeypatch):
    _, public, _ = keys
    calls = {"n": 0}
    real_write = sl._FileSink.write

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            error = OSError(28, "No space left on device")
            self.error = error
            raise error
        return real_write(self, data)

    monkeypatch.setattr(sl._FileSink, "write", failing_write)

    def write_lots():
        writer = open_sealed_writer(tmp_path / "a", Sealing("zstd", recipients=(public,)))
        with pytest.raises(OSError, match="No space left") as info:
            for _ in range(64):
                writer.write(os.urandom(1 << 20))
            writer.close()
        assert not isinstance(info.value, BrokenPipeError)
        writer.close()  # already aborted: a no-op, not a hang
        return True

    assert run_with_timeout(write_lots)
    assert sealing_threads() == []


MEMORY_SCRIPT = r"""
import hashlib, json, os, resource, sys, tempfile, time
from pathlib import Path
from deploy.backup.sealing import Sealing, generate_identity, open_sealed_writer, open_unsealed_reader
TOTAL, CHUNK = 256 << 20, 4 << 20
text = b"".join(b"INSERT INTO readings VALUES (%d, 'patient', 120, 80);\n" % i for i in range(40000))
block = (os.urandom(CHUNK // 4).hex().encode() + text)[:CHUNK]  # dump-like: compresses about 3.7x
secret, public = generate_identity()
directory = Path(tempfile.mkdtemp(dir=sys.argv[1]))
(directory / "identity").write_text(secret + "\n")
sealing = Sealing("zstd", level=3, recipients=(public,))
path = directory / ("dump" + sealing.suffix())
plain = hashlib.sha256()
started = time.perf_counter()
with open_sealed_writer(path, sealing) as writer:
    for i in range(TOTAL // CHUNK):
        chunk = i.to_bytes(8, "big") + block[8:]
        plain.update(chunk)
        writer.write(chunk)
    writer.flush()
write_seconds = time.perf_counter() - started
back, size = hashlib.sha256(), 0
started = time.perf_counter()
with open_unsealed_reader(path, sealing, str(directory / "identity")) as reader:
    while chunk := reader.read(1 << 20):
        back.update(chunk)
        size += len(chunk)
read_seconds = time.perf_counter() - started
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"same": size == TOTAL and back.digest() == plain.digest(), "stored": writer.stored_bytes,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vmhwm_mb": hwm_kb / 1024,
                  "write_mb_s": TOTAL / write_seconds / 1e6, "read_mb_s": TOTAL / read_seconds / 1e6}))
"""


def test_256_mib_zstd_age_stream_in_constant_memory(tmp_path):
    # Through sh, which forks the interpreter: Linux carries the pre-exec address space's peak into
    # ru_maxrss, so a child vforked straight from pytest would report pytest's own RSS.
    command = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    print(f"\n256 MiB zstd-3+age: peak RSS {figures['maxrss_mb']:.1f} MB (VmHWM {figures['vmhwm_mb']:.1f}), "
          f"write {figures['write_mb_s']:.0f} MB/s, "
          f"read {figures['read_mb_s']:.0f} MB/s, stored {figures['stored'] / 2**20:.1f} MiB")
    assert figures["same"]
    # The stream is 256 MiB: anything buffering it whole (or its compressed/encrypted form) would blow this.
    assert figures["maxrss_mb"] < 150 and figures["vmhwm_mb"] < 150
