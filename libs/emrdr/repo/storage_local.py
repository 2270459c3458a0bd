"""Local filesystem backend: one file per object under a root directory.

A put writes a temp file in the object's own directory, fsyncs it, then ``os.link``s it to the
final name -- link never replaces an existing name, so two writers racing for one key cannot
clobber each other and the loser compares bytes like any other repeated put -- and fsyncs the
directory. A crash leaves at most a ``.*.tmp`` file, which listings ignore. Running out of space
raises :class:`StorageFullError` naming the path and removes the temp file.

Bulk writers (a backup's chunks) use :meth:`LocalStorage.put_new` + :meth:`LocalStorage.sync_dirs`:
the same durable write and link, but each directory is fsynced once at the end of the batch
instead of after every object (the file itself is always fsynced before it gets its name, so a
name never points at unsynced content).

Directories and files get ``dir_mode`` / ``file_mode`` (defaults 0o770 / 0o640, umask ignored)
and, optionally, ``owner=(uid, gid)``, so PostgreSQL's OS user can run ``archive_command``
against the same repository as the services.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from emrdr.repo.errors import ObjectExists, ObjectNotFound, StorageFullError
from emrdr.repo.storage import FEATURE_FSYNC, FEATURE_LOCAL_PATH, Storage, validate_key

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_BLOCK = 1 << 20


class LocalStorage(Storage):
    """Objects as files under ``root`` (created if missing)."""

    features = frozenset({FEATURE_FSYNC, FEATURE_LOCAL_PATH})

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        dir_mode: int = 0o770,
        file_mode: int = 0o640,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.owner = owner
        self._ensure_dir(self.root)

    def describe(self) -> str:
        return f"local repository {self.root}"

    def path_of(self, key: str) -> Path:
        """The file that holds ``key`` (it may not exist)."""
        return self.root / validate_key(key)

    # --- hooks ---------------------------------------------------------------------------
    def _put(self, key: str, data: bytes) -> bool:
        path = self.root / key
        existing = self._compare_existing(path, key, _bytes_blocks(data), len(data))
        if existing is not None:
            return existing
        return self._write_new(path, key, lambda fd: _write_all(fd, data), data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> bool:
        source = Path(path)
        target = self.root / validate_key(key)
        size = source.stat().st_size
        with source.open("rb") as fh:
            existing = self._compare_existing(target, key, _file_blocks(fh), size)
        if existing is not None:
            return existing

        def copy(fd: int) -> None:
            with source.open("rb") as fh:
                while block := fh.read(_BLOCK):
                    _write_all(fd, block)

        return self._write_new(target, key, copy, source)

    def put_new(
        self, key: str, data: bytes | bytearray | memoryview, synced_dirs: set[str]
    ) -> bool:
        """:meth:`put` of an object expected to be new, leaving the directory fsync to
        :meth:`sync_dirs` (its path is added to ``synced_dirs``); not durable until then."""
        path = self.root / validate_key(key)
        blob = bytes(data) if not isinstance(data, bytes) else data
        created = self._write_new(
            path, key, lambda fd: _write_all(fd, blob), blob, sync_dir=False
        )
        synced_dirs.add(str(path.parent))
        return created

    def sync_dirs(self, dirs: Iterable[str], threads: int = 8) -> None:
        """fsync directories (from :meth:`put_new`) so the names written into them are durable."""
        todo = sorted(set(dirs))
        if len(todo) <= 1:
            for d in todo:
                _fsync_dir(Path(d))
            return
        with ThreadPoolExecutor(min(threads, len(todo)), thread_name_prefix="dir-sync") as pool:
            list(pool.map(lambda d: _fsync_dir(Path(d)), todo))

    def _get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.describe()) from None

    def _exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def _size(self, key: str) -> int:
        path = self.root / key
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key, self.describe()) from None
        if not path.is_file():
            raise ObjectNotFound(key, self.describe())
        return st.st_size

    def _list(self, prefix: str) -> list[str]:
        dir_part, _, _ = prefix.rpartition("/")
        start = self.root / dir_part if dir_part else self.root
        base = f"{dir_part}/" if dir_part else ""
        return [key for key in _walk(start, base) if key.startswith(prefix)]

    def _delete(self, key: str) -> None:
        path = self.root / key
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        _fsync_dir(path.parent)

    # --- internals ---------------------------------------------------------------------------
    def _compare_existing(
        self, path: Path, key: str, blocks: Iterator[bytes], size: int
    ) -> bool | None:
        """None if ``path`` is absent, False if it holds the same bytes; else ObjectExists."""
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            raise ObjectExists(key)
        if st.st_size != size:
            raise ObjectExists(key)
        with path.open("rb") as fh:
            for block in blocks:
                if fh.read(len(block)) != block:
                    raise ObjectExists(key)
        return False

    def _write_new(
        self, path: Path, key: str, write: Callable[[int], None], source: bytes | Path,
        *, sync_dir: bool = True,
    ) -> bool:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            self._ensure_dir(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                write(fd)
                os.fsync(fd)
                os.fchmod(fd, self.file_mode)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                # Lost a race with another writer: same rules as an existing object.
                if isinstance(source, Path):
                    with source.open("rb") as fh:
                        self._compare_existing(path, key, _file_blocks(fh), source.stat().st_size)
                else:
                    self._compare_existing(path, key, _bytes_blocks(source), len(source))
                return False
            finally:
                tmp.unlink(missing_ok=True)
            if sync_dir:
                _fsync_dir(path.parent)
            return True
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _FULL_ERRNOS:
                raise StorageFullError(str(path)) from exc
            raise

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` and missing parents with our mode/owner, fsyncing each parent."""
        if directory.is_dir():
            return
        missing: list[Path] = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue
            os.chmod(d, self.dir_mode)
            if self.owner is not None:
                os.chown(d, *self.owner)
            _fsync_dir(d.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _bytes_blocks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), _BLOCK):
        yield bytes(view[start : start + _BLOCK])


def _file_blocks(fh: BinaryIO) -> Iterator[bytes]:
    while block := fh.read(_BLOCK):
        yield block


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _walk(directory: Path, base: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), f"{base}{entry.name}/")
        elif entry.is_file(follow_symlinks=False):
            yield f"{base}{entry.name}"
