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
    """The rows of a results file; lines that are not rows (a torn write) are counted, not kept."""
    rows, bad, _ = _parse(path)
    return Rows(tuple(rows), bad)


def read_results(path: Path) -> Rows:
    """The rows of a results file given by the user (``compare``, ``report``): a results
    file or the ``bench run`` folder holding one, with at least one row."""
    p = Path(path)
    if p.is_dir():
        if not (p / "results.jsonl").is_file():
            raise WanrenderError(f"{path}: a folder without results.jsonl — pass OUT/results.jsonl of 'bench run' "
                                 "or its OUT folder")  # fmt: skip
        p = p / "results.jsonl"
    rows, bad, why = _parse(p)
    if not rows:
        if not bad:
            raise WanrenderError(f"{p}: empty, no case results in it — pass the results of a 'bench run' that ran")
        raise WanrenderError(f"{p}: not a bench results file ({why}) — pass OUT/results.jsonl of 'bench run'")
    return Rows(tuple(rows), bad)


def _parse(path: Path) -> tuple[list[dict], int, str]:
    """(rows, lines that are not rows, why the first of them is not)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise WanrenderError(f"{path}: no such results file — run 'wanrender bench run MATRIX.yaml' first") from None
    except IsADirectoryError:
        raise WanrenderError(f"{path}: a folder, not a results file — pass OUT/results.jsonl of 'bench run'") from None
    except OSError as e:
        raise WanrenderError(
            f"{path}: cannot read the results file ({e.strerror}) — check it and its permissions"
        ) from None
    rows, bad, why = [], 0, ""
    # Undecodable bytes become U+FFFD: such a line then fails as JSON or as a row, like a torn one.
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = row_problem(row)
        except (json.JSONDecodeError, RecursionError):
            problem = "not JSON"
        if problem is None:
            rows.append(row)
            continue
        bad += 1
        why = why or f"line {n}: {problem}"
    return rows, bad, why


_SECTIONS = {"case": dict, "stages": dict, "memory": dict, "telemetry": dict, "env": dict, "label": str,
             "message": str, "log": str, "log_tail": str, "env_fingerprint": str}  # fmt: skip
_STATS = ("total", "s_per_step", "wall", "energy_j")


def row_problem(row: object) -> str | None:
    """Why ``row`` is not a row that ``bench run`` writes (the parts compare and report read), or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for k in ("key", "case_hash"):
        if not isinstance(row.get(k), str):
            return f"no {k}"
    if row.get("status") not in STATUSES:
        return f"status {row.get('status')!r} is not one of {', '.join(STATUSES)}"
    schema = row.get("schema", SCHEMA)
    if not isinstance(schema, int) or schema > SCHEMA:
        return f"schema {schema!r}, newer than this wanrender reads ({SCHEMA}) — upgrade wanrender"
    for k, kind in _SECTIONS.items():
        if row.get(k) is not None and not isinstance(row[k], kind):
            return f"{k} is not a {'mapping' if kind is dict else 'string'}"
    stats = [(k, row.get(k)) for k in _STATS] + [(f"stage {k}", v) for k, v in (row.get("stages") or {}).items()]
    for k, st in stats:
        if st is None:
            continue
        if not isinstance(st, dict) or not all(_number(st.get(q)) for q in ("p50", "p90", "min", "max")):
            return f"{k} is not a p50/p90 summary of numbers"
    mem = row.get("memory") or {}
    if not all(_number(v) for k, v in mem.items() if k != "plan"):
        return "memory holds something other than numbers"
    return None


def _number(v: object) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


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
