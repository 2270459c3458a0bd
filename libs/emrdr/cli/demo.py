"""``emrdr demo``: the guided tour on the embedded stack."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="guided tour: seed EMR data, command in, events out, audit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emrdr.config import get_settings
    from emrdr.demo import run_demo

    return run_demo(get_settings())
