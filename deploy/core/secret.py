"""A value that must never be printed, logged or put on a command line."""

from __future__ import annotations


class Secret:
    """Wraps a sensitive string. ``str()``/``repr()``/f-strings show ``***``; ``reveal()`` is explicit.

    Command builders refuse ``Secret`` arguments (see ``commands.base``), so a secret can only reach a
    host as file content sent over the SSH channel's stdin (the 0600 env file).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "***"

    __repr__ = lambda self: "Secret('***')"  # noqa: E731

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self):  # refuse pickling into logs/caches by accident
        raise TypeError("Secret values cannot be pickled")


def redact(text: str, secrets: list[Secret] | tuple[Secret, ...]) -> str:
    """Replace every secret value found in ``text`` by ``***`` (for output that came from a remote host)."""
    from urllib.parse import quote

    for secret in secrets:
        value = secret.reveal()
        if len(value) >= 4:  # short values would redact ordinary words
            # Also the percent-encoded form: passwords sit encoded inside DATABASE_URL and MONGO_URI.
            for form in {value, quote(value, safe="")}:
                text = text.replace(form, "***")
    return text
