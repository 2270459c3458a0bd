"""A durable local outbox: events of the data path wait here while NATS is unreachable.

A running backup, a restore and the WAL uploader never depend on the bus.  Their events are
written here when a publish fails (one file per event, fsynced, atomically renamed) and the
service's outbox loop publishes them once NATS answers again, with ``Nats-Msg-Id = event_id``,
so a file published twice is stored once.  (``wal push`` itself publishes nothing: it only
spools the segment; the backup-worker's uploader publishes ``WalArchived``.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from nats.js import JetStreamContext

from emrdr.bus.publish import headers_for
from emrdr.messages.base import REGISTRY, DecodeError, Message

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def add(self, msg: Message) -> Path:
        """Persist ``msg`` durably; returns its file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{msg.event_id}.json"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664)
        try:
            os.write(fd, msg.to_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.directory / name
        os.rename(tmp, final)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return final

    def pending(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if not p.name.startswith("."))

    async def flush(self, js: JetStreamContext, timeout: float = 5.0, limit: int = 1000) -> int:
        """Publish pending events in order; stop at the first failure. Returns how many went."""
        sent = 0
        for path in self.pending()[:limit]:
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # another flusher took it
                continue
            try:
                msg = REGISTRY.decode(data)
            except DecodeError as exc:
                bad = path.with_suffix(".bad")
                log.error("outbox entry %s is unreadable (%s); moved to %s", path, exc, bad)
                with contextlib.suppress(FileNotFoundError):
                    path.rename(bad)
                continue
            await js.publish(msg.subject, data, timeout=timeout, headers=headers_for(msg))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sent += 1
        return sent
