"""``wanrender tune``: find the fastest knobs on this device and write a profile.

For each resolution/frame bucket it runs a coordinate search through the bench
runner (each candidate a child process under a timeout, warm-up excluded, p50
of the timed repeats): one axis at a time — attention, precision, compile,
memory plan — every value is tried with the others at their best so far, and
the fastest that finished ``ok`` is kept. That costs the sum of the axis sizes
per bucket instead of their product. Candidates the device cannot run (fp8
below compute capability 8.9, a backend that is not installed) are skipped
without starting a process. Measurements are cached in the tune folder's
results file, so an interrupted or repeated tune does not measure twice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from wanrender.bench import results as res
from wanrender.bench.matrix import Case
from wanrender.errors import WanrenderError

AXES = ("attention", "precision", "compile", "memory_plan")
MIN_CASE_TIMEOUT_S = 60.0

Events = Callable[[str, dict], None]


@dataclass(frozen=True)
class Space:
    attention: tuple[str, ...]
    precision: tuple[str, ...]
    compile: tuple[str, ...]
    memory_plan: tuple[str, ...] = ("auto",)


def default_space(device: str) -> Space:
    """Everything that can run here. The reference attention (fp32 maths) is a test
    twin, not a contender, on a GPU."""
    from wanrender.kernels import attention as attn

    cuda = device.startswith("cuda")
    if not cuda:
        return Space(("sdpa", "reference"), ("bf16",), ("off", "default"))
    names = tuple(n for n in attn.REGISTRY if n != "reference")
    return Space(names, ("fp8", "bf16"), ("off", "default"))


def parse_space(base: Space, overrides: dict[str, str | None]) -> Space:
    """Comma lists from the command line replace an axis of the default space."""
    changes = {}
    for axis, text in overrides.items():
        if text:
            vals = tuple(v.strip() for v in text.split(",") if v.strip())
            if not vals:
                raise WanrenderError(f"--{axis} {text!r} is empty — give one or more values separated by commas")
            changes[axis] = vals
    return replace(base, **changes)


def default_buckets(device: str) -> list[tuple[int, int, int]]:
    if device.startswith("cuda"):
        return [(81, 832, 480), (81, 832, 1216), (81, 1280, 720)]
    return [(5, 80, 64)]


def parse_buckets(text: str) -> list[tuple[int, int, int]]:
    """'81x832x1216,81x832x480' (FRAMESxWIDTHxHEIGHT)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", part)
        if not m:
            raise WanrenderError(f"--buckets {part!r} is invalid — use FRAMESxWIDTHxHEIGHT, e.g. 81x832x1216")
        out.append(tuple(int(v) for v in m.groups()))
    return out  # type: ignore[return-value]


def runnable(device: str, knobs: dict[str, str], gpus: int = 1) -> str | None:
    """Why the knobs cannot run on ``device`` (None: they can); ``gpus`` > 1: sequence
    parallel, which keeps both experts resident (other memory plans are skipped)."""
    from wanrender.runtime.plan import make_plan
    from wanrender.runtime.planner import check_parallel_memory

    try:
        make_plan(device, knobs["precision"], knobs["attention"], knobs["compile"])
        check_parallel_memory(knobs.get("memory_plan", "auto"), gpus)
    except WanrenderError as e:
        return str(e)
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "device"


