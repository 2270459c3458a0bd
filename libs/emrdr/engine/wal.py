"""The WAL archive: spool -> repository upload, fetch with prefetch, and the restore-side feeder.

``emrdr wal push %p`` (PostgreSQL's OS user, no key) only makes a segment durable in the local
spool ``$EMRDR_HOME/spool/wal``.  :func:`upload_spool` (root, with the key; run by the
backup-worker and in-process by a backup waiting for its WAL) compresses and seals each spooled
file into the repository and removes it from the spool only after the put returned.

Reading WAL back:

* :func:`fetch_wal` (with the key): spool, then a local prefetch cache, then the repository;
  when called for consecutive segments it fetches the next ones into the cache in the
  background, so sequential replay does not wait for one object at a time.
* ``emrdr wal fetch %f %p`` (restore_command, PostgreSQL's OS user, NO key): reads the spool and
  a *restore WAL directory* filled ahead of replay by a :class:`WalFeeder` that the restoring
  process (root) runs next to the starting server.  The directory is owned by PostgreSQL's user;
  the key never leaves root.  The feeder writes a marker (:data:`END_MARKER`) naming the first
  segment the repository does not have, so ``wal fetch`` can answer "not found" at once (the end
  of the archive, where PostgreSQL ends recovery) instead of waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from emrdr.cli.wal import END_MARKER, FEEDER_MARKER, FETCHED_MARKER, HISTORIES_MARKER
from emrdr.config import Settings
from emrdr.engine.repository import Repository
from emrdr.paths import wal_spool
from emrdr.pg.lsn import (
    DEFAULT_SEGMENT_SIZE,
    is_history_name,
    is_segment_name,
    parse_segment_name,
    segment_name_from_number,
)
from emrdr.pg.osuser import OsUser
from emrdr.repo import ObjectExists, ObjectNotFound

__all__ = [
    "END_MARKER",
    "FEEDER_MARKER",
    "IncompleteSegment",
    "UploadedSegment",
    "WalConflict",
    "WalFeeder",
    "WalNotFound",
    "fetch_wal",
    "is_segment_size",
    "spool_dir",
    "spool_names",
    "upload_spool",
    "wal_sort_key",
]

CONFLICTS_DIR = "wal-conflicts"
DEFAULT_PREFETCH = 8


class WalConflict(RuntimeError):
    """Spooled WAL files that could not be archived and were kept aside: one that differs from
    the repository's file under its name, or a segment that stayed short (``incomplete``)."""

    def __init__(self, segments: list[str], kept: list[Path], uploaded: list[UploadedSegment],
                 incomplete: list[str] | None = None):
        self.segments = segments
        self.kept = kept
        self.uploaded = uploaded
        self.incomplete = incomplete or []
        where = ", ".join(str(k) for k in kept)
        differ = [s for s in segments if s not in self.incomplete]
        parts = []
        if differ:
            parts.append(
                f"WAL {', '.join(differ)}: the repository already holds a different file under "
                "that name (two clusters archiving into one repository, or a timeline mix-up?)"
            )
        if self.incomplete:
            parts.append(
                f"WAL {', '.join(self.incomplete)}: not a whole segment and unchanged for "
                f"{INCOMPLETE_GRACE_S:.0f}s (an archive_command that failed while copying in "
                "place; archive it again from pg_wal)"
            )
        super().__init__("; ".join(parts) + f"; kept aside in {where} for inspection")


class WalNotFound(FileNotFoundError):
    """The WAL file is in neither the spool, the cache nor the repository."""


@dataclass(frozen=True)
class UploadedSegment:
    """One WAL file moved from the spool into the repository."""

    segment: str
    bytes_source: int
    bytes_stored: int
    upload_s: float
    latency_s: float  # from the push into the spool (file mtime) to the end of the upload
    new: bool  # False: the repository already had this exact file


# --- naming and ordering ----------------------------------------------------------------


def wal_sort_key(name: str) -> tuple[int, int, str]:
    """Oldest first: by timeline, a timeline's history file before its segments, then name."""
    try:
        tli = int(name[:8], 16)
    except ValueError:
        return (1 << 32, 0, name)
    return (tli, 0 if is_history_name(name) else 1, name)


def _is_wal_file_name(name: str) -> bool:
    """Segments, ``.partial`` segments, ``.history`` and ``.backup`` history files."""
    if name.startswith("."):
        return False
    base = name.split(".", 1)[0]
    return is_history_name(name) or is_segment_name(base)


def spool_dir(settings: Settings) -> Path:
    return wal_spool(settings.home)


