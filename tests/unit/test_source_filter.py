"""The payload filter: .deployignore (gitignore syntax via pathspec) and the built-in refusal of files that
look like secrets, before anything connects; release file modes."""

from __future__ import annotations

import io
import tarfile

import pytest

from deploy.core.errors import ExitCode, UsageError
from deploy.stack import payload as pl
from deploy.stack.sourcefilter import secret_reason


def tree(root, files: dict[str, bytes | str]):
    for path, data in files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


@pytest.mark.parametrize("path,head,why", [
    (".env", b"", "env file"), ("config/.env.production", b"", "env file"), ("certs/server.pem", b"", "PEM"),
    ("tls/server.key", b"", "private key"), ("id_rsa", b"", "SSH private key"), ("keys/id_ed25519", b"", "SSH"),
    ("deploy_key", b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn", "contains a private key"),
    ("store.p12", b"", "PKCS#12"), ("store.pfx", b"", "PKCS#12"), ("vault.kdbx", b"", "KeePass"),
    ("home/.aws/credentials", b"", "AWS"), ("gcp/credentials.json", b"", "cloud"),
    (".npmrc", b"//registry.npmjs.org/:_authToken=npm_abc", "token"), (".pypirc", b"[pypi]\npassword = pypi-x", "token"),
    ("infra/prod.tfstate", b"", "Terraform"), (".git-credentials", b"", "git credentials"),
])
def test_files_that_look_like_secrets(path, head, why):
    assert why in (secret_reason(path, head) or "")


@pytest.mark.parametrize("path,head", [
    (".env.example", b"DB_PASSWORD="), ("id_rsa.pub", b"ssh-ed25519 AAAA"), ("src/id_utils.py", b"def f(): pass"),
    (".npmrc", b"registry=https://registry.npmjs.org/"), ("README.md", b"# app"), ("app/environment.ts", b""),
])
def test_ordinary_files_pass(path, head):
    assert secret_reason(path, head) is None


def test_a_secret_looking_file_stops_the_collection_and_is_named(tmp_path):
    root = tree(tmp_path / "app", {"app.py": "print(1)", "backend/.env.production": "DB_PASSWORD=x",
                                   "certs/ca.pem": "-----BEGIN CERTIFICATE-----"})
    with pytest.raises(UsageError) as err:
        pl.collect_source(str(root))
    assert err.value.exit_code == ExitCode.USAGE
    line = err.value.lines()
    assert len(line) == 1 and "\n" not in line[0]
    assert "backend/.env.production (env file)" in line[0] and "certs/ca.pem" in line[0]
    assert ".deployignore" in line[0] and "DEPLOY_ALLOW" in line[0]


def test_deployignore_leaves_files_out_and_allow_ships_them(tmp_path):
    root = tree(tmp_path / "app", {
        "app.py": "print(1)", "backend/.env.production": "DB_PASSWORD=x", "certs/ca.pem": "CERT",
        "docs/big.bin": b"\0" * 10, "docs/keep.md": "keep", "tmp/x.log": "log", "a/tmp/y.txt": "y",
        ".deployignore": "# comments and gitignore syntax\n.env*\ndocs/*\n!docs/keep.md\n/tmp/\n",
    })
    files = pl.collect_source(str(root), allow=("certs/*.pem",))
    assert set(files) == {"src/app.py", "src/certs/ca.pem", "src/docs/keep.md", "src/a/tmp/y.txt"}


def test_env_file_no_longer_skipped_silently(tmp_path):
    root = tree(tmp_path / "app", {"app.py": "", ".env": "SECRET=1"})
    with pytest.raises(UsageError, match=r"\.env \(env file\)"):
        pl.collect_source(str(root))


def test_release_tar_modes_are_0640():
    data = pl.tar_of({"a/b.txt": b"x", "c": b"y"}, ["a/b.txt", "c"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert {m.name: oct(m.mode) for m in tar.getmembers()} == {"a/b.txt": "0o640", "c": "0o640"}


def test_mkdirs_gives_parents_the_mode_too():
    from deploy.commands.files import mkdirs

    line = mkdirs("/srv/x/releases", mode="0750").render()
    assert "umask \"$1\"" in line and " 027 0750 /srv/x/releases" in line
