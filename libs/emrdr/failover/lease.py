"""The coordinator lease: one key in a JetStream KV bucket with a TTL.

* :meth:`Lease.acquire` writes the key with ``kv.create`` (refused while someone holds it).
* :meth:`Lease.renew` rewrites it with ``kv.update(last=revision)``: compare-and-set, so a
  holder whose key expired or was taken over learns it has lost the lease.
* The bucket's ``ttl`` (max age) deletes an unrenewed key; a standby's ``acquire`` then wins.
* :attr:`Lease.epoch` is the KV revision of the write that acquired the lease. Revisions are
  stream sequence numbers, so a later term always has a higher epoch: the fencing token every
  action carries (:mod:`emrdr.failover.fencing` checks it at PostgreSQL).

Acknowledged NATS writes can be lost in server failures, so the lease only prevents duplicate
work; fencing at PostgreSQL is what makes a stale coordinator harmless.

    lease = Lease(kv, holder="coordinator-a", ttl=10)
    stop = asyncio.Event()
    asyncio.create_task(lease.run(stop, on_change=print))
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

__all__ = ["Lease", "LeaseError", "LeaseRecord", "StaleLeaseError"]

log = logging.getLogger(__name__)

OnChange = Callable[[bool, str], Awaitable[None] | None]


class LeaseError(RuntimeError):
    """The lease could not be read or written (bus unavailable)."""


class StaleLeaseError(LeaseError):
    """An action carried an epoch that is not the current lease's."""


@dataclass(frozen=True)
class LeaseRecord:
    """The lease as stored: who holds it and since which epoch."""

    holder: str
    epoch: int
    revision: int
    acquired_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "epoch": self.epoch, "acquired_at": self.acquired_at}
        ).encode()


