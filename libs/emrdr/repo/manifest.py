"""The manifest: the contract between backup, restore and verify; and the repository layout.

Repository layout (every object immutable; retention deletes whole objects)::

    keys/keyring.<gen>.json                key ring generations (emrdr.repo.keys)
    chunks/<id[:2]>/<id>                   deduplicated, compressed, sealed chunks
    backups/<backup_id>/manifest           sealed manifest: its presence makes a backup complete
    backups/<backup_id>/manifest.copy      second copy (one bad copy is survivable)
    backups/<backup_id>/started            sealed marker of a running (or failed) backup: the
                                           chunk GC keeps every chunk newer than the oldest one
    holds/<backup_id>                      legal hold: the backup is kept whatever retention says
    wal/<timeline:08X>/<segment>           sealed WAL segments (also .partial)
    wal/history/<tli>.history              sealed timeline history files
    verifications/<backup_id>/<when>.json  restore-drill results (the verifier)

Page-level incrementals (relation main-fork files of at least ``PAGES_MIN_BYTES``, see
``emrdr.engine.pages``): a file's content is its *base* ``chunks`` (4 MiB regions, as in a full)
with an *overlay* on top: ``overlays`` are chunks of packed 8 KiB pages (at most one region's
worth each), each listing which file blocks it holds and which of them are still *live*.  Every
page is live in at most one overlay, so restore writes base chunks, then each live overlay page
once, then cuts the file to ``size`` -- one merged overlay set, never a chain of backups.
An incremental finds changed pages by their header: a page is unchanged since the parent when
its LSN is below the parent's start LSN and (LSN, pd_checksum) equal what the parent recorded
for it (``page_map``: a chunk holding every page's LSN and checksum, per file) and the parent's
copy verified.  Changed pages go to new overlays (old overlays lose those live pages); a region
whose live overlay pages would exceed ``REBASE_FRACTION`` of it is stored whole again as a new
base chunk instead (restore cost stays bounded).  Full backups always store whole files.
Such entries have ``sha256_of == "pieces"``.

Backup ids sort by time: ``20261126T020000Z-F`` (full) / ``-I`` (incremental).
A manifest is JSON, zstd-compressed, sealed with associated data ("manifest", backup_id).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = 1


def backup_id_for(started: datetime, kind: Literal["full", "incremental"]) -> str:
    return started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") + ("-F" if kind == "full" else "-I")


def manifest_key(backup_id: str) -> str:
    return f"backups/{backup_id}/manifest"


def manifest_copy_key(backup_id: str) -> str:
    return f"backups/{backup_id}/manifest.copy"


def started_key(backup_id: str) -> str:
    return f"backups/{backup_id}/started"


def hold_key(backup_id: str) -> str:
    return f"holds/{backup_id}"


def wal_key(segment: str) -> str:
    """Object key of a WAL file: segments by timeline, history files apart."""
    if segment.endswith(".history"):
        return f"wal/history/{segment}"
    return f"wal/{segment[:8]}/{segment}"


def verification_key(backup_id: str, when: datetime) -> str:
    return f"verifications/{backup_id}/{when.astimezone(UTC):%Y%m%dT%H%M%SZ}.json"


class PageOverlay(BaseModel):
    """Packed pages of one file stored as one chunk, applied on top of the base chunks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk: str = Field(description="Chunk holding the pages, in ascending block order.")
    first_block: int = Field(description="File-relative block of bit 0 of the bitmaps.")
    blocks: str = Field(
        description="Which blocks the chunk holds: base64 of a zlib-deflated bitmap "
        "(numpy packbits, little bit order) starting at ``first_block``."
    )
    live: str | None = Field(
        default=None, description="Subset of ``blocks`` still applied (same encoding); None = all."
    )
    pages: int = Field(description="Pages in the chunk.")


