"""``wanrender bench compare NEW BASE``: regressions between two results files.

Cases are matched by their configuration hash, whatever the environment (the
point is comparing a new driver, torch or commit against a baseline). Per case:
the ratio of p50s for the checked metrics (``--metric``, default ``total``), a
status regression (ok in BASE, not ok in NEW), and absolute limits on NEW
(``--limit pass=85s``: both passes under 85 s; ``--limit vram=40GiB``).

A ComfyUI case (engine comfyui) is matched like any other, with itself in the
other file; ``vram`` is its server's device-wide peak. Where NEW holds both
engines rendering the same thing, they are also set side by side (bench/peers.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from wanrender.bench import peers
from wanrender.bench import results as res
from wanrender.bench.matrix import parse_seconds
from wanrender.bench.runner import STAGES
from wanrender.errors import WanrenderError
from wanrender.spec import parse_bytes

# Limit names that expand to several metrics, and memory metrics (bytes, not seconds).
ALIASES = {"pass": ("pass1", "pass2")}
# nvml/rss: over the whole case (model loading included); *_timed: over the timed renders.
MEMORY = {"vram": ("memory", "torch_allocated_peak"), "reserved": ("memory", "torch_reserved_peak"),
          "nvml": ("memory", "nvml_used_peak"), "rss": ("memory", "host_rss_peak"),
          "nvml_timed": ("memory", "nvml_used_timed_peak"), "rss_timed": ("memory", "host_rss_timed_peak"),
          "server_vram": ("memory", "server_vram_timed_peak")}  # fmt: skip
TIME_METRICS = ("total", "s_per_step") + STAGES


@dataclass(frozen=True)
class Limit:
    metric: str
    value: float  # seconds, or bytes for memory metrics
    text: str


@dataclass(frozen=True)
class CaseVerdict:
    case_hash: str
    label: str
    base_status: str | None
    new_status: str | None
    ratios: dict[str, float | None]
    base_p50: dict[str, float | None]
    new_p50: dict[str, float | None]
    problems: tuple[str, ...]
    engine: str = "wanrender"

    @property
    def regressed(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True)
class Comparison:
    verdicts: tuple[CaseVerdict, ...]
    only_base: tuple[str, ...]
    only_new: tuple[str, ...]
    max_slowdown: float
    metrics: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    n_new: int = 0  # cases in NEW, in BASE
    n_base: int = 0
    pairs: tuple[peers.Pair, ...] = ()  # wanrender and ComfyUI rows of NEW that render the same thing

    @property
    def regressions(self) -> list[CaseVerdict]:
        return [v for v in self.verdicts if v.regressed]

    @property
    def matched(self) -> list[CaseVerdict]:
        return [v for v in self.verdicts if v.base_status is not None]

    def gate_failure(self, allow_missing: bool = False) -> str | None:
        """Why a gate must fail although no case regressed, in one line, or None: a
        comparison of nothing, or of fewer cases than the baseline, proves nothing."""
        if not self.matched:
            return (f"nothing compared: none of the {self.n_new} case(s) in NEW is in BASE ({self.n_base} case(s)) — "
                    "compare two runs of the same matrix")  # fmt: skip
        if self.only_base and not allow_missing:
            names = ", ".join(self.only_base[:3]) + (", ..." if len(self.only_base) > 3 else "")
            return (f"{len(self.only_base)} case(s) of BASE missing from NEW ({names}) — run them "
                    "('bench run --resume' finishes a sweep), or pass --allow-missing")  # fmt: skip
        return None

    def summary(self) -> str:
        n, bad = len(self.matched), len(self.regressions)
        ratios = [v.ratios.get("total") for v in self.verdicts if (v.ratios.get("total") or 0) > 0]
        geo = None
        if ratios:
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        head = f"{bad} regression{'s' if bad != 1 else ''} in {n} matched case{'s' if n != 1 else ''}"
        head += f" (max slowdown {self.max_slowdown:.1%} on {', '.join(self.metrics)})"
        if geo is not None:
            head += f"; total p50 geometric mean ratio {geo:.3f}x"
        if self.only_base:
            head += f"; {len(self.only_base)} case(s) missing from NEW"
        if self.only_new:
            head += f"; {len(self.only_new)} new case(s) without a baseline"
        return head


def parse_percent(text: str) -> float:
    """'5%' or '0.05' -> 0.05: zero or more, finite (a nan threshold would pass everything)."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise WanrenderError(f"--max-slowdown {text!r} is invalid — use a percentage of 0 or more, such as 5%")
    return value


