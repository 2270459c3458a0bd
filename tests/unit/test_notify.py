"""Notifications against a real local SMTP server (aiosmtpd) and a real HTTP receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from emrdr.natsserver import free_port
from emrdr.notify import (
    EmailNotifier,
    Notice,
    NotifySettings,
    WebhookNotifier,
    notifiers_from,
    notify_all,
)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, Inbox]]:
    inbox = Inbox()
    port = free_port("127.0.0.1")
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


class Receiver:
    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), json.loads(body)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


NOTICE = Notice(
    subject="pg-replica-1 is the new primary",
    body="The primary pg-primary failed; pg-replica-1 was promoted at epoch 7.",
    facts={"new_primary": "pg-replica-1", "epoch": 7},
)


async def test_email_reaches_every_recipient(smtp: tuple[int, Inbox]) -> None:
    port, inbox = smtp
    n = EmailNotifier("127.0.0.1", port, "emrdr@medical-emr.local", ["dba@x.local", "md@x.local"])
    d = await n.send(NOTICE)
    assert d.delivered, d.detail
    assert d.channel == "email" and d.recipients == ("dba@x.local", "md@x.local")
    assert len(inbox.messages) == 1
    sender, rcpts, content = inbox.messages[0]
    assert sender == "emrdr@medical-emr.local"
    assert rcpts == ["dba@x.local", "md@x.local"]
    msg = message_from_bytes(content)
    assert msg["Subject"] == "[emrdr CRITICAL] pg-replica-1 is the new primary"
    assert "epoch: 7" in msg.get_payload()


async def test_email_to_a_dead_server_is_reported_not_raised() -> None:
    n = EmailNotifier("127.0.0.1", free_port("127.0.0.1"), "a@b", ["c@d"], timeout=2)
    d = await n.send(NOTICE)
    assert not d.delivered
    assert d.detail.startswith("email via 127.0.0.1:")
    assert "ConnectionRefusedError" in d.detail


async def test_webhook_posts_json_with_token(receiver: Receiver) -> None:
    d = await WebhookNotifier(receiver.url, token="s3cret").send(NOTICE)
    assert d.delivered, d.detail
    headers, body = receiver.requests[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert body["subject"] == NOTICE.subject
    assert body["facts"] == {"new_primary": "pg-replica-1", "epoch": 7}
    assert body["severity"] == "critical" and body["kind"] == "failover"


async def test_webhook_error_status_is_not_delivered(receiver: Receiver) -> None:
    receiver.status = 503
    d = await WebhookNotifier(receiver.url).send(NOTICE)
    assert not d.delivered
    assert d.detail == f"webhook {receiver.url} answered 503"


async def test_settings_build_both_channels(smtp: tuple[int, Inbox], receiver: Receiver) -> None:
    port, inbox = smtp
    settings = NotifySettings(smtp_host="127.0.0.1", smtp_port=port, webhook_url=receiver.url)
    notifiers = notifiers_from(settings)
    assert [n.channel for n in notifiers] == ["email", "webhook"]
    results = await notify_all(notifiers, NOTICE)
    assert all(r.delivered for r in results), results
    assert inbox.messages[0][1] == list(settings.recipients)  # the seed's contacts by default
    assert len(receiver.requests) == 1


def test_no_channels_configured() -> None:
    assert notifiers_from(NotifySettings()) == []
    with pytest.raises(ValueError, match="http"):
        WebhookNotifier("ftp://x")
