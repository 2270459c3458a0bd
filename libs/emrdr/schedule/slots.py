"""Cron slots: which instants a five-field cron expression names, in a given time zone.

Expressions are evaluated on the wall clock of ``tz`` and each slot is returned as an aware UTC
datetime. Daylight-saving transitions:

- a wall-clock time that does not exist (skipped by spring-forward, e.g. 02:30 in Europe/Berlin
  on the last Sunday of March) fires once, at the instant that time would have had with the
  offset in force before the change -- one hour later on the wall clock (03:30);
- a wall-clock time that occurs twice (fall-back) fires once, at its first occurrence;
- two wall-clock times that land on the same instant (e.g. 02:30 and 03:30 on spring-forward day)
  yield one slot.

Each slot is thus a pure function of the expression and the zone, so every replica computes the
same UTC instants.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

__all__ = ["CronError", "slots_between", "validate_cron", "zone"]

# Largest UTC offset change of any zone's DST transition (a few zones shifted by two hours).
_DST_MARGIN = timedelta(hours=3)


class CronError(ValueError):
    """A schedule's cron expression or time zone cannot be used; the message names both."""


def zone(tz: str) -> ZoneInfo:
    """The IANA time zone named ``tz``; raises :class:`CronError` naming it if unknown."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"unknown time zone {tz!r}: {exc}") from None


def validate_cron(cron: str, schedule: str = "?") -> None:
    """Raise :class:`CronError` naming ``schedule`` and ``cron`` unless it is a valid five-field
    expression that matches at least one time."""
    fields = cron.split()
    if len(fields) != 5:
        raise CronError(
            f"schedule {schedule!r}: cron expression {cron!r} has {len(fields)} field(s); "
            "expected five (minute hour day-of-month month day-of-week)"
        )
    try:
        croniter(cron, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterError as exc:
        raise CronError(f"schedule {schedule!r}: invalid cron expression {cron!r}: {exc}") from None


def _to_utc(wall: datetime, tzinfo: ZoneInfo) -> datetime:
    """Wall-clock time in ``tzinfo`` -> UTC, with the rules in the module docstring (fold=0)."""
    return wall.replace(tzinfo=tzinfo, fold=0).astimezone(UTC)


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}")


def slots_between(cron: str, tz: str, after: datetime, until: datetime) -> list[datetime]:
    """Slots of ``cron`` (evaluated in ``tz``) in ``(after, until]``, as sorted aware UTC
    datetimes without duplicates."""
    _require_aware("after", after)
    _require_aware("until", until)
    validate_cron(cron)
    tzinfo = zone(tz)
    if until <= after:
        return []
    # Iterate naive wall-clock times with a margin on both sides, because around a DST change
    # the wall-clock order and the UTC order of instants differ by up to the offset change.
    start = after.astimezone(tzinfo).replace(tzinfo=None) - _DST_MARGIN
    stop = until.astimezone(tzinfo).replace(tzinfo=None) + _DST_MARGIN
    it = croniter(cron, start)
    found: set[datetime] = set()
    while True:
        wall: datetime = it.get_next(datetime)
        if wall > stop:
            break
        instant = _to_utc(wall, tzinfo)
        if after < instant <= until:
            found.add(instant)
    return sorted(found)