def spool_names(spool: Path) -> list[str]:
    """Complete WAL files in the spool (``push`` links them in finished), oldest first."""
    try:
        names = [e.name for e in os.scandir(spool) if e.is_file() and _is_wal_file_name(e.name)]
    except FileNotFoundError:
        return []
    return sorted(names, key=wal_sort_key)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _upload_lock(spool: Path) -> Iterator[None]:
    """One uploader per spool at a time (backup-worker and an in-process backup)."""
    lock_path = spool.parent / ".wal-upload.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --- upload ------------------------------------------------------------------------------


def _same_as_stored(repo: Repository, name: str, data: bytes) -> bool:
    return hashlib.sha256(repo.get_wal(name)).digest() == hashlib.sha256(data).digest()


def _keep_aside(spool: Path, name: str) -> Path:
    target_dir = spool.parent / CONFLICTS_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
    os.replace(spool / name, target)
    _fsync_dir(spool)
    return target


#: A spooled segment whose size is not a WAL segment size this long after its last change is
#: reported instead of waited for.
INCOMPLETE_GRACE_S = 300.0


class IncompleteSegment(ValueError):
    """A spooled WAL segment is not a whole segment (an archive_command that copied it in
    place, like a plain ``cp``, and failed or is still copying)."""


def is_segment_size(size: int) -> bool:
    """A size PostgreSQL allows for WAL segments: a power of two from 1 MiB to 1 GiB."""
    return (1 << 20) <= size <= (1 << 30) and size & (size - 1) == 0


def upload_one(
    repo: Repository, spool: Path, name: str, grace_s: float = INCOMPLETE_GRACE_S
) -> UploadedSegment | None:
    """Seal one spooled file into the repository, then remove it from the spool.

    Returns None if the file vanished meanwhile (another uploader took it) or is a segment
    not yet whole (``wal push`` links a file in only once complete, but an archive_command
    that copies in place shows it early; it is left for a later pass); raises
    :class:`IncompleteSegment` when such a file stayed short for ``grace_s`` and
    :class:`~emrdr.repo.ObjectExists` when the repository holds different content.
    """
    path = spool / name
    t0 = time.perf_counter()
    try:
        data = path.read_bytes()
        pushed_at = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if is_segment_name(name) and not is_segment_size(len(data)):
        if time.time() - pushed_at < grace_s:
            return None
        raise IncompleteSegment(
            f"spooled WAL segment {path} holds {len(data)} bytes, not a whole segment, and has "
            f"not changed for {grace_s:.0f}s: the archive_command must have failed while "
            "copying it; archive it again from pg_wal (or remove it) — it was not uploaded"
        )
    new = False
    if repo.has_wal(name):
        if not _same_as_stored(repo, name, data):
            raise ObjectExists(name)
    else:
        try:
            new = repo.put_wal(name, data)
        except ObjectExists:  # another writer sealed it meanwhile (a different nonce)
            if not _same_as_stored(repo, name, data):
                raise
    stored = repo.storage.size(_wal_key(name))
    path.unlink(missing_ok=True)
    _fsync_dir(spool)
    done = time.perf_counter()
    return UploadedSegment(
        segment=name,
        bytes_source=len(data),
        bytes_stored=stored,
        upload_s=done - t0,
        latency_s=max(0.0, time.time() - pushed_at),
        new=new,
    )


def _wal_key(name: str) -> str:
    from emrdr.repo.manifest import wal_key

    return wal_key(name)


DEFAULT_UPLOAD_WORKERS = max(2, min(4, os.cpu_count() or 2))


