"""``emrdr retention enforce [--dry-run]``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue


def register(sub: Any) -> None:
    p = sub.add_parser("retention", help="apply the retention policy")
    rs = p.add_subparsers(dest="action", required=True)
    enf = rs.add_parser("enforce")
    enf.add_argument("--dry-run", action="store_true")
    enf.add_argument("--timeout", type=float, default=3600.0)
    add_json(enf)
    enf.set_defaults(func=run_enforce)


def run_enforce(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import EnforceRetention

    return issue(args, lambda issuer: EnforceRetention(issuer=issuer, dry_run=args.dry_run))
