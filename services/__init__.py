"""The six emrdr services: thin adapters from typed messages to library functions."""

MODULES = {
    "scheduler": "services.scheduler.app",
    "backup-worker": "services.backup_worker.app",
    "verifier": "services.verifier.app",
    "replication-monitor": "services.replication_monitor.app",
    "dr-coordinator": "services.dr_coordinator.app",
    "audit-logger": "services.audit_logger.app",
}