class FileEntry(BaseModel):
    """One file of the data directory as backed up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Relative to the data directory, '/'-separated.")
    size: int
    mode: int = 0o600
    mtime: float = Field(description="Modification time when read (seconds since the epoch).")
    sha256: str = Field(
        description="Checksum of the content as backed up: see ``sha256_of``."
    )
    sha256_of: Literal["content", "chunks", "pieces"] = Field(
        default="content",
        description="What ``sha256`` is the SHA-256 (hex) of: 'content' = the whole file; "
        "'chunks' = the concatenated 32-byte SHA-256 digests of its chunks (``chunk_size`` "
        "pieces) in file order, which backup gets from the one hashing pass that also names "
        "each chunk (emrdr.repo.chunks.file_checksum computes either form); restore computes "
        "and compares 'content' and 'chunks' checksums only with ``verify_digests`` (the "
        "verifier's drill): a plain restore trusts AES-GCM, which authenticates every chunk "
        "under its id, and this authenticated manifest, which lists the ids in file order; "
        "'pieces' (page overlays) = the 32-byte ids of the base chunks in order, then per "
        "overlay its id and the SHA-256 of its live block numbers (uint32 LE), always compared "
        "on restore: with chunks authenticated under their ids (and re-hashed against them "
        "with ``verify_digests``) this binds the file to exactly these page images "
        "(emrdr.engine.pages.pieces_checksum).",
    )
    chunks: list[str] = Field(default_factory=list, description="Chunk ids, in file order.")
    checksum_failures: list[int] = Field(
        default_factory=list, description="Block numbers whose page checksum did not verify."
    )
    reused: bool = Field(
        default=False, description="Unchanged since the parent backup; chunk list taken from it."
    )
    overlays: list[PageOverlay] = Field(
        default_factory=list, description="Page overlays applied in order on top of ``chunks``."
    )
    base_size: int | None = Field(
        default=None, description="Bytes the base ``chunks`` hold (None: ``size``)."
    )
    page_map: str | None = Field(
        default=None, description="Chunk with the LSN and pd_checksum of every page as backed "
        "up (relation files; what the next incremental compares against)."
    )

    def chunk_ids(self) -> list[str]:
        """Every chunk this entry needs kept: base chunks, overlay chunks, page map."""
        out = list(self.chunks) + [o.chunk for o in self.overlays]
        if self.page_map is not None:
            out.append(self.page_map)
        return out


class Manifest(BaseModel):
    """Everything needed to restore one backup on its own (no chain is walked)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = MANIFEST_FORMAT
    backup_id: str
    kind: Literal["full", "incremental"]
    parent_id: str | None = Field(
        default=None, description="Backup an incremental compared against (informational)."
    )
    label: str
    source_node: str | None = None
    started_at: datetime
    stopped_at: datetime
    start_lsn: str
    stop_lsn: str
    start_wal: str = Field(description="First WAL segment needed.")
    stop_wal: str = Field(description="Last WAL segment needed.")
    timeline: int
    system_identifier: str
    pg_version: int
    key_id: str = Field(description="Data key that sealed this manifest.")
    chunk_size: int
    zstd_level: int
    files: list[FileEntry]
    directories: list[str] = Field(
        default_factory=list,
        description="Every directory of the data directory kept by the backup, relative "
        "('/'-separated), including the ones kept empty (pg_wal, pg_replslot, ...).",
    )
    backup_label: str
    tablespace_map: str | None = None
    bytes_source: int = 0
    bytes_stored: int = Field(default=0, description="New bytes written to the repository.")
    bytes_reused: int = 0
    degraded: bool = False
    problems: list[str] = Field(default_factory=list)
    retention_days: int | None = None
    row_counts: dict[str, int] = Field(
        default_factory=dict, description="EMR table row counts at backup end (verifier check)."
    )
    canary_written: bool = False

    def chunk_ids(self) -> set[str]:
        """Every chunk this backup references (what retention's GC must keep)."""
        return {c for f in self.files for c in f.chunk_ids()}
