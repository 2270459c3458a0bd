"""Connecting to NATS the way every emrdr process does."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

from emrdr.config import Settings, get_settings

log = logging.getLogger(__name__)


async def connect(
    settings: Settings | None = None, name: str = "emrdr", reconnect: bool = True
) -> Client:
    """Connect to the configured (or embedded) NATS server; raises with a clear message."""
    settings = settings or get_settings()
    url = settings.resolved_nats_url()

    async def _error_cb(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    try:
        return await nats.connect(
            url,
            name=name,
            user=settings.nats.user,
            password=settings.nats.password,
            connect_timeout=settings.nats.connect_timeout,
            allow_reconnect=reconnect,
            max_reconnect_attempts=-1 if reconnect else 0,
            reconnect_time_wait=0.5,
            error_cb=_error_cb,
        )
    except Exception as exc:
        raise ConnectionError(f"cannot reach NATS at {url}: {exc}") from exc
