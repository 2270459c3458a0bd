"""emrdr: backup and disaster recovery for an EMR PostgreSQL 15 cluster."""

__version__ = "0.1.0"
