"""One benchmark case, run in its own process: ``python -m wanrender.bench.child SPEC.json``.

The process loads the models, renders once untimed (the warm-up: allocator
pools, cuDNN/Inductor autotuning and compilation land there), then renders
``repeats`` timed times, and writes a result JSON next to the spec. An OOM or an
error is caught and written as a status; a segfault or a hang leaves no result,
and the parent classifies it from the exit code or its own timeout.

Test hooks (the bench's CI runs them on the CPU): the case field ``inject``
(``oom``: raise ``torch.cuda.OutOfMemoryError`` at the first denoising step, as
the allocator would; ``hang``: block forever there; ``crash``: a real SIGSEGV
there) and ``WANRENDER_BENCH_STEP_DELAY`` (seconds slept after every timed
denoising step: a known regression for ``bench compare``).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from wanrender.bench.matrix import Case


def _watch_parent(parent: int) -> None:
    """Exit when the sweep's process is gone: an orphaned case would skew the next one."""

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _is_oom(e: BaseException) -> bool:
    import torch

    seen: BaseException | None = e
    while seen is not None:  # the runner turns an OOM into a WanrenderError; the OOM is its context
        if isinstance(seen, torch.cuda.OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _log_oom(e: BaseException) -> None:
    """The allocator's own words and state: what the planner missed."""
    import torch

    seen: BaseException | None = e
    while seen is not None and not isinstance(seen, torch.cuda.OutOfMemoryError):
        seen = seen.__cause__ or seen.__context__
    if seen is not None:
        _say(f"allocator: {str(seen).strip()[:600]}")
    if torch.cuda.is_available():
        gib = 2**30
        _say(f"at the failure: allocated {torch.cuda.memory_allocated() / gib:.2f} GiB, reserved "
             f"{torch.cuda.memory_reserved() / gib:.2f} GiB, peak allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB")  # fmt: skip


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Hooks:
    """The progress callback: logs stages (the log tail shows where a case stopped),
    fires the injected failure, adds the test delay on timed steps."""

    def __init__(self, inject: str, delay: float) -> None:
        self.inject, self.delay, self.timed = inject, delay, False

    def __call__(self, stage: str, step: int | None, total: int | None, detail: str) -> None:
        if step is None:
            _say(f"{stage}: {detail}")
            return
        _say(f"{stage} step {step}/{total} {detail}")
        if step >= 1 and self.inject != "none":
            self._fire()
        if self.timed and self.delay > 0 and step >= 1:
            time.sleep(self.delay)

    def _fire(self) -> None:
        import torch

        _say(f"test hook: inject {self.inject}")
        if self.inject == "oom":
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (simulated by inject: oom)"
            )
        if self.inject == "hang":
            threading.Event().wait()  # blocks like a deadlock: only the parent's timeout ends it
        if self.inject == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)


