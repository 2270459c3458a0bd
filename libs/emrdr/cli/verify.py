"""``emrdr verify latest|BACKUP_ID`` and ``emrdr integrity-check``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue


def register(sub: Any) -> None:
    p = sub.add_parser("verify", help="restore drill of a backup into a temporary PostgreSQL")
    p.add_argument("backup_id", nargs="?", default="latest")
    p.add_argument("--timeout", type=float, default=3 * 3600.0)
    add_json(p)
    p.set_defaults(func=run_verify)

    ic = sub.add_parser("integrity-check", help="check the whole repository")
    ic.add_argument("--comprehensive", action="store_true", help="authenticate every object")
    ic.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(ic)
    ic.set_defaults(func=run_integrity)


def run_verify(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import StartVerification

    return issue(args, lambda issuer: StartVerification(issuer=issuer, backup_id=args.backup_id))


def run_integrity(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import CheckIntegrity

    return issue(
        args, lambda issuer: CheckIntegrity(issuer=issuer, comprehensive=args.comprehensive)
    )
