"""Who is told, and how (``[notify]`` in emrdr.toml, ``EMRDR_NOTIFY__*`` in the environment)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from emrdr.notify.base import Notifier
from emrdr.notify.email import EmailNotifier
from emrdr.notify.webhook import WebhookNotifier

__all__ = ["DEFAULT_CONTACTS", "NotifySettings", "notifiers_from"]

DEFAULT_CONTACTS = (
    "emergency@medical-emr.local",
    "dba@medical-emr.local",
    "medical-director@hospital.local",
)
"""The seed's emergency contacts (IT emergency, database admin, medical director)."""


class NotifySettings(BaseModel):
    """Email (SMTP) and webhook channels; a channel without its server/URL is off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    smtp_host: str | None = Field(default=None, description="SMTP server; unset disables email.")
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = None
    sender: str = "emrdr@medical-emr.local"
    recipients: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTACTS))
    webhook_url: str | None = Field(default=None, description="HTTP(S) URL; unset disables it.")
    webhook_token: str | None = None
    timeout_s: float = 10.0


def notifiers_from(settings: NotifySettings) -> list[Notifier]:
    """The configured channels (possibly none)."""
    out: list[Notifier] = []
    if settings.smtp_host and settings.recipients:
        out.append(
            EmailNotifier(
                settings.smtp_host, settings.smtp_port, settings.sender, settings.recipients,
                username=settings.smtp_user, password=settings.smtp_password,
                starttls=settings.smtp_starttls, timeout=settings.timeout_s,
            )
        )
    if settings.webhook_url:
        out.append(
            WebhookNotifier(
                settings.webhook_url, token=settings.webhook_token, timeout=settings.timeout_s
            )
        )
    return out