def tune(
    device: str,
    base: Case,
    buckets: list[tuple[int, int, int]],
    space: Space,
    budget_s: float,
    work_dir: Path,
    events: Events | None = None,
) -> dict:
    """Search, and return the profile document (``write_profile`` writes it)."""
    from wanrender.bench.env import snapshot
    from wanrender.bench.runner import case_key, run_case
    from wanrender.runtime.hardware import device_name

    env = snapshot()
    results_path = work_dir / "results.jsonl"
    cache = res.read_rows_if_any(results_path).latest_by_key()
    t_start = time.monotonic()
    exhausted = False
    out_buckets = []
    say = events or (lambda e, d: None)
    for frames, width, height in buckets:
        current = {a: getattr(space, a)[0] for a in AXES}
        tried: list[dict] = []
        best_row: dict | None = None
        for axis in AXES:
            scores: dict[str, tuple[float, dict]] = {}
            for value in getattr(space, axis):
                knobs = {**current, axis: value}
                if any(t["knobs"] == knobs for t in tried):
                    prev = next(t for t in tried if t["knobs"] == knobs)
                    if prev.get("row") is not None:
                        scores[value] = (prev["p50"], prev["row"])
                    continue
                why = runnable(device, knobs, base.gpus)
                if why:
                    tried.append({"knobs": knobs, "status": "skipped", "why": why})
                    say("skip", {"knobs": knobs, "why": why})
                    continue
                left = budget_s - (time.monotonic() - t_start)
                if left <= 0:
                    exhausted = True
                    break
                case = replace(base, frames=frames, width=width, height=height, device=device, **knobs,
                               timeout_s=min(base.timeout_s, max(left, MIN_CASE_TIMEOUT_S)))  # fmt: skip
                label = f"{frames}x{width}x{height} " + " ".join(f"{k}={v}" for k, v in knobs.items())
                key = case_key(case, env["fingerprint"])
                row = cache.get(key)
                if row is None or row["status"] != "ok":
                    say("start", {"label": label, "elapsed": time.monotonic() - t_start})
                    row = run_case(case, label, work_dir, env, run_id="tune")
                    res.append_row(results_path, row)
                    cache[key] = row
                p50 = res.p50(row, "total")
                entry = {"knobs": knobs, "status": row["status"], "total_p50_s": p50}
                if row["status"] != "ok":
                    entry["why"] = row.get("message")
                tried.append({**entry, "row": row if row["status"] == "ok" else None, "p50": p50})
                say("done", {"label": label, "status": row["status"], "p50": p50})
                if row["status"] == "ok" and p50 is not None:
                    scores[value] = (p50, row)
            if scores:
                value = min(scores, key=lambda v: scores[v][0])
                current[axis] = value
                best_row = scores[value][1]
            if exhausted:
                break
        name = f"{frames}x{width}x{height}"
        bucket = {"name": name, "frames": frames, "width": width, "height": height}
        if best_row is None:
            say("bucket-failed", {"bucket": name})
            out_buckets.append({**bucket, "knobs": {}, "measured": {"note": "no candidate finished ok"},
                                "tried": [_public(t) for t in tried]})  # fmt: skip
        else:
            mem = best_row.get("memory") or {}
            measured = {"total_p50_s": res.p50(best_row, "total"), "s_per_step_p50": res.p50(best_row, "s_per_step"),
                        "pass1_p50_s": res.p50(best_row, "pass1"), "pass2_p50_s": res.p50(best_row, "pass2"),
                        "torch_allocated_peak_gib": _gib(mem.get("torch_allocated_peak")),
                        "host_rss_peak_gib": _gib(mem.get("host_rss_peak")),  # loading included
                        "host_rss_timed_peak_gib": _gib(mem.get("host_rss_timed_peak")),
                        "warmup_s": best_row.get("warmup_s"), "repeats": (best_row.get("total") or {}).get("n")}  # fmt: skip
            out_buckets.append({**bucket, "knobs": dict(current), "measured": measured,
                                "tried": [_public(t) for t in tried]})  # fmt: skip
        if exhausted:
            break
    usable = [b for b in out_buckets if b["knobs"]]
    if not usable:
        raise WanrenderError("tune: no candidate finished ok — see the logs under "
                             f"{work_dir / 'logs'} (raise --budget or narrow the search)")  # fmt: skip
    dname = device_name(device)
    return {
        "schema": 1,
        "device": dname,
        # A profile measured on several GPUs per video is applied only when named
        # (--profile FILE): this match string occurs in no device name.
        "match": [dname] if base.gpus == 1 else [f"{dname} x{base.gpus} GPUs"],
        "estimated": False,
        "provenance": {
            "source": "wanrender tune",
            "measured": time.strftime("%Y-%m-%d"),
            "env_fingerprint": env["fingerprint"],
            "torch": env.get("torch"),
            "cuda": env.get("cuda"),
            "driver": env.get("driver"),
            "wanrender": env.get("wanrender"),
            "git_commit": env.get("git_commit"),
            "models": base.models,
            "preset": base.preset,
            "repeats": base.repeats,
            "gpus": base.gpus,
            "budget_s": round(budget_s, 1),
            "spent_s": round(time.monotonic() - t_start, 1),
            "complete": not exhausted and len(out_buckets) == len(buckets),
            "search": {a: list(getattr(space, a)) for a in AXES},
            "results": str(results_path),
        },  # fmt: skip
        "buckets": usable,
    }


def _public(t: dict) -> dict:
    return {k: v for k, v in t.items() if k not in ("row", "p50")}


def _gib(v: int | None) -> float | None:
    return None if v is None else round(v / 2**30, 3)


def default_output(device_label: str, gpus: int = 1) -> Path:
    from wanrender.runtime.profiles import user_dir

    return user_dir() / f"{_slug(device_label)}{f'-x{gpus}' if gpus > 1 else ''}.yaml"


def write_profile(path: Path, doc: dict, header: str) -> Path:
    import json

    import yaml

    from wanrender.media.atomic import atomic_write_text
    from wanrender.runtime.profiles import parse_profile

    doc = json.loads(json.dumps(doc, default=str))  # plain types only (torch's version is a str subclass)
    parse_profile(doc, str(path))  # never write a profile the readers could not read back
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(doc, sort_keys=False, width=110)
    atomic_write_text(path, text)
    return path
