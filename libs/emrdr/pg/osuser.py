"""The OS user that runs PostgreSQL.

``initdb`` and ``postgres`` refuse to run as root.  When emrdr runs as root, every PostgreSQL
program runs as an unprivileged system user (``Settings.pg.os_user``, default ``emrdr``), created
on demand by :func:`ensure_os_user`.  When emrdr is not root, everything runs as the current
user and these helpers do nothing special.

    user = ensure_os_user("emrdr")
    make_dir(base / "pg-primary", user)          # parents 0755, leaf owned by the user
    run_as(user, ["initdb", "-D", str(data)])    # subprocess with that uid/gid
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OsUser",
    "OsUserError",
    "can_access_as",
    "can_exec_as",
    "chown_tree",
    "current_user",
    "ensure_os_user",
    "is_root",
    "make_dir",
    "run_as",
    "subprocess_kwargs",
]


class OsUserError(RuntimeError):
    """The OS user could not be found, created or used."""


@dataclass(frozen=True)
class OsUser:
    """A resolved OS account."""

    name: str
    uid: int
    gid: int
    home: Path
    groups: tuple[int, ...] = field(default=())

    @property
    def is_current(self) -> bool:
        """True when this is who the process already runs as (no switching needed)."""
        return self.uid == os.geteuid()


def is_root() -> bool:
    return os.geteuid() == 0


def _from_pwd(entry: pwd.struct_passwd) -> OsUser:
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return OsUser(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=Path(entry.pw_dir),
        groups=groups,
    )


def current_user() -> OsUser:
    """The account this process runs as."""
    return _from_pwd(pwd.getpwuid(os.geteuid()))


def ensure_os_user(name: str) -> OsUser:
    """The account PostgreSQL should run as: ``name`` (created if missing) when root, else us.

    The account is a system user with its own group, no login shell, and a home directory
    ``/var/lib/<name>-os`` (only used as ``$HOME`` for child processes).
    """
    if not is_root():
        return current_user()
    if name == "root":
        raise OsUserError("PostgreSQL cannot run as root: choose another pg.os_user")
    try:
        return _from_pwd(pwd.getpwnam(name))
    except KeyError:
        pass
    home = Path("/var/lib") / f"{name}-os"
    proc = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "emrdr PostgreSQL sandbox",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit code 9: created concurrently by someone else, which is fine.
    if proc.returncode not in (0, 9):
        raise OsUserError(
            f"could not create OS user {name!r} with useradd (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    try:
        user = _from_pwd(pwd.getpwnam(name))
    except KeyError as exc:
        raise OsUserError(f"useradd reported success but user {name!r} does not exist") from exc
    user.home.mkdir(parents=True, exist_ok=True)
    os.chown(user.home, user.uid, user.gid)
    return user


def subprocess_kwargs(user: OsUser, cwd: Path | None = None) -> dict[str, Any]:
    """Keyword arguments for ``subprocess.run``/``Popen`` that run a child as ``user``.

    Sets ``HOME``/``USER``/``LOGNAME`` and a working directory the user can enter (its home,
    unless ``cwd`` is given).  For the current user only ``cwd`` is set when given.
    """
    if user.is_current:
        return {"cwd": str(cwd)} if cwd is not None else {}
    env = dict(os.environ)
    env.update({"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name})
    return {
        "user": user.uid,
        "group": user.gid,
        "extra_groups": [],
        "env": env,
        "cwd": str(cwd if cwd is not None else user.home),
    }


def run_as(
    user: OsUser,
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as ``user``, capturing text output.

    With ``check`` a non-zero exit raises :class:`subprocess.CalledProcessError` whose
    ``stderr`` holds the program's complaint.
    """
    kwargs = subprocess_kwargs(user, cwd)
    if env:
        merged = dict(kwargs.get("env") or os.environ)
        merged.update(env)
        kwargs["env"] = merged
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def make_dir(path: Path, user: OsUser, mode: int = 0o700) -> Path:
    """Create ``path`` owned by ``user`` with ``mode``; missing parents get mode 0755.

    Parents are created by (and owned by) the calling process, and are left traversable so the
    user can reach ``path``.  An existing ``path`` is re-owned and re-moded.
    """
    path = Path(path)
    missing: list[Path] = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for parent in reversed(missing):
        parent.mkdir(exist_ok=True)
        parent.chmod(0o755)
    path.mkdir(exist_ok=True)
    if not user.is_current:
        os.chown(path, user.uid, user.gid)
    path.chmod(mode)
    return path


def chown_tree(path: Path, user: OsUser) -> None:
    """Give ``path`` and everything below it to ``user`` (no-op for the current user)."""
    if user.is_current:
        return
    path = Path(path)
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                os.chown(os.path.join(root, n), user.uid, user.gid, follow_symlinks=False)


def _allowed(st: os.stat_result, user: OsUser, bits: int) -> bool:
    """Whether the mode bits grant ``bits`` (an R/W/X mask in "other" position) to ``user``."""
    if user.uid == 0:
        # root may read/write anything and execute anything with any x bit set.
        if bits & 0o1 and not stat.S_ISDIR(st.st_mode):
            return bool(st.st_mode & 0o111)
        return True
    if st.st_uid == user.uid:
        granted = (st.st_mode >> 6) & 0o7
    elif st.st_gid == user.gid or st.st_gid in user.groups:
        granted = (st.st_mode >> 3) & 0o7
    else:
        granted = st.st_mode & 0o7
    return granted & bits == bits


def can_access_as(user: OsUser, path: Path, want: str = "r") -> bool:
    """Whether ``user`` can reach ``path`` and has ``want`` (letters of "rwx") on it.

    Checks traversal (x) of every ancestor directory and the mode bits of ``path``, following
    symlinks; ignores ACLs.
    """
    bits = (4 if "r" in want else 0) | (2 if "w" in want else 0) | (1 if "x" in want else 0)
    path = Path(os.path.abspath(path))
    try:
        for ancestor in reversed(path.parents):
            if not _allowed(ancestor.stat(), user, 0o1):
                return False
        return _allowed(path.stat(), user, bits)
    except OSError:
        return False


def can_exec_as(user: OsUser, path: Path) -> bool:
    """Whether ``user`` could execute the file ``path`` (e.g. an ``archive_command`` program)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with p.open("rb") as fh:
            script = fh.read(2) == b"#!"
    except OSError:
        script = True
    # A script is read by its interpreter, so it needs r as well as x.
    return can_access_as(user, p, "rx" if script else "x")