def upload_spool(
    settings: Settings,
    repo: Repository,
    on_archived: Callable[[UploadedSegment], None] | None = None,
    *,
    spool: Path | None = None,
    workers: int = DEFAULT_UPLOAD_WORKERS,
) -> list[UploadedSegment]:
    """Upload every spooled WAL file; returns what was uploaded, in completion order.

    ``workers`` files are read, compressed, sealed and put at once (zstd, AES-GCM, hashing and
    fsync release the GIL), at most ``2 * workers`` in flight so memory stays bounded.  Each file
    leaves the spool only after its own put returned, so the order of completion does not
    matter for correctness.  ``on_archived`` is called on this thread.  A file that conflicts
    with the repository is moved to ``spool/../wal-conflicts/`` and the others still go;
    :class:`WalConflict` is raised at the end naming every conflicting file.  A segment not yet
    whole stays in the spool for a later pass; one short for ``INCOMPLETE_GRACE_S`` is kept
    aside and reported the same way.
    """
    spool = spool or spool_dir(settings)
    if not spool.is_dir():
        return []
    uploaded: list[UploadedSegment] = []
    conflicts: list[str] = []
    incomplete: list[str] = []
    kept: list[Path] = []
    failure: BaseException | None = None

    def settle(name: str, fut: Future[UploadedSegment | None]) -> None:
        nonlocal failure
        try:
            result = fut.result()
        except (ObjectExists, IncompleteSegment) as exc:
            if isinstance(exc, IncompleteSegment):
                incomplete.append(name)
            conflicts.append(name)
            kept.append(_keep_aside(spool, name))
            return
        except Exception as exc:  # the others still go; the first failure is raised at the end
            failure = failure or exc
            return
        if result is None:
            return
        uploaded.append(result)
        if on_archived is not None:
            on_archived(result)

    with _upload_lock(spool), ThreadPoolExecutor(
        max(1, workers), thread_name_prefix="wal-upload"
    ) as pool:
        pending: dict[Future[UploadedSegment | None], str] = {}
        for name in spool_names(spool):
            if failure is not None:  # e.g. the repository is unreachable: stop submitting
                break
            while len(pending) >= 2 * max(1, workers):
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    settle(pending.pop(fut), fut)
            pending[pool.submit(upload_one, repo, spool, name)] = name
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                settle(pending.pop(fut), fut)
    if conflicts:
        raise WalConflict(conflicts, kept, uploaded, incomplete)
    if failure is not None:
        raise failure
    return uploaded


# --- fetch (with the key) ------------------------------------------------------------------


def _next_names(name: str, count: int, seg_size: int) -> list[str]:
    if not is_segment_name(name):
        return []
    tli, segno = parse_segment_name(name, seg_size)
    return [segment_name_from_number(tli, segno + i, seg_size) for i in range(1, count + 1)]


