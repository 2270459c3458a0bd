"""The restore_command of a restored copy, run by a real shell the way PostgreSQL runs it."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from emrdr.engine.restore import PENDING_DIR, fetch_command

NAME = "000000010000000000000003"


def _run(staging: Path, name: str, dest: Path) -> subprocess.CompletedProcess[str]:
    """Substitute %f/%p/%% as PostgreSQL does and run the command with /bin/sh."""
    cmd = fetch_command(staging)
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] == "%" and i + 1 < len(cmd):
            out.append({"f": name, "p": str(dest), "%": "%"}.get(cmd[i + 1], cmd[i:i + 2]))
            i += 2
        else:
            out.append(cmd[i])
            i += 1
    return subprocess.run(["/bin/sh", "-c", "".join(out)], capture_output=True, text=True,
                          timeout=30, check=False)


def _staging(tmp_path: Path) -> tuple[Path, Path]:
    staging = tmp_path / "50% data.wal-staging"  # a space and a percent sign in the path
    (staging / PENDING_DIR).mkdir(parents=True)
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    return staging, wal


def test_a_staged_file_is_linked_not_copied(tmp_path: Path) -> None:
    staging, wal = _staging(tmp_path)
    (staging / NAME).write_bytes(b"w" * 1000)
    res = _run(staging, NAME, wal / "RECOVERYXLOG")
    assert res.returncode == 0, res.stderr
    assert (wal / "RECOVERYXLOG").read_bytes() == b"w" * 1000
    assert os.stat(wal / "RECOVERYXLOG").st_ino == os.stat(staging / NAME).st_ino


def test_a_file_never_staged_fails_at_once(tmp_path: Path) -> None:
    staging, wal = _staging(tmp_path)
    t = time.monotonic()
    res = _run(staging, "00000002.history", wal / "RECOVERYHISTORY")
    assert res.returncode != 0 and time.monotonic() - t < 5
    assert not (wal / "RECOVERYHISTORY").exists()


def test_a_pending_file_is_waited_for(tmp_path: Path) -> None:
    staging, wal = _staging(tmp_path)
    (staging / PENDING_DIR / NAME).touch()

    def stage_later() -> None:
        time.sleep(0.3)
        (staging / NAME).write_bytes(b"late")
        (staging / PENDING_DIR / NAME).unlink()

    threading.Thread(target=stage_later).start()
    t = time.monotonic()
    res = _run(staging, NAME, wal / "RECOVERYXLOG")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t >= 0.25
    assert (wal / "RECOVERYXLOG").read_bytes() == b"late"


def test_a_pending_file_abandoned_fails(tmp_path: Path) -> None:
    """Staging failed (its markers removed): the waiting command gives up with an error."""
    staging, wal = _staging(tmp_path)
    (staging / PENDING_DIR / NAME).touch()
    threading.Timer(0.3, (staging / PENDING_DIR / NAME).unlink).start()
    res = _run(staging, NAME, wal / "RECOVERYXLOG")
    assert res.returncode != 0
    assert not (wal / "RECOVERYXLOG").exists()
