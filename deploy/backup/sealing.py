"""Compression (zstd) and encryption at rest (age) for backup artifacts, as constant-memory streams.

Backups push plain bytes into :func:`open_sealed_writer` (``write()`` per SSH chunk); restores pull plain
bytes out of :func:`open_unsealed_reader` (``read(n)`` until ``b""``). Only sealed bytes touch the disk::

    write:  plain -> zstd -> age -> file        read:  file -> age -> zstd -> plain

pyrage only offers *pull* APIs (``encrypt_io``/``decrypt_io`` read from a file-like object until EOF), so
the age stage runs in a helper thread on one end of an ``os.pipe()``; the pipe's fixed capacity is what
keeps memory constant. pyrage holds the GIL while it works (no ``allow_threads``): it gets released at
every pipe read/write (syscalls) and at our Python-level sink/source methods, which keeps other threads
(paramiko's transport thread) running, so those adapters are deliberately Python classes, not raw files.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyrage
import zstandard
from pyrage import ssh as age_ssh
from pyrage import x25519

from deploy.core.errors import HealthdeployError, IntegrityError, UsageError

__all__ = [
    "Sealing", "SealedWriter", "UnsealedReader", "open_sealed_writer", "open_unsealed_reader",
    "parse_recipients", "load_identities", "generate_identity",
]

AGE_MAGIC = b"age-encryption.org/v1"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
IDENTITY_ENV = "BACKUP_AGE_IDENTITY_FILE"
_PIPE_SIZE = 1 << 20  # fewer wake-ups than the default 64 KiB; still a fixed, small amount of kernel memory
_SSH_RECIPIENT_TYPES = ("ssh-ed25519", "ssh-rsa")  # what age (and pyrage) can encrypt to
_ZSTD_LEVELS = range(1, zstandard.MAX_COMPRESSION_LEVEL + 1)


# -- settings and manifest record -------------------------------------------------------------------------
@dataclass(frozen=True)
class Sealing:
    """How one artifact is stored: optionally zstd-compressed, optionally age-encrypted to ``recipients``."""

    compression: str | None = None  # None or "zstd"
    level: int = 3  # zstd level
    recipients: tuple[str, ...] = ()  # age or ssh public keys; empty = no encryption

    def __post_init__(self) -> None:
        if self.compression not in (None, "zstd"):
            raise UsageError(f"unknown compression {self.compression!r}", "use zstd, or none")
        if isinstance(self.level, bool) or not isinstance(self.level, int) or self.level not in _ZSTD_LEVELS:
            raise UsageError(f"invalid zstd level {self.level!r}",
                             f"use an integer from 1 to {_ZSTD_LEVELS[-1]} (3 is a good default)")
        recipients = (self.recipients,) if isinstance(self.recipients, str) else self.recipients
        # Frozen dataclass: normalise once here so equality/hash and record() see the same tuple.
        object.__setattr__(self, "recipients", tuple(str(r).strip() for r in recipients if str(r).strip()))

    @property
    def sealed(self) -> bool:
        """True if the stored bytes differ from the plain stream (compressed and/or encrypted)."""
        return self.compression is not None or bool(self.recipients)

    @property
    def encrypted(self) -> bool:
        return bool(self.recipients)

    def record(self) -> dict:
        """The manifest entry for one artifact. Recipients are public keys: no secret ever goes in here."""
        record: dict = {"compression": self.compression}
        if self.compression == "zstd":
            record["zstd_level"] = self.level
        record["encryption"] = {"scheme": "age", "recipients": list(self.recipients)} if self.recipients else None
        return record

    @classmethod
    def from_record(cls, record: dict) -> Sealing:
        """Inverse of :meth:`record`. A record without these keys (older manifests) means plain."""
        compression = record.get("compression")
        if compression == "engine-native":  # format-1 manifests: the engine's own dump compression, nothing of ours
            compression = None
        level = record.get("zstd_level", 3)
        encryption = record.get("encryption")
        recipients: tuple[str, ...] = ()
        if encryption:
            if not isinstance(encryption, dict) or encryption.get("scheme") != "age":
                scheme = encryption.get("scheme") if isinstance(encryption, dict) else encryption
                raise UsageError(f"unsupported encryption scheme {scheme!r} in the manifest",
                                 "this healthdeploy only knows age; use the version that wrote the set")
            recipients = tuple(encryption.get("recipients") or ())
            if not recipients:
                raise UsageError("the manifest says the artifact is age-encrypted but lists no recipients",
                                 "the manifest is damaged; this set cannot be trusted")
        return cls(compression=compression, level=level, recipients=recipients)

    def suffix(self) -> str:
        """File-name suffix in data-path order, so `zstd -d`/`age -d` can be applied right to left."""
        return (".zst" if self.compression == "zstd" else "") + (".age" if self.recipients else "")


# -- keys --------------------------------------------------------------------------------------------------
def _shorten(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_recipients(texts: Iterable[str] | str) -> list:
    """Turn public-key texts into pyrage recipients; UsageError naming the first bad one.

    Accepts age X25519 keys (``age1...``) and OpenSSH public-key lines (``ssh-ed25519 AAAA... [comment]``,
    ``ssh-rsa ...``). A string is read as one key per line (``#`` comments and blank lines ignored)."""
    if isinstance(texts, str):
        texts = [line for line in texts.splitlines() if not line.strip().startswith("#")]
    parsed = []
    for number, raw in enumerate(texts, start=1):
        text = str(raw).strip()
        if not text:
            continue
        if text.upper().startswith("AGE-SECRET-KEY-") or text.startswith("-----BEGIN"):
            # Never echo it: it is a private key in the wrong place.
            raise UsageError(f"age recipient #{number} is a private key, not a public key",
                             "give the public key instead; `age-keygen -y <identity file>` prints it")
        if text.startswith("age1"):
            try:
                parsed.append(x25519.Recipient.from_str(text))
            except pyrage.RecipientError as exc:
                raise UsageError(f"invalid age recipient '{_shorten(text)}': {exc}",
                                 "an age public key is age1 followed by 58 characters; "
                                 "generate a key pair with `age-keygen`") from None
        elif text.split(None, 1)[0] in _SSH_RECIPIENT_TYPES:
            try:
                parsed.append(age_ssh.Recipient.from_str(text))
            except pyrage.RecipientError:
                raise UsageError(f"invalid ssh recipient '{_shorten(text)}'",
                                 "paste the whole public-key line, e.g. the content of ~/.ssh/id_ed25519.pub") from None
        else:
            raise UsageError(f"'{_shorten(text)}' is not an age or ssh public key",
                             "use an age public key (age1..., generate one with `age-keygen`) "
                             "or an ssh-ed25519 / ssh-rsa public key line")
    return parsed


def load_identities(identity_file: str) -> list:
    """Private keys from an age identity file (``AGE-SECRET-KEY-1...`` lines) or an OpenSSH private key.

    Messages name the file and line, never the key material."""
    path = Path(identity_file).expanduser()
    hint = f"point {IDENTITY_ENV} at a file made by `age-keygen -o <file>` or at an unencrypted OpenSSH private key"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the age identity file {path}: {exc.strerror or exc}", hint) from None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return [age_ssh.Identity.from_buffer(data)]
        except pyrage.IdentityError as exc:
            if "decrypted" in str(exc):
                raise UsageError(f"{path} is a passphrase-protected ssh key", "use an age identity "
                                 "(`age-keygen -o <file>`) or an ssh key without a passphrase") from None
            raise UsageError(f"{path} is not a usable OpenSSH private key", hint) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not an age identity file (not text)", hint) from None
    identities = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("AGE-PLUGIN-"):
            raise UsageError(f"{path} line {number}: age plugin identities are not supported", hint)
        if not line.upper().startswith("AGE-SECRET-KEY-1"):
            raise UsageError(f"{path} line {number}: not an age identity (expected AGE-SECRET-KEY-1...)", hint)
        try:
            identities.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise UsageError(f"{path} line {number}: malformed age identity", hint) from None
    if not identities:
        raise UsageError(f"{path} contains no age identity", hint)
    return identities


def generate_identity() -> tuple[str, str]:
    """A new X25519 key pair: (secret ``AGE-SECRET-KEY-1...``, public ``age1...``)."""
    identity = x25519.Identity.generate()
    return str(identity), str(identity.to_public())


# -- plumbing shared by both directions ----------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside a helper thread to make pyrage give up when the stream is aborted or closed early."""


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: 64 KiB works too
        pass
    return r, w


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _FileSink:
    """Final writer stage: the file on disk, hashing exactly the bytes stored."""

    def __init__(self, fd: int, stop: threading.Event):
        self.fd: int | None = fd
        self.stop = stop
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.error: BaseException | None = None  # kept because pyrage turns it into a bare EncryptError

    def write(self, data) -> int:
        if self.stop.is_set() or self.fd is None:
            raise _Stopped("aborted")
        try:
            _write_all(self.fd, data)
        except BaseException as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class _PipeWriter:
    """Write end of a pipe as a file-like sink (for zstd on the writer side, pyrage on the reader side)."""

    def __init__(self, fd: int, stop: threading.Event | None = None):
        self.fd: int | None = fd
        self.stop = stop
        self.error: BaseException | None = None

    def write(self, data) -> int:
        if self.fd is None or (self.stop is not None and self.stop.is_set()):
            raise _Stopped("closed")
        try:
            _write_all(self.fd, data)
        except BaseException as exc:
            self.error = exc
            raise
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        fd, self.fd = self.fd, None  # forget the number first: it may be reused as soon as it is closed
        if fd is not None:
            os.close(fd)


class _PipeSource:
    """Read end of the writer's pipe, as pyrage's input. EOF after an abort is an error, not an end."""

    def __init__(self, fd: int, stop: threading.Event):
        self.fd = fd
        self.stop = stop

    def read(self, n: int = -1) -> bytes:
        data = os.read(self.fd, n if n and n > 0 else 1 << 16)
        if not data and self.stop.is_set():
            # Without this an aborted backup would end in a well-formed (authenticated) but short age file.
            raise _Stopped("aborted")
        return data


class _FileSource:
    """The sealed file as pyrage's input, remembering I/O errors that pyrage would otherwise flatten."""

    def __init__(self, file, stop: threading.Event):
        self.file = file
        self.stop = stop
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        if self.stop.is_set():
            raise _Stopped("closed")
        try:
            return self.file.read(n)
        except BaseException as exc:
            self.error = exc
            raise


# -- writer ------------------------------------------------------------------------------------------------
class SealedWriter:
    """Push-style writer: plain bytes in, sealed bytes on disk. One thread uses it; not thread-safe."""

    def __init__(self, path: Path, sealing: Sealing):
        self.path = Path(path)
        self.sealing = sealing
        self.stored_bytes: int | None = None  # set by a successful close()
        self.stored_sha256: str | None = None
        # Parse keys before creating anything, so a bad recipient leaves no file behind.
        recipients = parse_recipients(sealing.recipients) if sealing.recipients else []
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._pipe: _PipeWriter | None = None
        self._zstd = None
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._sink = _FileSink(fd, self._stop)
        head = self._sink
        try:
            if recipients:
                r, w = _new_pipe()
                self._pipe = _PipeWriter(w)
                self._thread = threading.Thread(target=self._encrypt, args=(r, recipients),
                                                name=f"healthdeploy-age-encrypt:{self.path.name}", daemon=True)
                self._thread.start()
                head = self._pipe
            if sealing.compression == "zstd":
                # write_checksum: a content checksum lets `zstd -d` and our reader catch corruption.
                compressor = zstandard.ZstdCompressor(level=sealing.level, write_checksum=True)
                self._zstd = compressor.stream_writer(head, closefd=False, write_return_read=True)
                head = self._zstd
        except BaseException:
            self.abort()
            raise
        self._head = head

    def _encrypt(self, r: int, recipients: list) -> None:
        try:
            pyrage.encrypt_io(_PipeSource(r, self._stop), self._sink, recipients)
        except BaseException as exc:  # handed to the writing thread by _failure()
            self._thread_error = exc
        finally:
            os.close(r)  # a writer blocked on a full pipe now gets EPIPE instead of waiting forever

    def write(self, data) -> int:
        if self._closed:
            raise ValueError(f"{self.path}: write to a closed sealed writer")
        try:
            self._head.write(data)
        except BaseException as exc:
            self.abort()
            self._raise_failure(exc)
        return len(data)

    def flush(self) -> None:
        """Push bytes the compressor holds down the pipeline. Only close() completes and fsyncs the file."""
        if self._closed:
            raise ValueError(f"{self.path}: flush of a closed sealed writer")
        if self._zstd is not None:
            try:
                self._zstd.flush(zstandard.FLUSH_BLOCK)
            except BaseException as exc:
                self.abort()
                self._raise_failure(exc)

    def close(self) -> None:
        """Finish the zstd frame and the age stream, fsync, close. Idempotent; no thread survives it."""
        if self._closed:
            return
        try:
            if self._zstd is not None:
                self._zstd.close()  # ends the frame; closefd=False leaves the next stage open
            if self._pipe is not None:
                self._pipe.close()  # EOF for the encryptor: it writes the final chunk and returns
                self._thread.join()
                failure = self._failure()
                if failure is not None:
                    raise failure
            os.fsync(self._sink.fd)
        except BaseException as exc:
            self.abort()
            self._raise_failure(exc)
        self._closed = True
        self._close_file()
        self.stored_bytes = self._sink.bytes
        self.stored_sha256 = self._sink.sha256.hexdigest()

    def abort(self) -> None:
        """Stop without completing the file (it stays, invalid; the caller removes it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()  # the encryptor fails instead of finishing a valid-looking short stream
        if self._pipe is not None:
            self._pipe.close()  # wakes an encryptor blocked reading the pipe
        if self._thread is not None:
            self._thread.join()
        self._close_file()

    def _close_file(self) -> None:
        fd, self._sink.fd = self._sink.fd, None
        if fd is not None:
            os.close(fd)

    def _failure(self) -> BaseException | None:
        """What really went wrong in the encryptor thread (its own exception, or the disk error under it)."""
        if self._sink.error is not None:
            return self._sink.error
        exc = self._thread_error
        if exc is None or isinstance(exc, _Stopped):
            return None
        if isinstance(exc, pyrage.EncryptError):
            return HealthdeployError(f"{self.path}: age encryption failed: {_one_line(exc)}")
        return exc

    def _raise_failure(self, exc: BaseException):
        # A broken pipe only means the encryptor stopped: report why it stopped.
        failure = self._failure() if isinstance(exc, (BrokenPipeError, _Stopped)) else None
        if failure is not None and failure is not exc:
            raise failure from None
        raise exc

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # Last resort only (callers close or abort): never leave a thread or descriptor behind.
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:
                pass


def open_sealed_writer(path: Path, sealing: Sealing) -> SealedWriter:
    """Create ``path`` (O_EXCL, 0600) and return a writer sealing what is written into it."""
    return SealedWriter(path, sealing)


# -- reader ------------------------------------------------------------------------------------------------
class _DecryptedStream:
    """Plain bytes from an age file: pyrage decrypts in a thread into a pipe; read() takes from the pipe."""

    def __init__(self, path: Path, file, identities: list):
        self.path = path
        self._stop = threading.Event()
        self._source = _FileSource(file, self._stop)
        r, w = _new_pipe()
        self._r: int | None = r
        self._sink = _PipeWriter(w, self._stop)
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._decrypt, args=(identities,),
                                        name=f"healthdeploy-age-decrypt:{path.name}", daemon=True)
        self._thread.start()
        # Wait for the first authenticated bytes (or the failure): a wrong key is reported when the
        # file is opened, before a restore has sent anything anywhere.
        self._pending = b""
        try:
            self._pending = self.read(1 << 16)
        except BaseException:
            self.close()
            raise

    def _decrypt(self, identities: list) -> None:
        try:
            pyrage.decrypt_io(self._source, self._sink, identities)
        except BaseException as exc:
            self._error = exc
        finally:
            self._sink.close()  # EOF for the reading side, whatever happened

    def read(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        if self._done or self._r is None:
            return b""
        data = os.read(self._r, n)
        if not data:
            self._finish()
        return data

    def _finish(self) -> None:
        """At pipe EOF: the thread has ended; EOF counts only if pyrage verified the final chunk."""
        self._thread.join()
        self._done = True
        if self._source.error is not None:
            raise self._source.error
        exc = self._error
        if exc is None:
            return
        if isinstance(exc, (pyrage.DecryptError, OSError)):  # OSError('decryption error'): a chunk failed its MAC
            raise IntegrityError(f"{self.path}: cannot decrypt (wrong key or corrupt file): {_one_line(exc)}",
                                 f"check that {IDENTITY_ENV} holds a key for one of the recipients in the manifest; "
                                 "if it does, this file is damaged") from None
        raise exc

    def close(self) -> None:
        if self._r is None:
            return
        self._stop.set()
        r, self._r = self._r, None
        os.close(r)  # a decryptor blocked writing into the pipe gets EPIPE and gives up
        self._thread.join()
        self._done = True


class _ZstdFrameCheck:
    """Follows the block headers of the single zstd frame as its bytes pass by.

    python-zstandard's stream_reader returns a clean EOF for a truncated frame; this tells a complete
    frame (last block + checksum seen) from a cut one without decoding anything (RFC 8878, section 3.1.1)."""

    _NEED = {"magic": 4, "descriptor": 1, "block": 3, "checksum": 4}

    def __init__(self, source):
        self.source = source
        self.trailing = 0  # bytes after the end of the frame
        self._checksum = False
        self._skip = 0  # header fields and block contents we only count
        self._buf = bytearray()
        self._goto("magic")

    @property
    def complete(self) -> bool:
        return self._state == "done" and not self._skip

    @property
    def invalid(self) -> bool:
        return self._state == "invalid"

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if data:
            self._feed(data)
        return data

    def _goto(self, state: str, skip: int = 0) -> None:
        self._state, self._skip = state, skip

    def _feed(self, data: bytes) -> None:
        view, pos = memoryview(data), 0
        while pos < len(view):
            if self._skip:
                step = min(self._skip, len(view) - pos)
                self._skip -= step
                pos += step
            elif self._state == "done":
                self.trailing += len(view) - pos
                return
            elif self._state == "invalid":
                return
            else:
                step = min(self._NEED[self._state] - len(self._buf), len(view) - pos)
                self._buf += view[pos:pos + step]
                pos += step
                if len(self._buf) == self._NEED[self._state]:
                    header = bytes(self._buf)
                    self._buf.clear()
                    self._parse(header)

    def _parse(self, header: bytes) -> None:
        if self._state == "magic":
            self._goto("descriptor" if header == ZSTD_MAGIC else "invalid")
        elif self._state == "descriptor":
            d = header[0]
            single_segment = bool(d & 0x20)
            self._checksum = bool(d & 0x04)
            window = 0 if single_segment else 1
            dict_id = (0, 1, 2, 4)[d & 0x03]
            content_size = (1 if single_segment else 0, 2, 4, 8)[d >> 6]
            self._goto("block", window + dict_id + content_size)
        elif self._state == "block":
            h = int.from_bytes(header, "little")
            last, kind, size = h & 1, (h >> 1) & 3, h >> 3
            if kind == 3:  # reserved block type
                self._goto("invalid")
                return
            body = 1 if kind == 1 else size  # RLE blocks store one byte
            self._goto(("checksum" if self._checksum else "done") if last else "block", body)
        elif self._state == "checksum":
            self._goto("done")


class _DecompressedStream:
    """Plain bytes from a zstd stream, with truncation and trailing garbage reported as IntegrityError."""

    def __init__(self, path: Path, source):
        self.path = path
        self._check = _ZstdFrameCheck(source)
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._check, closefd=False)
        self._done = False

    def read(self, n: int) -> bytes:
        if self._done:
            return b""
        try:
            data = self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.path}: corrupt zstd data: {_one_line(exc)}",
                                 "this file cannot be trusted; use another set") from None
        if not data:
            self._finish()
        return data

    def _finish(self) -> None:
        self._done = True
        if not self._check.complete:
            what = "not zstd data" if self._check.invalid else "truncated zstd data"
            raise IntegrityError(f"{self.path}: {what} (the frame does not end)",
                                 "this file cannot be trusted; use another set")
        # Drain what lies under the frame: for age files this lets the decryptor authenticate the final chunk.
        while self._check.read(1 << 16):
            pass
        if self._check.trailing:
            raise IntegrityError(f"{self.path}: {self._check.trailing} unexpected byte(s) after the zstd frame",
                                 "this file cannot be trusted; use another set")

    def close(self) -> None:
        self._reader.close()


class UnsealedReader:
    """Pull-style reader of the plain bytes of a sealed file. One thread uses it; not thread-safe."""

    def __init__(self, path: Path, sealing: Sealing, identity_file: str | None):
        self.path = Path(path)
        self.sealing = sealing
        self._closed = True  # until the file is open: close()/__del__ have nothing to do before that
        self._eof = False
        self._failed: BaseException | None = None
        self._age: _DecryptedStream | None = None
        self._zstd: _DecompressedStream | None = None
        identities = None
        if sealing.recipients:
            if identity_file is None:
                raise UsageError(f"{self.path} is encrypted with age",
                                 f"set {IDENTITY_ENV} to the file with the private key (AGE-SECRET-KEY-1...)")
            identities = load_identities(identity_file)
        self._file = open(self.path, "rb", buffering=0)  # one syscall per read; pyrage/zstd do their own buffering
        self._closed = False
        try:
            top = self._file
            if identities is not None:
                self._age = top = _DecryptedStream(self.path, self._file, identities)
            if sealing.compression == "zstd":
                self._zstd = top = _DecompressedStream(self.path, top)
        except BaseException:
            self.close()
            raise
        self._top = top

    @property
    def closed(self) -> bool:
        return self._closed

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` plain bytes; ``b""`` only once every layer has verified its end."""
        if self._closed:
            raise ValueError(f"{self.path}: read from a closed reader")
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        if self._failed is not None:  # a failed stream stays failed: never let a later read look like EOF
            raise self._failed
        if n == 0 or self._eof:
            return b""
        try:
            data = self._top.read(n)
        except BaseException as exc:
            self._failed = exc
            raise
        if not data:
            self._eof = True
        return data

    def close(self) -> None:
        """Close, also before EOF: stops the decryptor thread and waits for it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._zstd is not None:
                self._zstd.close()
        finally:
            try:
                if self._age is not None:
                    self._age.close()
            finally:
                self._file.close()

    def __enter__(self) -> UnsealedReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


def open_unsealed_reader(path: Path, sealing: Sealing, identity_file: str | None) -> UnsealedReader:
    """Open a sealed file for reading its plain bytes (file -> age decrypt -> zstd decompress)."""
    return UnsealedReader(path, sealing, identity_file)
