"""PostgreSQL checks of a (restored or live) server: SQL through ``psql``, ``pg_amcheck`` on
every database, ``pg_checksums --check`` on a stopped data directory, and row counts.

Every check returns a :class:`~emrdr.messages.events.CheckResult` whose ``detail`` names what is
wrong: the database, relation and block of a bad page, the file it lives in.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from emrdr.config import Settings
from emrdr.messages.events import CheckResult
from emrdr.pg.osuser import OsUser, run_as

__all__ = [
    "PgCheckError",
    "StepCallback",
    "amcheck_check",
    "checksums_check",
    "client_env",
    "counts_plausible",
    "database_exists",
    "describe_bad_block",
    "list_databases",
    "name_relations",
    "parse_amcheck",
    "parse_checksum_failures",
    "psql",
    "quote_ident",
    "relation_map",
    "valid_identifier",
]

StepCallback = Callable[[str, bool, str], None]
"""``on_step(name, ok, detail)``: one step of a procedure finished (or failed)."""

RELSEG_BLOCKS = 131072  # 1 GiB segment files of 8 KiB blocks
MAX_DETAIL_LINES = 12
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class PgCheckError(RuntimeError):
    """A PostgreSQL client program failed; the message carries its complaint."""


# --- pure helpers ---------------------------------------------------------------------------


def valid_identifier(name: str) -> bool:
    """A plain (unquoted-style) SQL identifier: letters, digits, ``_``, ``$``; at most 63."""
    return bool(_IDENT_RE.match(name))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_CHECKSUM_RE = re.compile(
    r'checksum verification failed in file "(?P<file>[^"]+)", block (?P<block>\d+)'
)


def parse_checksum_failures(output: str) -> list[tuple[str, int]]:
    """``(file, block in file)`` of every failure ``pg_checksums --check`` printed."""
    return [(m["file"], int(m["block"])) for m in _CHECKSUM_RE.finditer(output)]


def describe_bad_block(
    file: str, block_in_file: int, data_dir: Path | None, relations: Mapping[str, str]
) -> str:
    """``relation emr.emr.victim block 3 (file base/16384/16390)`` for a failed block."""
    rel = file
    if data_dir is not None:
        try:
            rel = Path(file).relative_to(data_dir).as_posix()
        except ValueError:
            rel = file
    base, _, seg = rel.partition(".")
    block = block_in_file + (int(seg) * RELSEG_BLOCKS if seg.isdigit() else 0)
    name = relations.get(base)
    if name is None:
        return f"block {block} of file {rel} (relation unknown)"
    return f"relation {name} block {block} (file {rel})"


_AMCHECK_HEAD_RE = re.compile(
    r'^(?P<kind>heap table|btree index|toast table)\s+"(?P<db>[^"]+)"\."(?P<schema>[^"]+)"\.'
    r'"(?P<rel>[^"]+)"(?:, block (?P<block>\d+))?(?:, offset (?P<offset>\d+))?'
)


def parse_amcheck(output: str) -> list[str]:
    """One line per finding of ``pg_amcheck``: ``heap table emr.emr.victim block 0 offset 3:
    <message>``, or the program's own error lines (e.g. ``invalid page in block 0 of
    relation base/16384/16390``)."""
    findings: list[str] = []
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _AMCHECK_HEAD_RE.match(line.strip())
        if m:
            where = f"{m['kind']} {m['db']}.{m['schema']}.{m['rel']}"
            if m["block"] is not None:
                where += f" block {m['block']}"
            if m["offset"] is not None:
                where += f" offset {m['offset']}"
            msg = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1][:1].isspace() else ""
            findings.append(f"{where}: {msg}".rstrip(": "))
            i += 2 if msg else 1
            continue
        if "error" in line.lower() or "ERROR" in line:
            findings.append(line.strip())
        i += 1
    return findings


def counts_plausible(
    recorded: Mapping[str, int], restored: Mapping[str, int], tolerance: float = 0.01,
    slack: int = 50,
) -> tuple[bool, str]:
    """Whether restored EMR row counts are plausible against those recorded at backup time.

    The backup counts rows just before ``pg_backup_stop`` and the drill recovers to exactly
    the stop point, so on a quiet system the counts are equal; writes that committed between
    the count and the stop may differ by a little, so a difference of at most ``tolerance``
    (relative) or ``slack`` rows passes, with the difference named.  A missing table fails.
    """
    if not recorded:
        return True, "the backup recorded no EMR row counts (no emr schema): nothing to compare"
    bad: list[str] = []
    notes: list[str] = []
    for table, want in sorted(recorded.items()):
        if table not in restored:
            bad.append(f"emr.{table} is missing from the restored copy (recorded {want} rows)")
            continue
        got = restored[table]
        if got == want:
            continue
        allowed = max(slack, int(want * tolerance))
        text = f"emr.{table}: {got} rows restored, {want} recorded ({got - want:+d})"
        (bad if abs(got - want) > allowed else notes).append(text)
    if bad:
        return False, "; ".join(bad + notes)
    if notes:
        return True, "within tolerance: " + "; ".join(notes)
    total = sum(recorded.values())
    return True, f"{len(recorded)} EMR tables, {total} rows: equal to the counts recorded"


def _trim(lines: Iterable[str], limit: int = MAX_DETAIL_LINES) -> str:
    items = list(lines)
    shown = items[:limit]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(shown) + more


# --- running client programs ----------------------------------------------------------------


def client_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"}
    if settings.pg.password:
        env["PGPASSWORD"] = settings.pg.password
    return env


def _conn_args(settings: Settings, host: str, port: int) -> list[str]:
    return ["-h", host, "-p", str(port), "-U", settings.pg.user]


def psql(
    settings: Settings, port: int, sql: str, database: str = "postgres",
    host: str = "127.0.0.1", timeout: float = 120.0,
) -> str:
    """Run ``sql`` with psql (unaligned, tuples only, stop on error); its output, stripped."""
    args = [str(settings.pg.bindir / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
            *_conn_args(settings, host, port), "-d", database, "-c", sql]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=client_env(settings), check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise PgCheckError(f"psql on {host}:{port}/{database} timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise PgCheckError(
            f"psql on {host}:{port}/{database} failed: {proc.stderr.strip()} (SQL: {sql[:160]})"
        )
    return proc.stdout.strip()


def list_databases(settings: Settings, port: int, host: str = "127.0.0.1") -> list[str]:
    out = psql(settings, port, "SELECT datname FROM pg_database WHERE datallowconn "
               "ORDER BY datname", host=host)
    return [ln for ln in out.splitlines() if ln]


def database_exists(settings: Settings, port: int, name: str, host: str = "127.0.0.1") -> bool:
    if not valid_identifier(name):
        raise ValueError(f"not a valid database name: {name!r}")
    return psql(settings, port, f"SELECT 1 FROM pg_database WHERE datname = '{name}'",
                host=host) == "1"


def relation_map(settings: Settings, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """``base/<db oid>/<filenode>`` -> ``db.schema.relation`` for every relation with storage."""
    out: dict[str, str] = {}
    sql = ("SELECT pg_relation_filepath(c.oid), current_database() || '.' || n.nspname || '.' "
           "|| c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
           "WHERE pg_relation_filepath(c.oid) IS NOT NULL")
    for db in list_databases(settings, port, host):
        for line in psql(settings, port, sql, database=db, host=host).splitlines():
            path, _, name = line.partition("|")
            if path:
                out[path] = name
    return out


_REL_FILE_RE = re.compile(r"relation (base/\d+/\d+)")


def name_relations(finding: str, relations: Mapping[str, str]) -> str:
    """Append the relation's name to ``... of relation base/16384/16457``."""
    m = _REL_FILE_RE.search(finding)
    if m and m.group(1) in relations:
        return f"{finding} ({relations[m.group(1)]})"
    return finding


