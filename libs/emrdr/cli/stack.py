"""``emrdr up`` (the whole stack on this machine) and ``emrdr service NAME`` (one service)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from emrdr.cli.errors import CliError


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="run NATS, a sandbox PostgreSQL and all six services here")
    up.add_argument("--replicas", type=int, default=1, help="sandbox streaming replicas")
    up.add_argument("--no-services", action="store_true", help="infrastructure only")
    up.set_defaults(func=run_up)

    svc = sub.add_parser("service", help="run one service in the foreground")
    svc.add_argument(
        "name",
        choices=[
            "scheduler",
            "backup-worker",
            "verifier",
            "replication-monitor",
            "dr-coordinator",
            "audit-logger",
        ],
    )
    svc.set_defaults(func=run_service)


def run_up(args: argparse.Namespace) -> int:
    from emrdr.config import get_settings
    from emrdr.stack import EmbeddedStack, StackError, stop_on_signals

    settings = get_settings()
    print(f"emrdr up: state directory {settings.home}")
    stack = EmbeddedStack(settings, n_replicas=args.replicas, with_services=not args.no_services)
    with stop_on_signals() as stop:
        try:
            stack.start()
        except StackError as exc:
            raise CliError(str(exc)) from None
        if not args.no_services and not stop.is_set():
            alive = stack.wait_services_alive(timeout=90, stop=stop)
            for name, ok in alive.items():
                print(f"service       : {name:<20} {'UP' if ok else 'NOT UP (see logs)'}")
        if not stop.is_set():
            print(
                "ready. Ctrl-C (or SIGTERM) stops everything; `emrdr status` from another terminal."
            )
        # A SIGTERM or Ctrl-C during start-up lands here too: stop what has started.
        stack.run_forever(stop)
    return 0


def run_service(args: argparse.Namespace) -> int:
    from services import MODULES

    module = importlib.import_module(MODULES[args.name])
    code: int = module.main()
    return code
