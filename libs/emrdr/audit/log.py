"""The audit chain stored in the AUDIT JetStream stream: appending, reading, exporting.

Appends are optimistic: each publish carries ``Nats-Expected-Last-Sequence`` so the server
refuses an entry built on a stale tail (two writers can never fork the chain), and
``Nats-Msg-Id`` so a redelivered source message is stored once (within the stream's
duplicate window).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError
from pydantic import ValidationError

from emrdr.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    entry_for_malformed,
    entry_from_message,
    malformed_digest,
)
from emrdr.bus.topology import AUDIT_ENTRY_SUBJECT, AUDIT_STREAM
from emrdr.messages.base import Message

log = logging.getLogger(__name__)

EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
MSG_ID = "Nats-Msg-Id"
WRONG_LAST_SEQUENCE = 10071  # JetStream error code of a failed Nats-Expected-Last-Sequence

EntryBuilder = Callable[[int, str], AuditEntry]


class AuditAppendError(RuntimeError):
    """An entry could not be appended (after the allowed retries)."""


class AuditReadError(RuntimeError):
    """A stored entry or an export line is not a valid audit entry."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def is_wrong_last_sequence(exc: APIError) -> bool:
    return exc.err_code == WRONG_LAST_SEQUENCE or "wrong last sequence" in (exc.description or "")


def decode_entry(data: bytes | str, position: int) -> AuditEntry:
    try:
        return AuditEntry.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "entry"
        raise AuditReadError(
            position, f"entry {position}: not a valid audit entry: {where}: {first.get('msg')}"
        ) from None


class AuditWriter:
    """Appends entries to the end of the chain; safe against concurrent writers."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str = AUDIT_STREAM,
        subject: str = AUDIT_ENTRY_SUBJECT,
        max_attempts: int = 50,
        timeout: float = 5.0,
    ) -> None:
        self._js = js
        self._stream = stream
        self._subject = subject
        self._max_attempts = max_attempts
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._started = False
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._next_index = 0

    @property
    def next_index(self) -> int:
        return self._next_index

    @property
    def last_hash(self) -> str:
        return self._last_hash

    async def start(self) -> None:
        """Load the tail of the stream (empty stream: genesis)."""
        async with self._lock:
            await self._load_tail()

    async def _load_tail(self) -> None:
        """Pin the stream's last sequence, then read the entry at (or before) it."""
        for _ in range(self._max_attempts):
            info = await self._js.stream_info(self._stream)
            last_seq = info.state.last_seq
            if info.state.messages == 0:
                self._set_tail(last_seq, GENESIS_HASH, 0)
                return
            try:
                raw = await self._js.get_msg(self._stream, seq=last_seq)
            except NotFoundError:
                raw = None
            if raw is None or raw.subject != self._subject:
                # The last message is not an entry: find the last entry by subject.  One newer
                # than last_seq means another writer appended meanwhile: read again.
                try:
                    raw = await self._js.get_last_msg(self._stream, self._subject)
                except NotFoundError:
                    self._set_tail(last_seq, GENESIS_HASH, 0)
                    return
                if raw.seq is not None and raw.seq > last_seq:
                    continue
            entry = decode_entry(raw.data or b"", position=-1)
            self._set_tail(last_seq, entry.hash, entry.index + 1)
            return
        raise AuditAppendError(f"stream {self._stream} keeps moving; could not read its tail")

    def _set_tail(self, last_seq: int, last_hash: str, next_index: int) -> None:
        self._last_seq, self._last_hash, self._next_index = last_seq, last_hash, next_index
        self._started = True

    async def append(self, build: EntryBuilder, msg_id: str) -> AuditEntry:
        """Append ``build(index, prev_hash)``; retried on a moved tail.

        Returns the stored entry: for a duplicate ``msg_id``, the one stored earlier.
        """
        async with self._lock:
            if not self._started:
                await self._load_tail()
            for attempt in range(self._max_attempts):
                entry = build(self._next_index, self._last_hash)
                headers = {EXPECTED_LAST_SEQ: str(self._last_seq), MSG_ID: msg_id}
                try:
                    ack = await self._js.publish(
                        self._subject,
                        entry.to_json().encode(),
                        timeout=self._timeout,
                        stream=self._stream,
                        headers=headers,
                    )
                except APIError as exc:
                    if not is_wrong_last_sequence(exc):
                        raise
                    log.debug("audit tail moved (attempt %d); reloading", attempt + 1)
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                    await self._load_tail()
                    continue
                if ack.duplicate:
                    return await self._stored_entry(ack.seq)
                self._set_tail(ack.seq, entry.hash, entry.index + 1)
                return entry
        raise AuditAppendError(
            f"could not append audit entry {msg_id} after {self._max_attempts} attempts: "
            "other writers keep moving the tail"
        )

    async def _stored_entry(self, seq: int) -> AuditEntry:
        raw = await self._js.get_msg(self._stream, seq=seq)
        return decode_entry(raw.data or b"", position=-1)

    async def append_message(self, msg: Message, subject: str | None = None) -> AuditEntry:
        """Record a decoded command or event; stored once per ``event_id``."""

        def build(index: int, prev_hash: str) -> AuditEntry:
            return entry_from_message(msg, index, prev_hash, subject=subject)

        return await self.append(build, f"audit:{msg.event_id}")

    async def append_malformed(
        self, subject: str, raw: bytes, reason: str, source: str = "unknown"
    ) -> AuditEntry:
        """Record undecodable input; the same bytes on the same subject are stored once."""

        def build(index: int, prev_hash: str) -> AuditEntry:
            return entry_for_malformed(subject, raw, reason, index, prev_hash, source=source)

        return await self.append(build, f"audit:malformed:{malformed_digest(subject, raw)}")


async def read_entries(
    js: JetStreamContext,
    start_seq: int = 1,
    stream: str = AUDIT_STREAM,
    subject: str = AUDIT_ENTRY_SUBJECT,
    idle_timeout: float = 5.0,
) -> list[AuditEntry]:
    """Every entry stored from stream sequence ``start_seq`` on, in order (ordered consumer)."""
    info = await js.stream_info(stream)
    if info.state.messages == 0 or info.state.last_seq < start_seq:
        return []
    try:
        last = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return []
    if last.seq is not None and last.seq < start_seq:
        return []
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start_seq, 1)
    )
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    entries: list[AuditEntry] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except NatsTimeoutError:
                stalled = f"reading the {stream} stream stalled after {len(entries)} entries"
                raise AuditReadError(len(entries), stalled) from None
            entries.append(decode_entry(msg.data, position=len(entries)))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return entries


def export_jsonl(entries: Sequence[AuditEntry], path: Path | str) -> int:
    """Write one entry per line (written to a temporary name, then renamed); returns the count."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for entry in entries:
            fh.write(entry.to_json())
            fh.write("\n")
    tmp.replace(target)
    return len(entries)


def load_jsonl(path: Path | str) -> list[AuditEntry]:
    """Entries of an export; raises AuditReadError naming the first line that is not one."""
    entries: list[AuditEntry] = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                position = len(entries)
                raise AuditReadError(
                    position, f"entry {position}: not valid JSON: {exc.msg}"
                ) from None
            entries.append(decode_entry(line, position=len(entries)))
    return entries
