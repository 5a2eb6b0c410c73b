"""The whole turbo pipeline twice on one engine: the plain path, then the fast path.

1. bf16 compute (fp8-stored weights dequantised on use), SDPA-cuDNN, eager: the
   reference render.
2. The fast path (``--precision fp8 --attention A --compile C``): compile is
   triggered outside the timed render (one forward per expert at the shape), then
   the same request with the same seed is rendered and timed.

Prints stage timings of both, the ratio, and how far the fast path moved the
result: cosine of the final latents and PSNR of the decoded frames (8-bit). With
``--tiny`` the same runs on the demo-size networks (seconds; the "tiny model" row).
Full size needs a CUDA GPU with ~45 GiB free.

Usage: PYTHONPATH=src python benchmarks/gpu_pipeline_parity.py [--tiny] [--frames 81]
       [--size 832x1216] [--attention auto] [--compile default]
Writes $OUT/pipeline_parity[_tiny].json (or ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OUT = Path(os.environ.get("OUT", "bench_out"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    from wanrender.bench.env import snapshot
    from wanrender.bench.synthetic import FULL, TINY, random_engine
    from wanrender.demo import demo_image
    from wanrender.request import from_preset, with_fields
    from wanrender.runner import Runner
    from wanrender.runtime.memory import Weights

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", default="default")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (tiny only)")
    ap.add_argument("--precision", default="fp8", help="of the fast path (bf16 for the CPU smoke run)")
    args = ap.parse_args()
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu runs the tiny models only: add --tiny")
    if args.tiny:
        args.frames, args.size = 17, "320x192"
    width, height = (int(v) for v in args.size.split("x"))
    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {"env": snapshot(), "shape": [args.frames, width, height], "tiny": args.tiny}
    t0 = time.perf_counter()
    engine = random_engine(args.device, presets=TINY if args.tiny else FULL)
    runner = Runner(args.device, engine=engine, weights=Weights.standard(lora=False))  # one engine, reconfigured
    res["build_s"] = time.perf_counter() - t0
    prompt = "cinematic winter scene, gentle camera motion, soft natural lighting, slow dolly-in"
    req = from_preset("turbo", demo_image(), prompt, frames=args.frames, width=width, height=height, seed=7,
                      lora_strength_high=0.0, lora_strength_low=0.0, out=OUT / "parity.mp4")  # fmt: skip

    def sync() -> None:
        if args.device != "cpu":
            torch.cuda.synchronize()

    def render(label: str, req):
        sync()
        t = time.perf_counter()
        r = runner.render(req)
        wall = time.perf_counter() - t
        res[label] = {"wall_s": wall, "timings_s": r.timings, "peak_vram_gib": (r.peak_vram_bytes or 0) / 2**30,
                      "plan": engine.plan.to_json()}  # fmt: skip
        print(f"{label}: {wall:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in r.timings.items()), flush=True)
        return r

    ref_req = with_fields(
        req, precision="bf16", attention="sdpa-cudnn" if args.device != "cpu" else "auto", compile="off"
    )
    ref = render("reference_bf16_eager", ref_req)
    ref_latent, ref_frames = ref.latent.float().cpu(), ref.frames
    t0 = time.perf_counter()
    fast_req = with_fields(req, precision=args.precision, attention=args.attention, compile=args.compile)
    runner.ensure_engine(runner.prepare(fast_req, None).config, None)
    if args.compile != "off":  # compile outside the timed render: one forward per expert at the shape
        engine.warm_up(args.frames, width, height)
    res["fast_setup_s"] = time.perf_counter() - t0
    print(f"fast path set-up incl. compile: {res['fast_setup_s']:.1f} s", flush=True)
    fast = render("fast", fast_req)
    lat = fast.latent.float().cpu()
    res["latent_cosine"] = torch.nn.functional.cosine_similarity(lat.flatten(), ref_latent.flatten(), 0).item()
    res["latent_rel_l2"] = ((lat - ref_latent).norm() / ref_latent.norm()).item()
    res["frames_psnr_db"] = psnr(fast.frames, ref_frames)
    # Random weights move the latent little from its starting noise, which flatters the
    # cosine: the difference is also given relative to the reference's own update.
    from wanrender.pipeline import i2v

    noise = i2v.initial_noise(req.render.seed, tuple(ref_latent.shape))
    res["latent_rel_to_update"] = ((lat - ref_latent).norm() / (ref_latent - noise).norm()).item()
    res["ratio_fast_to_reference"] = res["fast"]["wall_s"] / res["reference_bf16_eager"]["wall_s"]
    for p in (fast.video, fast.sidecar, ref.video, ref.sidecar):
        if p is not None and p.exists() and not args.tiny:
            p.unlink()  # 81-frame MP4s stay on the machine; the numbers come back
    print(
        f"fast {res['fast']['wall_s']:.2f} s vs reference {res['reference_bf16_eager']['wall_s']:.2f} s "
        f"(ratio {res['ratio_fast_to_reference']:.3f}); final latent cosine {res['latent_cosine']:.5f}, "
        f"rel L2 {res['latent_rel_l2']:.4f} ({res['latent_rel_to_update']:.3f} of the update); decoded frames PSNR {res['frames_psnr_db']:.2f} dB",
        flush=True,
    )
    name = "pipeline_parity_tiny.json" if args.tiny else "pipeline_parity.json"
    (OUT / name).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
