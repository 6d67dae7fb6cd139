"""Which files of a local application source may be shipped: ``.deployignore`` plus built-in refusals.

Pure apart from nothing: the caller reads the tree; this decides. Patterns use gitignore syntax through
``pathspec`` (the same library black, mypy and many build tools use for .gitignore), so ``.deployignore``
means exactly what a ``.gitignore`` with the same lines would.

A file that *looks like a secret* (an env file, a private key, a keystore, a cloud credential file, an
``.npmrc``/``.pypirc`` holding a token, ...) stops the deploy before any connection, unless
``.deployignore`` leaves it out (it is then not shipped) or ``DEPLOY_ALLOW`` names it (it is shipped as it is).
See docs/security.md ("The payload filter").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pathspec

DEPLOYIGNORE = ".deployignore"

# (gitignore pattern, why it looks like a secret). Without a slash a pattern matches at any depth.
SECRET_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (".env", "env file"),
    (".env.*", "env file"),
    ("*.pem", "PEM key or certificate"),
    ("*.key", "private key"),
    ("*.p12", "PKCS#12 keystore"),
    ("*.pfx", "PKCS#12 keystore"),
    ("*.jks", "Java keystore"),
    ("*.keystore", "keystore"),
    ("*.kdbx", "KeePass database"),
    ("id_rsa", "SSH private key"),
    ("id_dsa", "SSH private key"),
    ("id_ecdsa", "SSH private key"),
    ("id_ed25519", "SSH private key"),
    ("id_ecdsa_sk", "SSH private key"),
    ("id_ed25519_sk", "SSH private key"),
    ("**/.aws/credentials", "AWS credentials"),
    ("credentials.json", "cloud credentials"),
    ("service-account*.json", "cloud service account key"),
    ("application_default_credentials.json", "cloud credentials"),
    ("**/.docker/config.json", "registry credentials"),
    (".netrc", "login credentials"),
    ("_netrc", "login credentials"),
    (".git-credentials", "git credentials"),
    (".htpasswd", "password file"),
    ("*.tfstate", "Terraform state (holds secrets)"),
    ("*.tfstate.backup", "Terraform state (holds secrets)"),
)

# Names that match the patterns above but are templates by convention (no values in them).
TEMPLATE_SUFFIXES = (".example", ".sample", ".template", ".dist", ".tmpl")

# Only flagged when the content holds a credential: these files are often committed without one.
TOKEN_FILES = {".npmrc": re.compile(rb"(_authToken|_auth|_password)\s*=", re.I),
               ".pypirc": re.compile(rb"^\s*password\s*[=:]", re.I | re.M),
               ".yarnrc.yml": re.compile(rb"npmAuthToken\s*:", re.I)}

PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
PUBLIC_SUFFIXES = (".pub", ".crt.pub")


@dataclass(frozen=True)
class Refusal:
    path: str  # relative to the source root, posix
    why: str

    def __str__(self) -> str:
        return f"{self.path} ({self.why})"


def spec_of(lines: list[str] | tuple[str, ...]) -> pathspec.PathSpec:
    return pathspec.GitIgnoreSpec.from_lines(lines)


_SECRET_SPECS = tuple((spec_of([pattern]), why) for pattern, why in SECRET_NAME_PATTERNS)


def secret_reason(path: str, head: bytes) -> str | None:
    """Why ``path`` (relative, posix) with content starting ``head`` looks like a secret, or None."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith(TEMPLATE_SUFFIXES) or name.endswith(PUBLIC_SUFFIXES):
        return None
    for spec, why in _SECRET_SPECS:
        if spec.match_file(path):
            return why
    token = TOKEN_FILES.get(name)
    if token is not None:
        return f"{name} with a token" if token.search(head) else None
    if PRIVATE_KEY.search(head):
        return "contains a private key"
    return None


class SourceFilter:
    """``ignored(path)``: left out by .deployignore; ``allowed(path)``: named by DEPLOY_ALLOW."""

    def __init__(self, deployignore: str = "", allow: tuple[str, ...] | list[str] = ()):
        self.ignore = spec_of(deployignore.splitlines())
        self.allow = spec_of(list(allow))

    def ignored(self, path: str, is_dir: bool = False) -> bool:
        return bool(self.ignore.match_file(path + "/" if is_dir else path))

    def allowed(self, path: str) -> bool:
        return bool(self.allow.match_file(path))
