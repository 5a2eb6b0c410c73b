"""The results file: append-only JSONL, one row per case run.

Rows are never rewritten. Each row goes out in one ``write`` on a file opened
with ``O_APPEND`` and is fsynced, so a crash can at worst leave a torn last
line; readers skip lines that do not parse, and the next append first ends such
a line so the new row stays whole.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import WanrenderError

SCHEMA = 1
STATUSES = ("ok", "oom", "timeout", "crash", "error")


@dataclass(frozen=True)
class Rows:
    rows: tuple[dict, ...]
    skipped_lines: int  # lines that did not parse (a torn write)

    def latest_by_key(self) -> dict[str, dict]:
        """The last row of each key: a re-run appends, it does not replace."""
        return {r["key"]: r for r in self.rows}

    def latest_by_case(self) -> dict[str, dict]:
        """The last row of each case configuration, whatever the environment."""
        return {r["case_hash"]: r for r in self.rows}


def append_row(path: Path, row: dict) -> None:
    line = json.dumps(row, separators=(",", ":"), default=str, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if _ends_torn(fd):
            os.write(fd, b"\n")
        data = line.encode("utf-8")
        written = 0
        while written < len(data):  # a short write on a full disk: the reader skips the torn tail
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    return os.pread(fd, 1, size - 1) != b"\n"


def read_rows(path: Path) -> Rows:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise WanrenderError(f"{path}: no such results file — run 'wanrender bench run MATRIX.yaml' first") from None
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "key" in row and "case_hash" in row:
            rows.append(row)
        else:
            bad += 1
    return Rows(tuple(rows), bad)


def read_rows_if_any(path: Path) -> Rows:
    return read_rows(path) if Path(path).exists() else Rows((), 0)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None when empty."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: list[float]) -> dict:
    """p50/p90/min/max over repeats, rounded to what a wall clock can tell apart."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"p50": None, "p90": None, "min": None, "max": None, "n": 0, "values": []}
    return {"p50": round(percentile(vals, 50), 4), "p90": round(percentile(vals, 90), 4),
            "min": round(min(vals), 4), "max": round(max(vals), 4), "n": len(vals),
            "values": [round(v, 4) for v in vals]}  # fmt: skip


def p50(row: dict, metric: str) -> float | None:
    """A row's p50 of ``total``, ``s_per_step``, or a stage (``pass1``, ``vae_decode``, ...)."""
    if metric in ("total", "s_per_step", "energy_j"):
        s = row.get(metric)
    else:
        s = (row.get("stages") or {}).get(metric)
    return s.get("p50") if isinstance(s, dict) else None
