"""Backup sets that prove their origin: the manifest is signed with the operator's Ed25519 key.

The signature is an OpenSSH signature (PROTOCOL.sshsig, namespace ``healthdeploy-backup``, SHA-512) in
``manifest.json.sig`` beside the manifest, made and checked in-process with ``cryptography`` (already a
dependency; no ssh-keygen subprocess, no version differences between operators' machines). The format is
the one ``ssh-keygen -Y sign`` writes, so a set can also be checked by hand:

    ssh-keygen -Y verify -f ALLOWED_SIGNERS -I healthdeploy-backup -n healthdeploy-backup \
        -s manifest.json.sig < manifest.json

Keys are standard OpenSSH ed25519 keys (``inv backup.keygen --signing`` or ``ssh-keygen -t ed25519``); the
allowed signers file holds the public keys that may sign (``principal ssh-ed25519 AAAA...`` lines, as
ssh-keygen's allowed_signers, or bare public key lines).

The manifest records every artifact's size and SHA-256, so signing it covers the whole set.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deploy.core.errors import IntegrityError, UsageError

NAMESPACE = "healthdeploy-backup"
SIGNATURE_FILE = "manifest.json.sig"
PRINCIPAL = "healthdeploy-backup"
_MAGIC = b"SSHSIG"
_BEGIN, _END = "-----BEGIN SSH SIGNATURE-----", "-----END SSH SIGNATURE-----"


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_string(data: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(data):
        raise ValueError("truncated")
    (length,) = struct.unpack(">I", data[offset:offset + 4])
    end = offset + 4 + length
    if end > len(data):
        raise ValueError("truncated")
    return data[offset + 4:end], end


def _public_blob(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _string(b"ssh-ed25519") + _string(raw)


def fingerprint(public: Ed25519PublicKey) -> str:
    digest = hashlib.sha256(_public_blob(public)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _signed_data(message: bytes) -> bytes:
    return (_MAGIC + _string(NAMESPACE.encode()) + _string(b"") + _string(b"sha512")
            + _string(hashlib.sha512(message).digest()))


def generate_keypair() -> tuple[bytes, str]:
    """(OpenSSH private key file content, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " healthdeploy-backup-signing"


def write_keypair(private_path: str, allowed_signers_path: str | None = None) -> str:
    """A new key pair: the private key to ``private_path`` (0600, never overwritten); its public key appended
    to ``allowed_signers_path`` (``healthdeploy-backup <key>``) when given. Returns the public key line."""
    private, public = generate_keypair()
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{private_path} already exists", "choose another path; an existing key is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"cannot write {private_path}: {exc.strerror}", "choose a writable path") from None
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    if allowed_signers_path:
        path = Path(allowed_signers_path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "a") as out:
            out.write(f"{PRINCIPAL} {public}\n")
    return public


def load_private_key(path: str) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the backup signing key {path}: {exc.strerror}",
                         "set BACKUP_SIGNING_KEY to the operator's private key; `inv backup.keygen --signing` makes one") from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted ed25519 private key ({exc})",
                         "use a key without passphrase kept on the operator's machine only, or make one with "
                         "`inv backup.keygen --signing`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an ed25519 key", "make one with `inv backup.keygen --signing`")
    return key


def load_allowed_signers(path: str) -> list[Ed25519PublicKey]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read BACKUP_ALLOWED_SIGNERS {path}: {exc.strerror}",
                         "set it to a file of the public keys that may sign backups") from None
    keys = []
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        for index, word in enumerate(words[:-1]):
            if word == "ssh-ed25519":
                try:
                    keys.append(serialization.load_ssh_public_key(f"ssh-ed25519 {words[index + 1]}".encode()))
                except (ValueError, TypeError):
                    pass
                break
    if not keys:
        raise UsageError(f"BACKUP_ALLOWED_SIGNERS {path} has no ssh-ed25519 public key",
                         "add the operator's public key (the line `inv backup.keygen --signing` prints)")
    return keys


