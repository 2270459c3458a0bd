"""The ``emrdr`` command: one argparse tree, one module per verb group.

Each module in ``VERB_MODULES`` exposes ``register(subparsers)``, adding its parsers with
``set_defaults(func=handler)``; a handler takes the parsed ``argparse.Namespace`` and returns the
exit code.  Modules keep heavy imports inside their handlers so that ``emrdr wal push`` (run by
PostgreSQL once per WAL segment) starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from emrdr.cli.errors import CliError

if TYPE_CHECKING:
    import argparse

__all__ = ["CliError", "build_parser", "main"]

VERB_MODULES: tuple[str, ...] = (
    "stack",
    "status",
    "backup",
    "restore",
    "wal",
    "verify",
    "dr",
    "keys",
    "retention",
    "audit",
    "bus",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="emrdr", description="Backup and disaster recovery for the EMR PostgreSQL cluster."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        module = importlib.import_module(f"emrdr.cli.{name}")
        module.register(sub)
    return parser


def is_wal_fast_path(args: list[str]) -> bool:
    """``wal push PATH``, ``wal fetch NAME DEST`` or ``wal fetch NAME DEST --dir DIR``."""
    if args[:2] == ["wal", "push"]:
        return len(args) == 3 and not args[2].startswith("-")
    if args[:2] == ["wal", "fetch"]:
        rest = args[2:]
        plain = len(rest) == 2 and not any(a.startswith("-") for a in rest)
        with_dir = len(rest) == 4 and rest[2] == "--dir" and not rest[0].startswith("-")
        return plain or with_dir
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if is_wal_fast_path(args_list):
        # archive_command / restore_command: no argparse tree, no logging, few imports.
        from emrdr.cli import wal

        return wal.fast_main(args_list[1:])
    import logging

    parser = build_parser()
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"emrdr: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("emrdr: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
