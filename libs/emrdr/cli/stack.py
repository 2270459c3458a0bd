"""``emrdr up`` (the whole stack on this machine) and ``emrdr service NAME`` (one service)."""

from __future__ import annotations

import argparse
import importlib
import signal
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
    from emrdr.stack import EmbeddedStack, StackError

    settings = get_settings()
    print(f"emrdr up: state directory {settings.home}")
    stack = EmbeddedStack(settings, n_replicas=args.replicas, with_services=not args.no_services)

    def _interrupt(signum: int, frame: Any) -> None:
        raise _StopRequested(signal.Signals(signum).name)

    # A SIGTERM or Ctrl-C while the stack is still starting stops what has started, cleanly.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stack.start()
        if not args.no_services:
            alive = stack.wait_services_alive(timeout=90)
            for name, ok in alive.items():
                print(f"service       : {name:<20} {'UP' if ok else 'NOT UP (see logs)'}")
    except StackError as exc:
        raise CliError(str(exc)) from None
    except _StopRequested as why:
        print(f"{why} while starting: stopping what has started ...")
        stack.stop()
        print("stopped cleanly")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("ready. Ctrl-C (or SIGTERM) stops everything; `emrdr status` from another terminal.")
    stack.run_forever()
    return 0


class _StopRequested(Exception):
    """SIGTERM/SIGINT arrived before the stack was up."""


def run_service(args: argparse.Namespace) -> int:
    from services import MODULES

    module = importlib.import_module(MODULES[args.name])
    code: int = module.main()
    return code
