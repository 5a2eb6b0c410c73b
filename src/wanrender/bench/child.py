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
    while seen is not None:  # run_generate turns an OOM into a WanrenderError; the OOM is its context
        if isinstance(seen, torch.cuda.OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by inject: oom)")
        if self.inject == "hang":
            threading.Event().wait()  # blocks like a deadlock: only the parent's timeout ends it
        if self.inject == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)


def _device(case: Case) -> str:
    import torch

    if case.device != "auto":
        return case.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_case(case: Case, work: Path) -> dict:
    import torch

    from wanrender.engine import Engine
    from wanrender.generate import resolve_files, run_generate
    from wanrender.request import from_preset

    res: dict = {"notes": [], "windows": [], "repeats": []}
    device = _device(case)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if case.vram_cap_bytes:
        if cuda:
            total = torch.cuda.get_device_properties(dev).total_memory
            frac = min(1.0, case.vram_cap_bytes / total)
            torch.cuda.set_per_process_memory_fraction(frac, dev)
            res["notes"].append(f"VRAM capped at {case.vram_cap_bytes / 2**30:.2f} GiB ({frac:.3f} of {total / 2**30:.1f} GiB)")
        else:
            res["notes"].append("vram_cap recorded, not applied: no CUDA device")
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
    req = from_preset(case.preset, image, case.prompt, frames=case.frames, width=case.width, height=case.height,
                      steps=case.steps, switch=case.switch, seed=case.seed, interpolate=case.interpolate,
                      precision=case.precision, attention=case.attention, compile=case.compile,
                      memory=case.memory_plan, out=work / "render.mp4")  # fmt: skip
    hooks = _Hooks(case.inject, float(os.environ.get("WANRENDER_BENCH_STEP_DELAY") or 0))
    t = time.time()
    # The VRAM planner sees the emulated card: the cap, not the physical memory.
    from dataclasses import replace as _replace

    from wanrender.runtime import gpus
    from wanrender.runtime.planner import Decision, plan_render

    spec = None
    if cuda:
        spec = gpus.probe(dev)
        if case.vram_cap_bytes:
            cap = case.vram_cap_bytes / 2**30
            spec = _replace(spec, total_gib=min(spec.total_gib, cap), free_gib=min(spec.free_gib, cap))
    if files is None:
        from wanrender.bench.synthetic import apply_knobs, random_engine
        from wanrender.errors import WanrenderError

        if not cuda:
            raise WanrenderError("models: random builds two full-size 14B experts — it needs a CUDA GPU; use models: demo on a CPU")
        req = _replace(req, lora_strength_high=0.0, lora_strength_low=0.0)
        engine = random_engine(dev)
        apply_knobs(engine, req.precision, req.attention, req.compile)
        files = engine.files
        res["memory_plan"] = "all resident (random full-size weights; the planner needs checkpoint files)"
        res["notes"].append("full-size random weights, fp8-stored experts, no LoRA: speed and memory only")
    else:
        decision = plan_render(req, files, dev, gpu=spec)
        mem = decision.chosen.plan if isinstance(decision, Decision) else decision
        res["memory_plan"] = mem.describe()
        engine = Engine.load(files, dev, lora_strength_high=req.lora_strength_high, lora_strength_low=req.lora_strength_low,
                             precision=req.precision, attention=req.attention, compile=req.compile, memory=mem)  # fmt: skip
    res["load_s"] = round(time.time() - t, 3)
    res["plan"] = engine.plan.to_json() if engine.plan is not None else None
    if case.pass_order == "low-high":
        # The experiment: the low-noise expert (with its LoRA) takes the high-noise
        # steps and vice versa. Engine.render runs engine.high first.
        engine.high, engine.low = engine.low, engine.high
    res["pass1_expert"] = "low" if case.pass_order == "low-high" else "high"
    if case.warmup:
        _say("warm-up render (untimed)")
        t = time.time()
        run_generate(req, files, device, hooks, engine)
        res["windows"].append(("warmup", t, time.time()))
        res["warmup_s"] = round(time.time() - t, 3)
    hooks.timed = True
    for i in range(case.repeats):
        _say(f"timed render {i + 1}/{case.repeats}")
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.time()
        result = run_generate(req, files, device, hooks, engine)
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


def main(argv: list[str] | None = None) -> int:
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
        out = run_case(case, work)
        out["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status row
        from wanrender.errors import WanrenderError

        traceback.print_exc()
        status = "oom" if _is_oom(e) else "error"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, WanrenderError):
            msg = f"{type(e).__name__}: {msg}"
        out = {"status": status, "message": msg[:500]}
    out["child_wall_s"] = round(time.time() - t0, 3)
    out["host_rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tmp = work / ".result.json.partial"
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, work / "result.json")
    _say(f"case finished: {out['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
