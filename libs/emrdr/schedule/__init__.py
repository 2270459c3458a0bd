"""Scheduling: cron slots, the catch-up decision, and the replica-safe scheduler loop."""

from emrdr.schedule.decide import (
    CatchUpPolicy,
    Decision,
    command_for,
    decide,
    dedup_id,
    fmt_slot,
)
from emrdr.schedule.runner import Scheduler, SlotRecord, TickResult
from emrdr.schedule.slots import CronError, slots_between, validate_cron, zone

__all__ = [
    "CatchUpPolicy",
    "CronError",
    "Decision",
    "Scheduler",
    "SlotRecord",
    "TickResult",
    "command_for",
    "decide",
    "dedup_id",
    "fmt_slot",
    "slots_between",
    "validate_cron",
    "zone",
]
