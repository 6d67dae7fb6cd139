import datetime as dt

from deploy.plan.retention import BackupSet, Policy, keep

T0 = dt.datetime(2026, 11, 28, 3, 0, tzinfo=dt.timezone.utc)


def sets_every(hours: int, count: int, verified_at=()):
    return [BackupSet(f"s{i:03d}", T0 - dt.timedelta(hours=hours * i), i in verified_at) for i in range(count)]


def test_last_n_and_one_per_period():
    sets = sets_every(12, 200)  # two a day for 100 days
    kept = keep(sets, Policy(last=3, daily=5, weekly=3, monthly=2))
    assert {"s000", "s001", "s002"} <= set(kept)
    days = {s.finished.date() for s in sets if s.name in kept}
    assert len(days) >= 5
    assert len(kept) < 20


def test_the_newest_verified_set_is_never_deleted():
    sets = sets_every(24, 60, verified_at={45})
    kept = keep(sets, Policy(last=1, daily=1, weekly=1, monthly=1))
    assert kept["s045"] == "newest verified"


def test_nothing_deleted_when_within_policy():
    sets = sets_every(24, 3)
    assert set(keep(sets, Policy())) == {"s000", "s001", "s002"}
