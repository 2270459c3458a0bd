"""The backup engine: backups, WAL archive, restore, PITR and retention over the repository."""