def _device(case: Case) -> str:
    import torch

    if case.device != "auto":
        return case.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_case(case: Case, work: Path, res: dict | None = None) -> dict:
    import torch

    from wanrender.models.inventory import resolve_files
    from wanrender.request import from_preset
    from wanrender.runner import Runner

    res = res if res is not None else {}  # the caller's dict: what is known survives a failure
    res.update({"notes": [], "windows": [], "repeats": []})
    device = _device(case)
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def apply_cap() -> None:
        if not case.vram_cap_bytes:
            return
        if cuda:
            from wanrender.errors import WanrenderError
            from wanrender.runtime.memory import CUDA_CONTEXT_GIB

            # A card of the cap's size loses the CUDA context (outside torch's
            # allocator) to the driver: the allocator gets the rest.
            if case.vram_cap_bytes <= CUDA_CONTEXT_GIB * 2**30:
                raise WanrenderError(f"vram_cap {case.vram_cap_bytes / 2**30:.2f} GiB leaves nothing beside the "
                                     f"{CUDA_CONTEXT_GIB} GiB CUDA context — emulate a card of at least a few GiB")  # fmt: skip
            total = torch.cuda.get_device_properties(dev).total_memory
            frac = min(1.0, (case.vram_cap_bytes - CUDA_CONTEXT_GIB * 2**30) / total)
            torch.cuda.set_per_process_memory_fraction(
                frac, dev.index if dev.index is not None else torch.cuda.current_device()
            )
            res["notes"].append(f"VRAM capped at {case.vram_cap_bytes / 2**30:.2f} GiB: allocator limited to "
                                f"{frac * total / 2**30:.2f} GiB ({frac:.3f} of {total / 2**30:.1f} GiB), "
                                f"{CUDA_CONTEXT_GIB} GiB counted for the CUDA context")  # fmt: skip
        else:
            res["notes"].append("vram_cap recorded, not applied: no CUDA device")

    if case.models != "random":
        apply_cap()
    if case.models == "demo":
        from wanrender.demo import ensure_demo_models

        files = ensure_demo_models()
    elif case.models == "random":
        files = None  # full-size random weights built on the GPU below (bench/synthetic.py)
    else:
        files = resolve_files(Path(case.models_path or case.models))
    if case.image == "demo":
        from wanrender.demo import demo_image

        image = demo_image()
    else:
        image = Path(case.image_path or case.image)
    random = files is None
    req = from_preset(case.preset, image, case.prompt, frames=case.frames, width=case.width, height=case.height,
                      steps=case.steps, switch=case.switch, seed=case.seed, interpolate=case.interpolate,
                      precision=case.precision, attention=case.attention, compile=case.compile,
                      memory=case.memory_plan, out=work / "render.mp4",
                      lora_strength_high=0.0 if random else None, lora_strength_low=0.0 if random else None)  # fmt: skip
    if case.gpus > 1:
        return _run_parallel(case, req, files, dev, res)
    hooks = _Hooks(case.inject, float(os.environ.get("WANRENDER_BENCH_STEP_DELAY") or 0))
    t = time.time()
    # The VRAM planner sees the emulated card: the cap, not the physical memory.
    from wanrender.runtime import gpus

    spec = None
    if cuda:
        spec = gpus.probe(dev)
        # The copy rate the planner used (probe measures it): a row records its inputs.
        res["gpu"] = {"name": spec.name, "h2d_gbs": round(spec.h2d_gbs, 1), "measured": list(spec.measured)}
        if case.vram_cap_bytes:
            # Planned as a card of the cap's size: its total less the context, not what is free here.
            spec = spec.with_vram(min(spec.total_gib, case.vram_cap_bytes / 2**30))
    weights = None
    if random:
        from wanrender.errors import WanrenderError
        from wanrender.runtime.memory import Weights

        if not cuda:
            raise WanrenderError(
                "models: random builds two full-size 14B experts — it needs a CUDA GPU; use models: demo on a CPU"
            )
        weights = Weights.standard(lora=False)  # the planner counts the standard fp8_scaled set: what is built
    # No step-down: a case records the plan it was given, and an OOM is its result.
    runner = Runner(dev, gpu=spec, weights=weights, step_down=False)
    prep = runner.prepare(req, files)  # the plan and its prediction go into the result now, so a failure
    mem = prep.memory.plan  # while loading or rendering still reports what was attempted
    res["memory_plan"] = mem.describe()
    if hasattr(prep.memory.decision, "chosen"):  # held against the measured peak
        res["predicted"] = prep.memory.decision.chosen.to_json()
    if random:
        from wanrender.bench.synthetic import random_engine

        runner.engine = random_engine(dev, mem)  # built uncapped (bf16 first), then the cap
        apply_cap()
        res["notes"].append("full-size random weights, fp8-stored experts, no LoRA: speed and memory only")
    runner.ensure_engine(prep.config, files, None)  # loaded (or configured) outside the timed renders
    res["load_s"] = round(time.time() - t, 3)
    res["plan"] = runner.engine.plan.to_json()
    # The experiment low-high: the low-noise expert (with its LoRA) takes the high-noise steps and vice versa.
    swap = case.pass_order == "low-high"
    res["pass1_expert"] = "low" if swap else "high"
    if case.warmup:
        _say("warm-up render (untimed)")
        t = time.time()
        runner.render(req, files, hooks, swap_experts=swap)
        res["windows"].append(("warmup", t, time.time()))
        res["warmup_s"] = round(time.time() - t, 3)
    hooks.timed = True
    for i in range(case.repeats):
        _say(f"timed render {i + 1}/{case.repeats}")
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.time()
        result = runner.render(req, files, hooks, swap_experts=swap)
        t_end = time.time()
        res["windows"].append((f"repeat {i + 1}", t, t_end))
        steps = result.meta.get("step_seconds") or []
        res["repeats"].append({
            "wall_s": round(t_end - t, 4),
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
            "s_per_step": round(sum(steps) / len(steps), 4) if steps else None,
            "steps": len(steps),
            "torch_allocated_peak": int(torch.cuda.max_memory_allocated(dev)) if cuda else None,
            "torch_reserved_peak": int(torch.cuda.max_memory_reserved(dev)) if cuda else None,
        })  # fmt: skip
        for p in (result.video, result.sidecar):
            if p is not None:
                p.unlink(missing_ok=True)  # only the numbers are kept
    if cuda:
        res["device_total_bytes"] = int(torch.cuda.get_device_properties(dev).total_memory)
    res["device"] = device
    return res