def amcheck_check(
    settings: Settings, port: int, host: str = "127.0.0.1", databases: list[str] | None = None,
    jobs: int = 2, timeout: float = 3600.0, name: str = "pg_amcheck --heapallindexed",
    relations: Mapping[str, str] | None = None,
) -> CheckResult:
    """``pg_amcheck --heapallindexed`` on ``databases`` (default: every database).

    ``--install-missing`` creates the ``amcheck`` extension where it is missing (read-only
    checking functions; on a restored copy it is thrown away with the copy).
    """
    targets = ["--all"] if not databases else [a for d in databases for a in ("-d", d)]
    args = [str(settings.pg.bindir / "pg_amcheck"), *_conn_args(settings, host, port),
            "--heapallindexed", "--install-missing", "-j", str(max(1, jobs)), *targets]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=client_env(settings), check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return CheckResult(name=name, passed=False, detail=f"did not finish within {timeout}s")
    output = (proc.stdout + "\n" + proc.stderr).strip()
    if proc.returncode == 0 and not output:
        scope = "every database" if not databases else ", ".join(databases)
        return CheckResult(name=name, passed=True, detail=f"no corruption found in {scope}")
    findings = parse_amcheck(output) or [output[:500] or f"exit {proc.returncode}"]
    findings = list(dict.fromkeys(name_relations(f, relations or {}) for f in findings))
    return CheckResult(name=name, passed=False,
                       detail=f"exit {proc.returncode}: " + _trim(findings))


def checksums_check(
    settings: Settings, data_dir: Path, user: OsUser, relations: Mapping[str, str],
    timeout: float = 3600.0,
) -> CheckResult:
    """``pg_checksums --check`` of a cleanly stopped data directory, run as the server's OS
    user; a failure names relation and block."""
    name = "pg_checksums --check"
    args = [str(settings.pg.bindir / "pg_checksums"), "--check", "-D", str(data_dir)]
    try:
        proc = run_as(user, args, timeout=timeout, check=False, env={"LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        return CheckResult(name=name, passed=False, detail=f"did not finish within {timeout}s")
    output = (proc.stdout + "\n" + proc.stderr).strip()
    if proc.returncode == 0:
        scanned = re.search(r"Blocks scanned:\s*(\d+)", output)
        blocks = f"{scanned.group(1)} blocks" if scanned else "every block"
        return CheckResult(name=name, passed=True, detail=f"{blocks} verified, no failures")
    failures = parse_checksum_failures(output)
    if failures:
        where = [describe_bad_block(f, b, data_dir, relations) for f, b in failures]
        return CheckResult(name=name, passed=False,
                           detail=f"{len(failures)} bad block(s): " + _trim(where))
    return CheckResult(name=name, passed=False,
                       detail=f"exit {proc.returncode}: {output[-500:]}")
