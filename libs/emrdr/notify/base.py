"""The notifier interface and the message every channel sends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Delivery", "Notice", "Notifier", "notify_all"]

Severity = Literal["info", "warning", "critical", "emergency"]
Channel = Literal["email", "webhook", "page"]


@dataclass(frozen=True)
class Notice:
    """What staff are told: a one-line subject, a body, and facts for machines."""

    subject: str
    body: str
    severity: Severity = "critical"
    kind: str = "failover"
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Delivery:
    """The outcome of one channel's attempt."""

    channel: Channel
    recipients: tuple[str, ...]
    delivered: bool
    detail: str


class Notifier(Protocol):
    """One way of telling people."""

    channel: Channel

    async def send(self, notice: Notice) -> Delivery:
        """Deliver ``notice``; never raises for delivery problems (returns delivered=False)."""
        ...


async def notify_all(notifiers: Sequence[Notifier], notice: Notice) -> list[Delivery]:
    """Send ``notice`` through every notifier concurrently; one result per notifier."""
    if not notifiers:
        return []
    return list(await asyncio.gather(*(n.send(notice) for n in notifiers)))
