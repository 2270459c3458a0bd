"""The audit trail: a hash chain of entries (``chain``) stored in the AUDIT stream (``log``)."""

from emrdr.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    ChainReport,
    Checkpoint,
    checkpoint,
    compute_hash,
    entry_for_malformed,
    entry_from_message,
    query,
    verify_chain,
    verify_checkpoint,
)
from emrdr.audit.log import AuditWriter, export_jsonl, load_jsonl, read_entries

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditWriter",
    "ChainReport",
    "Checkpoint",
    "checkpoint",
    "compute_hash",
    "entry_for_malformed",
    "entry_from_message",
    "export_jsonl",
    "load_jsonl",
    "query",
    "read_entries",
    "verify_chain",
    "verify_checkpoint",
]