def _run_parallel(case: Case, req, files, dev, res: dict) -> dict:
    """A case on ``case.gpus`` ranks (parallel/render.py); test hooks and the VRAM cap
    apply to one process only, so they are refused or noted here."""
    from wanrender.errors import WanrenderError
    from wanrender.parallel.render import render_repeats

    if files is None:
        raise WanrenderError("gpus > 1 needs model files — use models: demo or a model folder (not random)")
    if case.inject != "none":
        raise WanrenderError("inject runs in one process — use gpus: 1 for the failure hooks")
    if case.pass_order != "high-low":
        raise WanrenderError("pass_order low-high runs in one process — use gpus: 1 for it")
    if case.vram_cap_bytes:
        res["notes"].append("vram_cap recorded, not applied: the ranks are separate processes")
    notes = [n for n in res["notes"] if n != "vram_cap recorded, not applied: no CUDA device"]
    ranks = render_repeats(req, files, dev, case.gpus, case.repeats, case.warmup)
    res.update({k: v for k, v in ranks.items() if k != "notes"})
    res["notes"] = notes + ranks["notes"]
    res["device"] = str(dev)
    return res


def main(argv: list[str] | None = None) -> int:
    from wanrender.runtime.memory import default_allocator_config

    default_allocator_config()  # inherited from the sweep's CLI; set here too for a child run by hand
    args = sys.argv[1:] if argv is None else argv
    spec_path = Path(args[0])
    spec = json.loads(spec_path.read_text())
    faulthandler.enable()  # a segfault prints the Python stack into the case's log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before killing a hang
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _watch_parent(int(spec["parent_pid"]))
    case = Case.from_json(spec["case"])
    work = spec_path.parent
    t0 = time.time()
    try:
        partial: dict = {}
        out = run_case(case, work, partial)
        out["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status row
        from wanrender.errors import WanrenderError

        traceback.print_exc()
        status = "oom" if _is_oom(e) else "error"
        if status == "oom":
            _log_oom(e)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, WanrenderError):
            msg = f"{type(e).__name__}: {msg}"
        out = {"status": status, "message": msg[:500]}
        # The plan, the prediction and the notes explain a failure (an OOM on a plan).
        out.update({k: partial[k] for k in ("memory_plan", "predicted", "notes", "load_s", "gpu") if k in partial})
    out["child_wall_s"] = round(time.time() - t0, 3)
    out["host_rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tmp = work / ".result.json.partial"
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, work / "result.json")
    _say(f"case finished: {out['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
