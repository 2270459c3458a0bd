"""``emrdr keys rotate|list``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue, not_available


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="repository encryption keys")
    ks = p.add_subparsers(dest="action", required=True)
    rot = ks.add_parser("rotate", help="new data key; old backups stay restorable")
    rot.add_argument("--timeout", type=float, default=600.0)
    add_json(rot)
    rot.set_defaults(func=run_rotate)
    lst = ks.add_parser("list", help="key ids and their state")
    add_json(lst)
    lst.set_defaults(func=run_list)


def run_rotate(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import RotateKeys

    return issue(args, lambda issuer: RotateKeys(issuer=issuer))


def run_list(args: argparse.Namespace) -> int:
    return not_available("listing keys", "the backup engine, issue #3")
