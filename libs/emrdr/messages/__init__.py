"""Typed messages: every command and event, and the registry that decodes them."""

from emrdr.messages import commands, events
from emrdr.messages.base import (
    REGISTRY,
    Command,
    DecodeError,
    Event,
    Issuer,
    Message,
    Outcome,
)
from emrdr.messages.commands import *  # noqa: F403
from emrdr.messages.events import *  # noqa: F403

__all__ = [
    "REGISTRY",
    "Command",
    "DecodeError",
    "Event",
    "Issuer",
    "Message",
    "Outcome",
    "commands",
    "events",
]