def _decode(value: bytes | None, revision: int) -> LeaseRecord:
    try:
        data: dict[str, Any] = json.loads(value or b"{}")
        return LeaseRecord(
            holder=str(data["holder"]),
            epoch=int(data.get("epoch") or revision),
            revision=revision,
            acquired_at=float(data.get("acquired_at") or 0.0),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise LeaseError(
            f"lease value at revision {revision} is not a lease record: {exc}"
        ) from exc


_BUS_ERRORS = (NatsError, asyncio.TimeoutError, OSError)


class Lease:
    """One holder's view of the coordinator lease in ``kv`` under ``key``."""

    def __init__(
        self,
        kv: KeyValue,
        holder: str,
        *,
        key: str = "coordinator",
        ttl: float = 10.0,
        renew_every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.kv = kv
        self.holder = holder
        self.key = key
        self.ttl = ttl
        self.renew_every = renew_every if renew_every is not None else ttl / 3
        self._clock = clock
        self._epoch: int | None = None
        self._revision: int | None = None
        self._written_at: float | None = None
        """Local clock just before the last successful write (a conservative expiry base)."""

    def __repr__(self) -> str:
        return f"Lease(holder={self.holder!r}, key={self.key!r}, epoch={self._epoch})"

    # --- state ----------------------------------------------------------------------------
    @property
    def epoch(self) -> int | None:
        """The fencing token of the current term (None when not held)."""
        return self._epoch if self.is_held() else None

    @property
    def revision(self) -> int | None:
        return self._revision

    def is_held(self) -> bool:
        """Held and, by the local clock, renewed less than ``ttl`` ago."""
        return (
            self._revision is not None
            and self._written_at is not None
            and self._clock() - self._written_at < self.ttl
        )

    def _lose(self) -> None:
        self._epoch = None
        self._revision = None
        self._written_at = None

    async def current(self) -> LeaseRecord | None:
        """Who holds the lease now, read from the bucket (None when free)."""
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:  # also covers a deleted key
            return None
        except _BUS_ERRORS as exc:
            raise LeaseError(f"cannot read lease {self.key!r}: {exc!r}") from exc
        if entry.revision is None:
            return None
        return _decode(entry.value, entry.revision)

    # --- operations -----------------------------------------------------------------------
    async def acquire(self) -> bool:
        """Take the lease if it is free; True when this holder now holds it.

        Returns True without writing if this object already holds it (renew instead).
        """
        if self.is_held():
            return True
        started = self._clock()
        value = json.dumps({"holder": self.holder, "acquired_at": time.time()}).encode()
        try:
            revision = await self.kv.create(self.key, value)
        except KeyWrongLastSequenceError:
            self._lose()
            return False
        except _BUS_ERRORS as exc:
            self._lose()
            raise LeaseError(f"cannot acquire lease {self.key!r}: {exc!r}") from exc
        self._epoch = revision
        self._revision = revision
        self._written_at = started
        log.info("lease %s acquired by %s, epoch %d", self.key, self.holder, revision)
        return True

    async def renew(self) -> bool:
        """Extend the lease by compare-and-set; False (and not held) if it was lost meanwhile."""
        if self._revision is None or self._epoch is None:
            return False
        started = self._clock()
        record = LeaseRecord(self.holder, self._epoch, self._revision, time.time())
        try:
            revision = await self.kv.update(self.key, record.to_bytes(), last=self._revision)
        except KeyWrongLastSequenceError:
            log.warning("lease %s lost by %s (epoch %d)", self.key, self.holder, self._epoch)
            self._lose()
            return False
        except _BUS_ERRORS as exc:
            # Unknown outcome: keep believing until the local TTL runs out, then let go.
            if not self.is_held():
                self._lose()
            raise LeaseError(f"cannot renew lease {self.key!r}: {exc!r}") from exc
        self._revision = revision
        self._written_at = started
        return True

    async def release(self) -> None:
        """Give the lease up (only if still ours: compare-and-set delete)."""
        revision = self._revision
        self._lose()
        if revision is None:
            return
        try:
            await self.kv.delete(self.key, last=revision)
        except KeyWrongLastSequenceError:
            pass  # already someone else's
        except _BUS_ERRORS as exc:
            raise LeaseError(f"cannot release lease {self.key!r}: {exc!r}") from exc

    async def check(self, epoch: int) -> None:
        """Refuse a stale actor: raise :class:`StaleLeaseError` unless ``epoch`` is the current
        lease's epoch in the bucket."""
        record = await self.current()
        if record is None:
            raise StaleLeaseError(f"epoch {epoch} refused: the lease {self.key!r} is not held")
        if record.epoch != epoch:
            raise StaleLeaseError(
                f"epoch {epoch} refused: the lease {self.key!r} is at epoch {record.epoch}, "
                f"held by {record.holder}"
            )

    async def run(self, stop: asyncio.Event, on_change: OnChange | None = None) -> None:
        """Campaign and renew until ``stop`` is set; call ``on_change(held, reason)`` on each
        change. Releases the lease on the way out."""
        held = False

        async def changed(now_held: bool, reason: str) -> None:
            nonlocal held
            if now_held == held:
                return
            held = now_held
            log.info("lease %s: %s", self.key, reason)
            if on_change is not None:
                result = on_change(now_held, reason)
                if inspect.isawaitable(result):
                    await result

        try:
            while not stop.is_set():
                try:
                    who = self.holder
                    if self._revision is None:
                        if await self.acquire():
                            await changed(True, f"{who} acquired the lease, epoch {self._epoch}")
                    elif not await self.renew():
                        await changed(False, f"{who} lost the lease (taken over or expired)")
                    elif not held:
                        await changed(True, f"{who} holds the lease, epoch {self._epoch}")
                except LeaseError as exc:
                    if not self.is_held():
                        await changed(False, f"{self.holder} cannot reach the bus: {exc}")
                if not self.is_held() and held:
                    await changed(False, f"{self.holder}'s lease ran out by the local clock")
                delay = self.renew_every if self._revision is not None else self.renew_every / 2
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            if self._revision is not None:
                try:
                    await self.release()
                except LeaseError as exc:
                    log.warning("could not release lease %s: %s", self.key, exc)
            await changed(False, f"{self.holder} released the lease")
