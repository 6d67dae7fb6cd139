"""Which backup sets a retention policy keeps (pure): last N, one per day/week/month for N periods,
and never the newest verified set."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    last: int = 7
    daily: int = 7
    weekly: int = 4
    monthly: int = 6


@dataclass(frozen=True)
class BackupSet:
    name: str
    finished: dt.datetime
    verified: bool


def keep(sets: list[BackupSet], policy: Policy) -> dict[str, str]:
    """``{set name: reason}`` for every set to keep; the others may be deleted."""
    ordered = sorted(sets, key=lambda s: s.finished, reverse=True)
    reasons: dict[str, list[str]] = {}

    def mark(s: BackupSet, why: str) -> None:
        reasons.setdefault(s.name, []).append(why)

    for s in ordered[: policy.last]:
        mark(s, "last")
    for label, count, bucket in (
        ("daily", policy.daily, lambda t: t.date()),
        ("weekly", policy.weekly, lambda t: tuple(t.isocalendar())[:2]),
        ("monthly", policy.monthly, lambda t: (t.year, t.month)),
    ):
        seen = []
        for s in ordered:  # newest first: the newest set of each period represents it
            key = bucket(s.finished)
            if key in seen:
                continue
            seen.append(key)
            if len(seen) > count:
                break
            mark(s, label)
    verified = [s for s in ordered if s.verified]
    if verified:
        mark(verified[0], "newest verified")
    return {name: ",".join(why) for name, why in reasons.items()}