def _write_atomic(path: Path, data: bytes, owner: OsUser | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if owner is not None and not owner.is_current:
        os.chown(tmp, owner.uid, owner.gid)
    os.replace(tmp, path)


class _Prefetcher:
    """Background fetches of upcoming segments into a cache directory."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wal-prefetch")
        self._pending: dict[Path, Future[None]] = {}
        self._lock = threading.Lock()

    def schedule(self, repo: Repository, names: list[str], cache: Path) -> None:
        with self._lock:
            for name in names:
                target = cache / name
                if target in self._pending or target.exists():
                    continue
                self._pending[target] = self._pool.submit(self._fetch, repo, name, target)

    def _fetch(self, repo: Repository, name: str, target: Path) -> None:
        try:
            data = repo.get_wal(name)
        except ObjectNotFound:
            return
        _write_atomic(target, data)

    def wait_for(self, target: Path) -> None:
        with self._lock:
            fut = self._pending.get(target)
        if fut is not None:
            with contextlib.suppress(Exception):
                fut.result()
            with self._lock:
                self._pending.pop(target, None)


_PREFETCHER = _Prefetcher()


def fetch_wal(
    settings: Settings,
    repo: Repository,
    name: str,
    dest: Path,
    *,
    prefetch: int = DEFAULT_PREFETCH,
    cache: Path | None = None,
    seg_size: int = DEFAULT_SEGMENT_SIZE,
) -> str:
    """Write WAL file ``name`` to ``dest``; returns where it came from (spool/cache/repository).

    Raises :class:`WalNotFound` if no copy exists.  Schedules the next ``prefetch`` segments of
    the same timeline into ``cache`` (default ``$EMRDR_HOME/cache/wal``).
    """
    cache = cache or settings.home / "cache" / "wal"
    cache.mkdir(parents=True, exist_ok=True)
    dest = Path(dest)
    spooled = spool_dir(settings) / name
    source = ""
    if spooled.is_file():
        _write_atomic(dest, spooled.read_bytes())
        source = "spool"
    else:
        cached = cache / name
        _PREFETCHER.wait_for(cached)
        if cached.is_file():
            if _same_fs(cached, dest):
                os.replace(cached, dest)
            else:
                _move(cached, dest)
            source = "cache"
        else:
            try:
                data = repo.get_wal(name)
            except ObjectNotFound:
                raise WalNotFound(
                    f"WAL file {name} is in neither the spool nor the repository"
                ) from None
            _write_atomic(dest, data)
            source = "repository"
    if prefetch > 0:
        _PREFETCHER.schedule(repo, _next_names(name, prefetch, seg_size), cache)
    return source


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.parent.stat().st_dev
    except OSError:
        return False


def _move(src: Path, dest: Path) -> None:
    _write_atomic(dest, src.read_bytes())
    src.unlink(missing_ok=True)


# --- the restore-side feeder -------------------------------------------------------------


class WalFeeder:
    """Fill a restore WAL directory (owned by PostgreSQL's OS user) from the repository ahead
    of replay, for ``emrdr wal fetch NAME DEST --dir DIR`` running without the key.

    Writes every history file first, then segments from ``first_segment`` onwards on its
    timeline and later timelines (switching to the higher timeline where a history file says
    the switch happened is PostgreSQL's job; the feeder offers both), keeping at most
    ``window`` segments beyond the last one ``wal fetch`` served.  When the next segment is not
    in the repository it writes :data:`END_MARKER` with that name and stops.

        feeder = WalFeeder(repo, wal_dir, owner=pg_user).start("000000010000000000000004")
        ... start the server with restore_command = 'emrdr wal fetch %f %p --dir wal_dir' ...
        feeder.stop()
    """

    def __init__(
        self,
        repo: Repository,
        directory: Path,
        *,
        owner: OsUser | None = None,
        window: int = 16,
        seg_size: int = DEFAULT_SEGMENT_SIZE,
        workers: int = 2,
    ) -> None:
        self.repo = repo
        self.directory = Path(directory)
        self.owner = owner
        self.window = window
        self.seg_size = seg_size
        self.workers = workers
        self.fed: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, first_segment: str) -> WalFeeder:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.owner is not None and not self.owner.is_current:
            os.chown(self.directory, self.owner.uid, self.owner.gid)
        for marker in (END_MARKER, HISTORIES_MARKER, FETCHED_MARKER):
            (self.directory / marker).unlink(missing_ok=True)
        _write_atomic(self.directory / FEEDER_MARKER, str(os.getpid()).encode(), self.owner)
        self._thread = threading.Thread(
            target=self._run, args=(first_segment,), name="wal-feeder", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        (self.directory / FEEDER_MARKER).unlink(missing_ok=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the feeder reached the end of the archive; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _served_segno(self) -> int | None:
        try:
            name = (self.directory / FETCHED_MARKER).read_text().strip()
            return parse_segment_name(name, self.seg_size)[1]
        except (OSError, ValueError):
            return None

    def _put(self, name: str, data: bytes) -> None:
        _write_atomic(self.directory / name, data, self.owner)
        self.fed.append(name)

    def _run(self, first_segment: str) -> None:
        try:
            self._feed(first_segment)
        except BaseException as exc:  # reported by the caller through .error
            self.error = exc
            _write_atomic(self.directory / END_MARKER, b"error\n", self.owner)
        finally:
            (self.directory / FEEDER_MARKER).unlink(missing_ok=True)

    def _feed(self, first_segment: str) -> None:
        tli0, segno = parse_segment_name(first_segment, self.seg_size)
        names = self.repo.wal_names()
        for name in sorted(n for n in names if is_history_name(n)):
            self._put(name, self.repo.get_wal(name))
        _write_atomic(self.directory / HISTORIES_MARKER, b"", self.owner)
        timelines = sorted({int(n[:8], 16) for n in names if is_segment_name(n)})
        timelines = [t for t in timelines if t >= tli0] or [tli0]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="wal-feed") as pool:
            first = segno
            while not self._stop.is_set():
                served = self._served_segno()
                if segno > (first - 1 if served is None else served) + self.window:
                    self._trim()
                    time.sleep(0.02)
                    continue
                # Fetch a few segments ahead concurrently, in order.
                ahead = [segno + i for i in range(self.workers)]
                futures = {
                    (t, s): pool.submit(self._get, segment_name_from_number(t, s, self.seg_size))
                    for s in ahead
                    for t in timelines
                }
                for s in ahead:
                    got_any = False
                    for t in timelines:
                        data = futures[(t, s)].result()
                        if data is not None:
                            self._put(segment_name_from_number(t, s, self.seg_size), data)
                            got_any = True
                    if not got_any:
                        missing = segment_name_from_number(timelines[-1], s, self.seg_size)
                        _write_atomic(
                            self.directory / END_MARKER, (missing + "\n").encode(), self.owner
                        )
                        return
                    segno = s + 1
                self._trim()

    def _get(self, name: str) -> bytes | None:
        try:
            return self.repo.get_wal(name)
        except ObjectNotFound:
            return None

    def _trim(self) -> None:
        """Remove segments well behind what replay has consumed (keep two back)."""
        served = self._served_segno()
        if served is None:
            return
        for entry in os.scandir(self.directory):
            if (
                is_segment_name(entry.name)
                and parse_segment_name(entry.name, self.seg_size)[1] < served - 2
            ):
                Path(entry.path).unlink(missing_ok=True)