def sign(message: bytes, key: Ed25519PrivateKey) -> str:
    """An armored OpenSSH signature of ``message`` (what ``ssh-keygen -Y sign -n healthdeploy-backup`` makes)."""
    raw = key.sign(_signed_data(message))
    blob = (_MAGIC + struct.pack(">I", 1) + _string(_public_blob(key.public_key())) + _string(NAMESPACE.encode())
            + _string(b"") + _string(b"sha512") + _string(_string(b"ssh-ed25519") + _string(raw)))
    text = base64.b64encode(blob).decode()
    return "\n".join([_BEGIN, *[text[i:i + 70] for i in range(0, len(text), 70)], _END]) + "\n"


def verify(message: bytes, armored: str, allowed: list[Ed25519PublicKey]) -> str:
    """The signer's fingerprint if ``armored`` is a valid signature of ``message`` by an allowed key; else
    ValueError naming why."""
    text = armored.strip()
    if not (text.startswith(_BEGIN) and text.endswith(_END)):
        raise ValueError("not an SSH signature")
    blob = base64.b64decode("".join(text[len(_BEGIN):-len(_END)].split()))
    if not blob.startswith(_MAGIC) or struct.unpack(">I", blob[6:10])[0] != 1:
        raise ValueError("not an SSHSIG version 1 signature")
    public_blob, offset = _read_string(blob, 10)
    namespace, offset = _read_string(blob, offset)
    _reserved, offset = _read_string(blob, offset)
    hash_name, offset = _read_string(blob, offset)
    signature, offset = _read_string(blob, offset)
    if namespace.decode() != NAMESPACE:
        raise ValueError(f"signed for namespace {namespace.decode()!r}, not {NAMESPACE!r}")
    key_type, rest = _read_string(public_blob, 0)
    if key_type != b"ssh-ed25519":
        raise ValueError(f"signed with a {key_type.decode()} key; only ssh-ed25519 is accepted")
    raw_public, _ = _read_string(public_blob, rest)
    public = Ed25519PublicKey.from_public_bytes(raw_public)
    if not any(_public_blob(k) == public_blob for k in allowed):
        raise ValueError(f"signed by {fingerprint(public)}, which is not in BACKUP_ALLOWED_SIGNERS")
    sig_type, rest = _read_string(signature, 0)
    raw_signature, _ = _read_string(signature, rest)
    if sig_type != b"ssh-ed25519" or hash_name not in (b"sha512", b"sha256"):
        raise ValueError("unsupported signature algorithm")
    data = (_MAGIC + _string(NAMESPACE.encode()) + _string(b"") + _string(hash_name)
            + _string(hashlib.new(hash_name.decode(), message).digest()))
    try:
        public.verify(raw_signature, data)
    except InvalidSignature:
        raise ValueError(f"the signature by {fingerprint(public)} does not match the manifest (changed after signing)") from None
    return fingerprint(public)


def sign_set(path: Path, key_file: str) -> str:
    """Write ``manifest.json.sig`` for the set at ``path``; returns the signer's fingerprint."""
    key = load_private_key(key_file)
    armored = sign((path / "manifest.json").read_bytes(), key)
    fd = os.open(path / SIGNATURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(armored)
        out.flush()
        os.fsync(out.fileno())
    return fingerprint(key.public_key())


def verify_set(path: Path, allowed_signers_file: str) -> str:
    """The signer of the set at ``path``, or IntegrityError (exit 8): unsigned, signed by a key not allowed,
    or a manifest changed after signing. Reads only the manifest and its signature."""
    allowed = load_allowed_signers(allowed_signers_file)
    signature = path / SIGNATURE_FILE
    if not signature.is_file():
        raise IntegrityError(f"{path.name} is not signed (no {SIGNATURE_FILE})",
                             "restore only sets made with BACKUP_SIGNING_KEY; an unsigned set cannot prove its origin")
    try:
        return verify((path / "manifest.json").read_bytes(), signature.read_text(), allowed)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path.name}: the manifest signature is not valid: {exc}",
                             "this set cannot be trusted; use another") from None
