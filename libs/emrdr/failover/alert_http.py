"""``POST /alertmanager``: a small HTTP/1.1 endpoint on asyncio streams (no web framework).

Each valid Alertmanager (v4) payload is handed to ``on_payload``; the coordinator turns it into
alert signals for its health history (suspicion only: an alert never fails a primary alone).
Answers: 200 with ``{"accepted": N}``, 400 for a body that is not an Alertmanager payload, 401
without the configured bearer token, 404/405 elsewhere, 413 for bodies over 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from emrdr.failover.judge import AlertmanagerWebhook, parse_alertmanager

__all__ = ["AlertEndpoint"]

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
OnPayload = Callable[[AlertmanagerWebhook], Awaitable[int] | int]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error"}


class AlertEndpoint:
    """Serves ``POST /alertmanager`` on ``host:port`` (0 = a free port; see :attr:`port`)."""

    def __init__(
        self, on_payload: OnPayload, *, host: str = "127.0.0.1", port: int = 0,
        token: str | None = None, path: str = "/alertmanager",
    ) -> None:
        self.on_payload = on_payload
        self.host = host
        self.port = port
        self.token = token
        self.path = path
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    async def start(self) -> AlertEndpoint:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any]
    ) -> None:
        data = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._serve(reader), 10.0)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            status, body = 400, {"error": f"bad request: {exc}"}
        try:
            await self._respond(writer, status, body)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        request_line = (await reader.readline()).decode("latin-1").strip()
        parts = request_line.split()
        if len(parts) != 3:
            raise ValueError(f"malformed request line {request_line!r}")
        method, target, _ = parts
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readline()).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            return 413, {"error": f"body of {length} bytes is over {MAX_BODY}"}
        raw = await reader.readexactly(length) if length else b""
        if target.split("?", 1)[0] != self.path:
            return 404, {"error": f"no such endpoint {target}; POST {self.path}"}
        if method != "POST":
            return 405, {"error": f"{method} not allowed; POST {self.path}"}
        if self.token is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return 401, {"error": "missing or wrong bearer token"}
        try:
            payload = parse_alertmanager(raw)
        except (ValidationError, ValueError) as exc:
            return 400, {"error": f"not an Alertmanager v4 payload: {str(exc)[:500]}"}
        try:
            accepted = self.on_payload(payload)
            if not isinstance(accepted, int):
                accepted = await accepted
        except Exception as exc:
            log.exception("alertmanager payload handler failed")
            return 500, {"error": f"{type(exc).__name__}: {exc}"}
        return 200, {"accepted": accepted, "alerts": len(payload.alerts)}
