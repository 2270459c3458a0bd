"""Which slots of a schedule to fire now: a pure decision with a plain-sentence reason.

Catch-up after downtime follows the configured policy:

- ``skip``: fire none of the missed slots, only a slot due right now (within ``grace``);
- ``latest``: fire only the most recent due slot (the current one if there is one);
- ``all``: fire every due slot, at most ``max_catch_up`` (the most recent ones), skip the rest.

A schedule that has never fired starts from ``started_at``: slots before the process started
are history, not work, so a first start never fires a burst.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from emrdr.config import ScheduleEntry
from emrdr.messages.base import Command, Issuer
from emrdr.messages.commands import (
    EnforceRetention,
    RotateKeys,
    StartBackup,
    StartVerification,
)
from emrdr.schedule.slots import slots_between

__all__ = [
    "DEFAULT_GRACE",
    "SCHEDULE_NAMESPACE",
    "CatchUpPolicy",
    "Decision",
    "command_for",
    "decide",
    "dedup_id",
    "fmt_slot",
]

CatchUpPolicy = Literal["skip", "latest", "all"]

DEFAULT_GRACE = timedelta(seconds=60)

# uuid5 namespace of scheduled commands: replicas derive identical ids from the dedup id.
SCHEDULE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:emrdr:schedule")


@dataclass(frozen=True)
class Decision:
    """Slots to fire now and slots given up on, with the reason in one sentence."""

    fire: list[datetime] = field(default_factory=list)
    skipped: list[datetime] = field(default_factory=list)
    reason: str = ""

    @property
    def handled(self) -> datetime | None:
        """The latest slot this decision disposes of (fired or skipped), if any."""
        slots = self.fire + self.skipped
        return max(slots) if slots else None


def fmt_slot(slot: datetime) -> str:
    """``2026-11-26T02:00Z``: a slot in UTC to the minute."""
    return f"{slot.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def dedup_id(schedule_name: str, slot: datetime) -> str:
    """The Nats-Msg-Id of the command of ``slot``: equal on every replica."""
    return f"schedule:{schedule_name}:{fmt_slot(slot)}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def decide(
    schedule_name: str,
    entry: ScheduleEntry,
    last_fired: datetime | None,
    now: datetime,
    policy: CatchUpPolicy,
    max_catch_up: int,
    started_at: datetime,
    *,
    tz: str = "UTC",
    grace: timedelta = DEFAULT_GRACE,
) -> Decision:
    """Decide which slots of ``entry`` to fire at ``now``.

    ``last_fired`` is the latest slot already handled (None if never); a slot is *current* when
    ``now`` is at most ``grace`` past it, otherwise it was *missed*.
    """
    if max_catch_up < 1:
        raise ValueError(f"max_catch_up must be at least 1, got {max_catch_up}")
    if not entry.enabled:
        return Decision(reason=f"schedule {schedule_name!r} is disabled")
    first_run = last_fired is None
    baseline = started_at if last_fired is None else last_fired
    due = slots_between(entry.cron, tz, baseline, now)
    if not due:
        if first_run:
            return Decision(
                reason=(
                    f"first run: no slot recorded; past slots are not fired, "
                    f"waiting for the first slot after {fmt_slot(baseline)}"
                )
            )
        return Decision(reason=f"no slot due since {fmt_slot(baseline)}")
    current = due[-1] if now - due[-1] <= grace else None
    missed = due[:-1] if current is not None else due
    if not missed:
        assert current is not None
        return Decision(fire=[current], reason=f"fired 1 slot: {fmt_slot(current)}")
    head = f"missed {_plural(len(missed), 'slot')} while down; policy {policy!r}"
    if policy == "skip":
        if current is not None:
            return Decision(
                fire=[current],
                skipped=missed,
                reason=f"{head} fires current slot {fmt_slot(current)}, skips {len(missed)}",
            )
        return Decision(skipped=missed, reason=f"{head} fires none, skips {len(missed)}")
    if policy == "latest":
        latest = due[-1]
        skipped = due[:-1]
        what = "current slot " if current is not None else ""
        return Decision(
            fire=[latest],
            skipped=skipped,
            reason=f"{head} fires {what}{fmt_slot(latest)}, skips {len(skipped)}",
        )
    if policy == "all":
        fire = due[-max_catch_up:]
        skipped = due[: len(due) - len(fire)]
        span = (
            fmt_slot(fire[0]) if len(fire) == 1 else f"{fmt_slot(fire[0])} to {fmt_slot(fire[-1])}"
        )
        reason = f"{head} fires {_plural(len(fire), 'slot')} ({span})"
        if skipped:
            reason += f", skips {len(skipped)} (max_catch_up {max_catch_up})"
        return Decision(fire=fire, skipped=skipped, reason=reason)
    raise ValueError(f"unknown catch-up policy {policy!r}; expected 'skip', 'latest' or 'all'")


_COMMANDS: dict[str, tuple[type[Command], dict[str, object]]] = {
    "backup_full": (StartBackup, {"kind": "full"}),
    "backup_incremental": (StartBackup, {"kind": "incremental"}),
    "verify": (StartVerification, {"backup_id": "latest"}),
    "retention": (EnforceRetention, {}),
    "key_rotation": (RotateKeys, {}),
}


def command_for(name: str, entry: ScheduleEntry, slot: datetime, issuer: Issuer) -> Command:
    """The command ``entry`` fires for ``slot``: identical on every replica (ids are uuid5 of the
    dedup id; the command starts its piece of work, so its correlation id is its own id)."""
    try:
        cls, extra = _COMMANDS[entry.command]
    except KeyError:
        raise ValueError(f"schedule {name!r}: unknown command {entry.command!r}") from None
    ident = uuid.uuid5(SCHEDULE_NAMESPACE, dedup_id(name, slot))
    return cls.model_validate(
        {
            "event_id": ident,
            "correlation_id": ident,
            "occurred_at": slot.astimezone(UTC),
            "issuer": issuer,
            "schedule": name,
            **extra,
        }
    )
