"""verifier: restore drills into a temporary PostgreSQL, and repository integrity checks."""

from __future__ import annotations

from typing import Any

from emrdr.bus.runtime import HandlerContext, NotAvailableYet, Service, run_service

NAME = "verifier"


async def not_built(command: Any, ctx: HandlerContext) -> None:
    raise NotAvailableYet(f"{command.type}: restore drills need the backup engine (issue #3/#4)")


def build(service: Service) -> None:
    service.on_command("emrdr.cmd.verify.>", not_built)


def main() -> int:
    return run_service(build, NAME)
