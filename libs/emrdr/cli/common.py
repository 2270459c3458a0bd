"""Pieces every CLI verb shares: the operator's identity, issuing a command, printing results."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from emrdr.cli.errors import CliError
from emrdr.config import Settings, get_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_AVAILABLE = 3
EXIT_TIMEOUT = 4


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cli_identity(settings: Settings) -> Any:
    """The operator's signing identity (``EMRDR_ACTOR`` / ``EMRDR_ROLE``).

    On the embedded stack (no NATS URL configured) a missing key is created and enrolled, as
    a single-host installation's operator; with a configured deployment it must be enrolled
    by an administrator beforehand.
    """
    from emrdr.security import TrustStore, ensure_identity, load_identity

    role = os.environ.get("EMRDR_ROLE", "dba")
    trust = TrustStore(settings.keys_dir / "trust")
    if settings.nats.url is None:
        return ensure_identity(settings.keys_dir, settings.actor, role, trust)
    try:
        return load_identity(settings.keys_dir, settings.actor, role)
    except PermissionError as exc:
        raise CliError(str(exc)) from None


def issue(args: argparse.Namespace, command_factory: Any, label: str = "") -> int:
    """Publish the command built by ``command_factory(issuer)`` and follow it to its outcome."""
    from emrdr.bus.issue import ProgressBar, issue_and_follow
    from emrdr.messages.base import Event
    from emrdr.messages.events import CommandRejected

    settings = get_settings()
    identity = cli_identity(settings)
    command = command_factory(identity.issuer)
    as_json = getattr(args, "json", False)
    bar = ProgressBar(label or command.type, enabled=None if not as_json else False)

    def on_event(event: Event) -> None:
        done = getattr(event, "bytes_done", None)
        total = getattr(event, "bytes_total", None)
        if done is not None and total:
            bar.update(done, total)
        elif not as_json and event.type != "CommandReceived" and event.outcome == "progress":
            print(f"  {event.occurred_at:%H:%M:%S} {event.type} {_summary(event)}")

    try:
        followed = asyncio.run(
            issue_and_follow(
                settings,
                identity,
                command,
                timeout=getattr(args, "timeout", 3600.0),
                on_event=on_event,
            )
        )
    except (ConnectionError, LookupError) as exc:
        raise CliError(str(exc)) from None
    bar.close()
    final = followed.final
    if as_json:
        print(
            json.dumps(
                {
                    "command": followed.command.model_dump(mode="json"),
                    "events": [e.model_dump(mode="json") for e in followed.events],
                    "outcome": final.outcome if final else "timeout",
                },
                indent=2,
            )
        )
    if followed.timed_out or final is None:
        if not as_json:
            print(f"emrdr: no outcome for {command.type} within the timeout", file=sys.stderr)
        return EXIT_TIMEOUT
    if isinstance(final, CommandRejected):
        if not as_json:
            print(f"emrdr: {command.type} refused: {final.reason}", file=sys.stderr)
        return EXIT_NOT_AVAILABLE if final.reason.startswith("not available yet") else EXIT_FAILED
    if final.outcome == "success":
        if not as_json:
            print(f"{final.type}: {_summary(final)}")
        return EXIT_OK
    if not as_json:
        print(f"emrdr: {final.type}: {_summary(final)}", file=sys.stderr)
    return EXIT_FAILED


_SKIP = {
    "type",
    "schema_version",
    "event_id",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "source",
    "payload_b64",
    "command",
}


def _summary(event: Any) -> str:
    fields = event.model_dump(mode="json")
    parts = [f"{k}={v}" for k, v in fields.items() if k not in _SKIP and v not in (None, [], {})]
    return " ".join(parts)[:400]
