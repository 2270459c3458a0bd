"""Shared helpers of the benchmark harness: measured subprocesses, sizes, statistics, facts.

Every timed step runs in its own process so that wall time includes the program's start-up (as
it does for an operator) and memory can be read per tool: ``ru_maxrss`` from ``wait4`` (the
largest single process of the tree) and the sampled peak of the whole tree's RSS (pgBackRest
runs one process per ``process-max`` worker, emrdr uses threads in one process).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emrdr.pg.osuser import OsUser, subprocess_kwargs

__all__ = [
    "Measured",
    "Summary",
    "dir_bytes",
    "log",
    "machine_facts",
    "run_measured",
    "summarize",
    "warm_page_cache",
]

_SAMPLE_S = 0.05


def log(msg: str) -> None:
    """Progress line on stderr, with a wall-clock stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Measured:
    """One finished child process: wall time, exit code, output and memory high-water marks."""

    args: list[str]
    wall_s: float
    returncode: int
    stdout: str
    stderr: str
    maxrss_kib: int  # largest single process of the tree (ru_maxrss of wait4)
    tree_peak_rss_kib: int  # sampled peak of the summed RSS of the whole process tree

    def check(self, what: str) -> Measured:
        """Raise naming ``what`` and the child's complaint when it failed."""
        if self.returncode != 0:
            detail = (self.stderr.strip() or self.stdout.strip())[-3000:]
            raise RuntimeError(f"{what} failed (exit {self.returncode}): {detail}")
        return self


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _tree_rss_kib(root: int) -> int:
    total = 0
    stack = [root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
        stack.extend(_children(pid))
    return total


def run_measured(
    args: Sequence[str],
    *,
    user: OsUser | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 3600.0,
) -> Measured:
    """Run ``args`` (as ``user`` if given), timing it and sampling its tree's memory."""
    kwargs: dict[str, Any] = subprocess_kwargs(user, cwd) if user is not None else {}
    if cwd is not None and user is None:
        kwargs["cwd"] = str(cwd)
    if env:
        merged = dict(kwargs.get("env") or os.environ)
        merged.update(env)
        kwargs["env"] = merged
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(args), stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, **kwargs
    )
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            chunks[fd].append(data)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in chunks]
    for t in readers:
        t.start()
    # Memory is sampled on a thread; the wait itself blocks, so the wall time is exact (a
    # polling wait would round every figure up to the sampling period).
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(_SAMPLE_S):
            peak[0] = max(peak[0], _tree_rss_kib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _, status, rusage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
        done.set()
    wall = time.perf_counter() - t0
    sampler.join(timeout=5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join(timeout=10)
    maxrss = int(rusage.ru_maxrss) if rusage is not None else 0
    return Measured(
        args=list(args),
        wall_s=wall,
        returncode=proc.returncode,
        stdout=b"".join(chunks[out_r]).decode(errors="replace"),
        stderr=b"".join(chunks[err_r]).decode(errors="replace"),
        maxrss_kib=maxrss,
        tree_peak_rss_kib=max(peak[0], maxrss),
    )


def dir_bytes(path: Path) -> int:
    """Sum of the apparent sizes of every regular file under ``path`` (0 if missing)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if not os.path.islink(os.path.join(root, name)):
                    total += st.st_size
    return total


def warm_page_cache(path: Path) -> int:
    """Read every file under ``path`` once (so both tools start with a warm cache)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(root, name), "rb") as fh:
                while block := fh.read(1 << 20):
                    total += len(block)
    return total


@dataclass(frozen=True)
class Summary:
    """Median and range of repeated measurements."""

    n: int
    median: float
    min: float
    max: float
    values: list[float] = field(default_factory=list)


def summarize(values: Sequence[float]) -> Summary | None:
    vals = [float(v) for v in values]
    if not vals:
        return None
    return Summary(len(vals), statistics.median(vals), min(vals), max(vals), vals)


def summary_dict(values: Sequence[float]) -> dict[str, Any] | None:
    s = summarize(values)
    return asdict(s) if s else None


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def machine_facts(pg_bindir: Path) -> dict[str, Any]:
    """What the figures depend on: CPUs, memory, versions, load when the run started."""
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import zstandard

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": _first_line([str(pg_bindir / "postgres"), "--version"]),
        "pgbackrest": _first_line([shutil.which("pgbackrest") or "pgbackrest", "version"]),
        "python_zstandard": zstandard.__version__,
        "zstd_library": ".".join(str(x) for x in zstandard.ZSTD_VERSION),
        "loadavg_at_start": list(os.getloadavg()),
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
