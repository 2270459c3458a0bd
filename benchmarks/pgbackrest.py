"""pgBackRest, configured as ANCHORS.md describes, against a benchmark sandbox cluster.

Two posix repositories (repo2 encrypted with aes-256-cbc), zstd level 3, ``start-fast=y``; the
config, lock, log and spool paths all live in ``WORKDIR/pgbackrest/`` and every command gets
``--config`` (nothing is written to /etc).  pgBackRest runs as PostgreSQL's OS user.

    pbr = PgBackRest(workdir, dataset.primary)
    pbr.setup()                         # config + stanza-create (fresh repositories)
    m = pbr.backup_full()               # Measured: wall time, memory
    m = pbr.restore(target_data_dir)    # into an empty directory
"""

from __future__ import annotations

import secrets
import shlex
import shutil
from pathlib import Path

from benchmarks.common import Measured, dir_bytes, run_measured
from emrdr.pg.instance import PgInstance
from emrdr.pg.osuser import make_dir, run_as

__all__ = ["PROCESS_MAX", "PgBackRest"]

STANZA = "main"
PROCESS_MAX = 2


class PgBackRest:
    """One pgBackRest installation (config + two repositories) for one cluster."""

    def __init__(self, workdir: Path, inst: PgInstance, exe: str | None = None) -> None:
        self.root = Path(workdir).absolute() / "pgbackrest"
        self.inst = inst
        self.user = inst.user
        self.exe = exe or shutil.which("pgbackrest") or "pgbackrest"

    # --- locations ------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "pgbackrest.conf"

    @property
    def repo1(self) -> Path:
        return self.root / "repo1"

    @property
    def repo2(self) -> Path:
        return self.root / "repo2"

    def _cipher_pass(self) -> str:
        path = self.root / "cipher-pass"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def config_text(self) -> str:
        return "\n".join([
            "[global]",
            f"repo1-path={self.repo1}",
            f"repo2-path={self.repo2}",
            "repo2-cipher-type=aes-256-cbc",
            f"repo2-cipher-pass={self._cipher_pass()}",
            "repo1-retention-full=20",
            "repo2-retention-full=20",
            "compress-type=zst",
            "start-fast=y",
            f"lock-path={self.root / 'lock'}",
            f"log-path={self.root / 'log'}",
            f"spool-path={self.root / 'spool'}",
            "log-level-console=warn",
            "log-level-file=info",
            "",
            f"[{STANZA}]",
            f"pg1-path={self.inst.data_dir}",
            f"pg1-port={self.inst.port}",
            f"pg1-socket-path={self.inst.socket_dir}",
            "pg1-user=postgres",
            "",
        ])

    def cmd(self, *args: str) -> list[str]:
        return [self.exe, f"--config={self.config}", f"--stanza={STANZA}", *args]

    def archive_command(self) -> str:
        return " ".join(shlex.quote(a) for a in self.cmd("archive-push")) + " %p"

    # --- set-up -------------------------------------------------------------------------
    def setup(self, fresh: bool = True) -> None:
        """Write the config and create the stanza; ``fresh`` empties both repositories."""
        make_dir(self.root, self.user, 0o700)
        if fresh:
            for d in (self.repo1, self.repo2, self.root / "spool"):
                shutil.rmtree(d, ignore_errors=True)
        for d in (self.repo1, self.repo2, self.root / "lock", self.root / "log",
                  self.root / "spool"):
            make_dir(d, self.user, 0o750)
        self.config.write_text(self.config_text())
        self.config.chmod(0o600)
        make_dir(self.root, self.user, 0o700)
        import os

        if not self.user.is_current:
            os.chown(self.config, self.user.uid, self.user.gid)
        self.run("stanza-create").check("pgbackrest stanza-create")

    def run(self, *args: str, timeout: float = 7200.0) -> Measured:
        return run_measured(self.cmd(*args), user=self.user, cwd=self.root, timeout=timeout)

    # --- the measured operations -----------------------------------------------------------
    def backup_full(self) -> Measured:
        """Full backup into the encrypted repo2 (timed by the caller from ``wall_s``)."""
        return self.run("--repo=2", "--type=full", f"--process-max={PROCESS_MAX}", "backup")

    def _prepare_target(self, data_dir: Path) -> None:
        make_dir(data_dir.parent, self.user, 0o755)
        make_dir(data_dir, self.user, 0o700)

    def restore(self, data_dir: Path) -> Measured:
        """Restore the newest backup of repo2 into the empty ``data_dir`` (recovery to the end
        of the archive is configured but not run)."""
        self._prepare_target(data_dir)
        return self.run("--repo=2", f"--pg1-path={data_dir}", f"--process-max={PROCESS_MAX}",
                        "restore")

    def restore_to_time(self, data_dir: Path, target: str) -> Measured:
        """Restore for PITR to ``target`` (a timestamp with zone), promoting at the target."""
        self._prepare_target(data_dir)
        return self.run("--repo=2", f"--pg1-path={data_dir}", f"--process-max={PROCESS_MAX}",
                        "--type=time", f"--target={target}", "--target-action=promote",
                        "restore")

    def repo2_bytes(self) -> int:
        return dir_bytes(self.repo2)

    def repo2_backup_bytes(self) -> int:
        """Size of repo2 without its WAL archive."""
        return dir_bytes(self.repo2 / "backup")

    def info(self) -> str:
        return run_as(self.user, self.cmd("info"), cwd=self.root, check=False).stdout
