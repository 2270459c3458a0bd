"""backup-worker: executes backup, restore, retention and key commands; owns the repository."""

from __future__ import annotations

from typing import Any

from emrdr.bus.runtime import HandlerContext, NotAvailableYet, Service, run_service

NAME = "backup-worker"
ENGINE = "the backup engine (issue #3) is not built yet"


async def not_built(command: Any, ctx: HandlerContext) -> None:
    raise NotAvailableYet(f"{command.type}: {ENGINE}")


def build(service: Service) -> None:
    for area in ("backup", "restore", "retention", "keys"):
        service.on_command(f"emrdr.cmd.{area}.>", not_built)


def main() -> int:
    return run_service(build, NAME)
