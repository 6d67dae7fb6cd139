"""Credentials inside a source URL (``https://user:token@host/repo.git``): split off, never shown or stored."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from deploy.core.secret import Secret


@dataclass(frozen=True)
class UrlCredentials:
    """The user and token of an http(s) URL. The token is a ``Secret``; the user is not."""

    username: str
    token: Secret

    def stdin(self) -> bytes:
        """Two lines a remote script reads with ``read -r``: how the credentials cross the SSH channel."""
        return f"{self.username}\n{self.token.reveal()}\n".encode()


def split_credentials(url: str) -> tuple[str, UrlCredentials | None]:
    """(the URL without user info, the credentials it carried). Only http(s) URLs carry a token this way;
    ``git@host:repo`` and ``ssh://git@host/repo`` name an SSH user, which is no secret, and stay as they are."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    userinfo = parts.netloc.rpartition("@")[0]
    user, sep, token = userinfo.partition(":")
    if not sep:  # https://TOKEN@host/...: the only part given is the token (GitHub, GitLab style)
        user, token = "", user
    if not token:
        return clean, (UrlCredentials(unquote(user), Secret("")) if user else None)
    return clean, UrlCredentials(unquote(user) or "git", Secret(unquote(token)))


def display_url(url: str) -> str:
    """The URL without credentials (a token in https://user:token@host/... must not be printed or stored)."""
    return split_credentials(url)[0]


def url_secrets(url: str) -> tuple[Secret, ...]:
    """The token of ``url`` as written and decoded (redaction then also covers its percent-encoded form)."""
    parts = urlsplit(url) if url else None
    if parts is None or parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return ()
    userinfo = parts.netloc.rpartition("@")[0]
    user, sep, token = userinfo.partition(":")
    written = token if sep else user
    if not written:
        return ()
    return tuple(dict.fromkeys(Secret(v) for v in (unquote(written), written)))
