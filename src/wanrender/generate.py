"""``wanrender generate``: resolve model files, read the image, render, write outputs.

Outputs (video, optional PNG frames, JSON sidecar) are written under temporary
names and renamed only when everything succeeded: an error or Ctrl-C leaves no
half-written file behind.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from wanrender.engine import Engine, ModelFiles, Progress, RenderResult
from wanrender.errors import WanrenderError
from wanrender.media import image as imagemod
from wanrender.media.sidecar import describe_files, versions, write_sidecar
from wanrender.request import RenderRequest

log = logging.getLogger(__name__)


def resolve_files(
    models_dir: Path | None,
    high: Path | None = None,
    low: Path | None = None,
    vae: Path | None = None,
    text_encoder: Path | None = None,
    tokenizer: Path | None = None,
    lora_high: Path | None = None,
    lora_low: Path | None = None,
) -> ModelFiles:
    """Explicit files win; the rest is found in ``models_dir``."""
    from wanrender.models.inventory import ModelSet, scan

    found = scan(models_dir) if models_dir is not None else ModelSet()
    picked = ModelSet(
        high=high or found.high, low=low or found.low, vae=vae or found.vae,
        text_encoder=text_encoder or found.text_encoder,
        tokenizer=tokenizer or found.tokenizer or (text_encoder if text_encoder else None),
        lora_high=lora_high or found.lora_high, lora_low=lora_low or found.lora_low,
    )  # fmt: skip
    if picked.missing():
        if models_dir is None:
            raise WanrenderError(
                f"missing {'; '.join(picked.missing())} — pass --models DIR (after 'wanrender models fetch --dir DIR') "
                "or the files with --high/--low/--vae/--text-encoder"
            )
        picked.require_complete(models_dir)
    return ModelFiles(
        high=picked.high, low=picked.low, vae=picked.vae, text_encoder=picked.text_encoder,  # type: ignore[arg-type]
        tokenizer=picked.tokenizer, lora_high=picked.lora_high, lora_low=picked.lora_low,  # type: ignore[arg-type]
    )


def default_out(req: RenderRequest) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / f"{req.image.stem}_{req.preset}_s{req.seed}_{stamp}.mp4"


def check_lora_needs(req: RenderRequest, files: ModelFiles) -> None:
    """A non-zero LoRA strength with no LoRA file would be silently ignored: refuse it."""
    for side, strength, path in (("high", req.lora_strength_high, files.lora_high), ("low", req.lora_strength_low, files.lora_low)):
        if strength and path is None:
            what = "the turbo preset needs the two 4-step LoRAs (high and low)" if req.preset == "turbo" else (
                f"--lora-strength asks for a {side}-noise LoRA but none was given")
            raise WanrenderError(
                f"{what} — pass --lora-high/--lora-low, put them in --models DIR, "
                "or use --preset quality / --lora-strength 0"
            )


def run_generate(
    req: RenderRequest,
    files: ModelFiles,
    device: str | None = None,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> RenderResult:
    """Everything ``wanrender generate`` does after parsing flags."""
    from wanrender.media.video import write_video

    check_lora_needs(req, files)
    rgb = imagemod.load_image(req.image)  # validated before any model is loaded
    if req.interpolate == "rife":
        from wanrender.interp.weights import find_rife_weights

        find_rife_weights()  # missing weights fail now, not after the render
    image = imagemod.fit_image(rgb, req.width, req.height, req.fit)
    out = req.out or default_out(req)
    if out.suffix.lower() != ".mp4":
        raise WanrenderError(f"--out {out}: the video is written as MP4 — use a name ending in .mp4")
    req = replace(req, out=out)
    if req.save_frames:
        check_frames_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    memory: dict = {}  # the planner's decision and any step-down, for the sidecar

    def load(plan) -> Engine:
        if progress:
            progress("load_models", None, None, "start")
        try:
            eng = Engine.load(
                files, dev, lora_strength_high=req.lora_strength_high, lora_strength_low=req.lora_strength_low,
                precision=req.precision, attention=req.attention, compile=req.compile, memory=plan,
            )  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            raise WanrenderError(
                "the GPU ran out of memory while loading the models — free GPU memory (another process may hold it) "
                "or use --memory stream"
            ) from None
        if progress:
            progress("load_models", None, None, f"{eng.load_seconds:.2f}s")
        return eng

    own_engine = engine is None
    if engine is None:
        from wanrender.runtime.planner import Decision, plan_render

        decision = plan_render(req, files, dev)  # refuses here, before anything is loaded
        memory["decision"] = decision
        engine = load(decision.chosen.plan if isinstance(decision, Decision) else decision)

    def write(result: RenderResult) -> None:
        frames_dir = frames_folder(out) if req.save_frames else None
        sidecar = out.with_suffix(".json")
        written: list[Path] = []
        try:
            if progress:
                progress("video_encode", None, None, "start")
            frames = _interpolate(req, result, engine.device, progress)
            t0 = time.perf_counter()
            write_video(frames, out, fps=req.fps, crf=req.crf)
            written.append(out)
            result.timings["video_encode"] = time.perf_counter() - t0
            if progress:
                progress("video_encode", None, None, f"{result.timings['video_encode']:.2f}s")
            if frames_dir is not None:
                _write_frames(result.frames, frames_dir)
                written.append(frames_dir)
            write_sidecar(sidecar, _sidecar(req, engine, result, memory))
        except BaseException:
            for p in written:  # all or nothing: no video without its sidecar
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise
        result.video, result.sidecar = out, sidecar

    try:
        return engine.render(req, image, progress, write)
    except torch.cuda.OutOfMemoryError:
        if not (own_engine and hasattr(memory.get("decision"), "ctx")):  # a Decision: a GPU was planned
            raise WanrenderError(
                f"the GPU ran out of memory at {req.frames} frames {req.width}x{req.height} — try fewer frames, "
                "a smaller size or --memory stream, or free GPU memory"
            ) from None
    # Out of memory on an approved plan: another process took memory after planning.
    # Free everything (outside the except block, so the traceback's tensors go too),
    # step down to the next plan once, and say so.
    failed = engine.memory.plan
    engine.memory.release()
    engine = None
    lower = _step_down(memory, failed, dev)
    if progress:
        progress("memory", None, None, memory["fallback"]["message"])
    engine = load(lower.plan)
    try:
        return engine.render(req, image, progress, write)
    except torch.cuda.OutOfMemoryError:
        raise WanrenderError(
            f"the GPU ran out of memory again after stepping down to '{lower.plan.short()}' — free GPU memory and retry"
        ) from None


def _step_down(memory: dict, failed, dev: torch.device):
    """The next plan down after an out-of-memory error, for the memory free now."""
    import gc

    from wanrender.runtime import gpus
    from wanrender.runtime.planner import step_down

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    decision = memory["decision"]
    lower = step_down(decision, failed, gpus.probe(dev) if dev.type == "cuda" else None)
    if lower is None:
        raise WanrenderError(
            f"the GPU ran out of memory on plan '{failed.short()}' and no leaner plan fits the memory free now "
            "— free GPU memory (another process took it) and retry"
        )
    msg = f"out of memory on plan '{failed.short()}' (another process took GPU memory?) — stepped down to '{lower.plan.short()}'"
    log.warning(msg)
    memory["fallback"] = {"from": failed.to_json(), "to": lower.plan.to_json(), "message": msg}
    memory["decision_after_fallback"] = lower
    return lower


def _interpolate(req: RenderRequest, result: RenderResult, device: torch.device, progress: Progress | None):
    """16 fps frames -> fps frames with the chosen method (RIFE on the render's device)."""
    if req.interpolate == "off":
        return result.frames
    import numpy as np

    from wanrender.interp import make_interpolator
    from wanrender.interp.flow import interpolate_frames

    if progress:
        progress("interpolate", None, None, "start")
    t0 = time.perf_counter()
    interp = make_interpolator(req.interpolate, device=str(device) if req.interpolate == "rife" else None)
    frames = np.stack(list(interpolate_frames(iter(result.frames), interp, req.interp_multiplier)))
    result.timings["interpolate"] = time.perf_counter() - t0
    result.meta["interpolation"] = {"method": req.interpolate, "multiplier": req.interp_multiplier,
                                    "frames_in": int(result.frames.shape[0]), "frames_out": int(frames.shape[0])}  # fmt: skip
    if progress:
        progress("interpolate", None, None, f"{result.timings['interpolate']:.2f}s")
    return frames


FRAMES_MARKER = ".wanrender-frames"


def frames_folder(out: Path) -> Path:
    return out.with_name(f"{out.stem}_frames")


def check_frames_folder(out: Path) -> None:
    """Refuse before rendering to replace a folder wanrender did not write."""
    folder = frames_folder(out)
    if folder.exists() and not (folder / FRAMES_MARKER).exists():
        raise WanrenderError(f"{folder} exists and was not written by wanrender — move it or choose another --out")


def _write_frames(frames, folder: Path) -> None:
    from PIL import Image

    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for i, f in enumerate(frames):
            Image.fromarray(f).save(tmp / f"frame_{i:05d}.png")
        (tmp / FRAMES_MARKER).write_text("PNG frames of a wanrender video; replaced by the next render to this name\n")
        if folder.exists():
            check_frames_folder(folder.with_name(folder.name.removesuffix("_frames") + ".mp4"))
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sidecar(req: RenderRequest, engine: Engine, result: RenderResult, memory: dict | None = None) -> dict:
    from wanrender.runtime.gpus import peak_rss_bytes

    s = result.meta.get("step_seconds", [])
    runtime = engine.plan.to_json() if engine.plan is not None else None
    if runtime is not None:
        runtime["memory"] = _memory_entry(result, memory or {})
    return {
        "request": req.to_json(),
        "plan": {
            "device": str(engine.device),
            "compute_dtype": str(engine.high.compute_dtype).replace("torch.", ""),
            "attention": engine.plan.attention if engine.plan is not None else getattr(engine.high.attention, "__name__", "?"),
            "passes": [p.__dict__ for p in _passes(req)],
            "lora": engine.lora_report,
            "runtime": runtime,
        },
        "models": describe_files(engine.files.as_dict()),
        "seed": req.seed,
        "noise": "torch.randn on the CPU, fp32, torch.Generator().manual_seed(seed), shape [1,16,T,H/8,W/8]",
        "frames": int(result.frames.shape[0]),
        "interpolation": result.meta.get("interpolation"),
        "size": [int(result.frames.shape[2]), int(result.frames.shape[1])],
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "render_s": round(sum(v for k, v in result.timings.items() if k != "sampling"), 3),
        "seconds_per_step": round(sum(s) / len(s), 4) if s else None,
        "load_models_s": round(engine.load_seconds, 3),
        "peak_vram_bytes": result.peak_vram_bytes,
        "peak_host_rss_bytes": peak_rss_bytes(),
        "versions": versions(),
    }


def _memory_entry(result: RenderResult, memory: dict) -> dict:
    """The memory plan as decided (predictions included), as run, and any step-down."""
    from wanrender.runtime.planner import Decision

    decision = memory.get("decision")
    entry: dict = {}
    if isinstance(decision, Decision):
        entry = decision.to_json()
    elif decision is not None:  # on the CPU: a plan without predictions
        entry = {"mode": "cpu", "plan": decision.to_json(), "describe": decision.describe()}
    if "decision_after_fallback" in memory:
        entry.update(memory["decision_after_fallback"].to_json())
    entry["fallback"] = memory.get("fallback")
    entry["run"] = result.meta.get("memory")
    return entry


def _passes(req: RenderRequest):
    from wanrender.pipeline.i2v import Sampling

    return Sampling(req.steps, req.switch, req.cfg, req.shift_high, req.shift_low, req.sampler).passes()
