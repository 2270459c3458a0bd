"""Parsing operator-given times: a time without a zone is local time, always printed resolved."""

from __future__ import annotations

from datetime import datetime

from emrdr.cli.errors import CliError


def parse_time(text: str) -> datetime:
    """ISO-8601 or "YYYY-MM-DD HH:MM:SS"; without a zone, this machine's local zone."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"cannot read time {text!r}: use ISO-8601, e.g. '2025-06-22 14:30:00+00:00'", 2
        ) from None
    if value.tzinfo is None:
        value = value.astimezone()
    return value