def parse_limit(text: str) -> list[Limit]:
    m = re.fullmatch(r"\s*([a-z0-9_]+)\s*=\s*(\S+)\s*", str(text).lower())
    if not m:
        raise WanrenderError(f"--limit {text!r} is invalid — use METRIC=VALUE, e.g. pass=85s or vram=40GiB")
    name, value = m.groups()
    if name in MEMORY:
        size = float(parse_bytes(value, f"--limit {name}"))
        if size <= 0:
            raise WanrenderError(f"--limit {text!r} is invalid — use a size above zero, e.g. {name}=40GiB")
        return [Limit(name, size, text)]
    names = ALIASES.get(name, (name,))
    for n in names:
        if n not in TIME_METRICS:
            known = ", ".join(list(ALIASES) + list(TIME_METRICS) + list(MEMORY))
            raise WanrenderError(f"--limit {text!r}: unknown metric {name!r} — use one of {known}")
    return [Limit(n, parse_seconds(value, f"--limit {name}"), text) for n in names]


def _metric_value(row: dict, metric: str) -> float | None:
    if metric == "vram" and peers.engine(row) == "comfyui":
        return peers.vram(row)
    if metric in MEMORY:
        section, key = MEMORY[metric]
        return (row.get(section) or {}).get(key)
    return res.p50(row, metric)


def _check_metrics(metrics: tuple[str, ...]) -> None:
    for m in metrics:
        if m not in TIME_METRICS and m not in ALIASES:
            raise WanrenderError(
                f"--metric {m!r} is unknown — use one of {', '.join(list(ALIASES) + list(TIME_METRICS))}"
            )


def compare(new: res.Rows, base: res.Rows, max_slowdown: float = 0.05, limits: list[Limit] | None = None,
            metrics: tuple[str, ...] = ("total",)) -> Comparison:  # fmt: skip
    _check_metrics(metrics)
    metrics = tuple(x for m in metrics for x in ALIASES.get(m, (m,)))
    limits = limits or []
    n_rows, b_rows = new.latest_by_case(), base.latest_by_case()
    verdicts = []
    for h, nrow in n_rows.items():
        brow = b_rows.get(h)
        problems: list[str] = []
        shown = tuple(dict.fromkeys(metrics + ("total", "pass1", "pass2")))
        new_p = {m: _metric_value(nrow, m) for m in shown}
        base_p = {m: _metric_value(brow, m) for m in shown} if brow else {m: None for m in shown}
        ratios = {m: (new_p[m] / base_p[m] if new_p[m] is not None and base_p[m] else None) for m in shown}
        if brow is not None:
            if brow["status"] == "ok" and nrow["status"] != "ok":
                problems.append(f"status {brow['status']} -> {nrow['status']}")
            for m in metrics:
                r = ratios[m]
                if nrow["status"] == "ok" and new_p[m] is None and base_p[m] is not None:
                    problems.append(f"{m}: no p50 in NEW to hold against BASE's {base_p[m]:.3f}s")
                if r is not None and r > 1 + max_slowdown:
                    problems.append(f"{m} p50 {base_p[m]:.3f}s -> {new_p[m]:.3f}s ({r:.3f}x > {1 + max_slowdown:.3f}x)")
        for lim in limits:
            v = _metric_value(nrow, lim.metric)
            if v is not None and v > lim.value:
                shown_v = f"{v / 2**30:.2f} GiB" if lim.metric in MEMORY else f"{v:.3f}s"
                problems.append(f"{lim.metric} {shown_v} over the limit {lim.text}")
        if brow is None and not problems:
            continue  # a new case with nothing to hold it to
        verdicts.append(CaseVerdict(h, nrow.get("label", h), brow["status"] if brow else None, nrow["status"],
                                    ratios, base_p, new_p, tuple(problems), peers.engine(nrow)))  # fmt: skip
    only_base = tuple(b_rows[h].get("label", h) for h in b_rows if h not in n_rows)
    only_new = tuple(n_rows[h].get("label", h) for h in n_rows if h not in b_rows)
    notes = []
    for name, rows in (("NEW", new), ("BASE", base)):
        if rows.skipped_lines:
            notes.append(f"{name}: {rows.skipped_lines} unreadable line(s) skipped (a torn write)")
    return Comparison(tuple(verdicts), only_base, only_new, max_slowdown, metrics, tuple(notes), len(n_rows),
                      len(b_rows), tuple(peers.pairs(list(new.latest_by_key().values()))))  # fmt: skip


def compare_files(new: Path, base: Path, max_slowdown: str = "5%", limits: list[str] | None = None,
                  metrics: str = "total") -> Comparison:  # fmt: skip
    # Every option is checked before a file is read: a typo fails fast, whatever the files hold.
    slowdown = parse_percent(max_slowdown)
    parsed = [lim for text in limits or [] for lim in parse_limit(text)]
    wanted = tuple(m.strip() for m in metrics.split(",") if m.strip())
    if not wanted:
        raise WanrenderError(f"--metric {metrics!r} names no metric — use e.g. total or pass,total")
    _check_metrics(wanted)
    return compare(res.read_results(new), res.read_results(base), slowdown, parsed, wanted)
