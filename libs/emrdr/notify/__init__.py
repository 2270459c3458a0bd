"""Telling people: email over SMTP and an HTTP webhook behind one :class:`Notifier` interface.

    notifier = notifiers_from(settings.notify)
    results = await notify_all(notifier, Notice(subject="...", body="...", severity="critical"))

Each delivery returns a :class:`Delivery` (channel, recipients, delivered, detail) that the
caller publishes as ``StaffNotified``; a failed delivery is reported, never raised.
"""

from emrdr.notify.base import Delivery, Notice, Notifier, notify_all
from emrdr.notify.email import EmailNotifier
from emrdr.notify.settings import NotifySettings, notifiers_from
from emrdr.notify.webhook import WebhookNotifier

__all__ = [
    "Delivery",
    "EmailNotifier",
    "Notice",
    "Notifier",
    "NotifySettings",
    "WebhookNotifier",
    "notifiers_from",
    "notify_all",
]
