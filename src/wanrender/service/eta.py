"""The ``eta_s`` of GET /v1/jobs/{id}: seconds until the job should be done.

A job's own render time T comes from the planner's time prediction for its request
on the GPU each live worker advertises (heartbeat field ``gpu``, a named spec of
runtime/gpus.py; the standard fp8 file set), the median over the workers. On the
CPU, where the planner has no time model, T is calibrated from the jobs this API
saw finish (seconds per unit of work, ``work_units``); before the first one
finishes it is unknown (null).

- queued: T x (1 + ahead / workers), ``ahead`` being the jobs the queue hands out
  before it (priority.queue_ahead) — every job ahead is assumed to cost T;
- leased or running: what is left of T, or, when the render already runs past
  T, the elapsed time scaled by the step progress;
- finished: 0; no live worker: null.
"""

from __future__ import annotations

import statistics
import time

from wanrender.service.jobs import JobRecord, JobState


def work_units(request: dict) -> float:
    """Megapixel-frames through the DiT (each step, doubled with CFG) plus about two
    steps' worth for the VAE and the MP4: a rough CPU time scale."""
    try:
        mp = request["frames"] * request["width"] * request["height"] / 1e6
        batch = 1 if float(request.get("cfg", 1.0)) == 1.0 else 2
        return (int(request["steps"]) * batch + 2) * mp
    except (KeyError, TypeError, ValueError):
        return 0.0


def planner_seconds(request: dict, gpu: str) -> float | None:
    """The planner's predicted seconds for ``request`` on the named GPU (None: unknown GPU or request)."""
    from wanrender.runtime import gpus, planner
    from wanrender.runtime.memory import Weights, Workload
    from wanrender.spec import Sampling

    try:
        spec = gpus.named(gpu)
        sampling = Sampling(steps=int(request["steps"]), switch=int(request["switch"]), cfg=float(request["cfg"]))
        work = Workload(int(request["frames"]), int(request["width"]), int(request["height"]), sampling)
        precision = planner.resolve_precision(request.get("precision", "auto"), spec, request.get("compile", "off"))
        ctx = planner.Context(spec, Weights.standard(), precision, request.get("compile", "off"))
        decision = planner.decide(ctx, work, request.get("memory", "auto"))
    except Exception:  # noqa: BLE001 - an ETA is a convenience: unknown rather than an error
        return None
    return (decision.chosen or decision.leanest()).seconds


def render_seconds(record: JobRecord, workers: list[dict], cpu_seconds_per_unit: float | None) -> float | None:
    """T for this job: the median over the live workers' predictions."""
    guesses = []
    for w in workers:
        t = planner_seconds(record.request, w["gpu"]) if w.get("gpu") else None
        if t is None and cpu_seconds_per_unit is not None:
            t = cpu_seconds_per_unit * work_units(record.request)
        if t is not None:
            guesses.append(t)
    return statistics.median(guesses) if guesses else None


def eta_seconds(record: JobRecord, ahead: int | None, workers: list[dict], cpu_seconds_per_unit: float | None,
                now: float | None = None) -> float | None:  # fmt: skip
    if record.terminal:
        return 0.0
    if not workers:
        return None
    t = render_seconds(record, workers, cpu_seconds_per_unit)
    if t is None:
        return None
    now = time.time() if now is None else now
    if record.state is JobState.QUEUED:
        return round(t * (1 + (ahead or 0) / len(workers)), 1)
    elapsed = now - (record.started_at or record.updated_at)
    p = record.progress
    if elapsed > t and p is not None and p.step and p.steps:
        done = p.step / p.steps
        return round(elapsed * (1 - done) / done, 1)
    return round(max(0.0, t - elapsed), 1)


def device_gpu(device: str) -> str | None:
    """The named GPU spec (runtime/gpus.py) a worker on ``device`` advertises; None on the CPU or an unknown card."""
    if not device.startswith("cuda"):
        return None
    import torch

    from wanrender.runtime import gpus

    try:
        return gpus.match_name(torch.cuda.get_device_name(torch.device(device)))
    except Exception:  # noqa: BLE001 - the ETA falls back to the calibration
        return None
