"""Full-size Wan 2.2 I2V-A14B on one GPU with random weights (never zeros).

1. diffusers' WanTransformer3DModel (the peer, bf16, SDPA): one forward at the
   production shape, median of CUDA-event timings after a warm-up.
2. Our DiT with bf16 weights: the same forward, same inputs, ratio to the peer.
3. The whole turbo pipeline (text encode, VAE encode, 2+2 DiT steps, VAE decode,
   MP4) with fp8-stored experts (as the users' fp8_scaled files) and writes the
   MP4, its sidecar and a JSON of results under $OUT.

Usage: python benchmarks/gpu_turbo.py [--frames 81] [--size 832x1216] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OUT = Path(os.environ.get("OUT", "bench_out"))


def gpu_env() -> dict:
    from wanrender.bench.env import snapshot

    return snapshot()


def cuda_time(fn, repeats: int) -> tuple[float, list[float]]:
    from wanrender.bench.dit import cuda_median

    return (float("nan"), []) if repeats == 0 else cuda_median(fn, repeats)


def dit_inputs(frames: int, width: int, height: int, text_dim: int = 4096):
    g = torch.Generator(device="cuda").manual_seed(1)
    t = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, t, height // 8, width // 8, generator=g, device="cuda")
    cond = torch.randn(1, 20, t, height // 8, width // 8, generator=g, device="cuda")
    ctx = torch.randn(1, 512, text_dim, generator=g, device="cuda") * 0.1
    return x, cond, ctx, torch.tensor([937.5], device="cuda")


def build_diffusers():
    from diffusers import WanTransformer3DModel

    from wanrender.models.random_init import init_random_

    with torch.device("meta"):
        ref = WanTransformer3DModel(in_channels=36, out_channels=16, image_dim=None, added_kv_proj_dim=None)
    ref = ref.to_empty(device="cuda").to(torch.bfloat16).eval()
    init_random_(ref)
    return ref


def copy_from_diffusers_(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Give our DiT the peer's exact weights (through the key mapping), so outputs compare."""
    from wanrender.models.dit import official_key_from_diffusers

    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            mine[official_key_from_diffusers(k)].copy_(v)


def profile_forward(fn, label: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    return f"--- profile: {label}\n{table}"


def build_dit(fp8: bool):
    from wanrender.bench.synthetic import random_dit

    return random_dit(torch.device("cuda"), fp8=fp8)


def to_fp8_(m: torch.nn.Module) -> None:
    from wanrender.bench.synthetic import to_fp8_ as _to_fp8

    _to_fp8(m)
    torch.cuda.empty_cache()


def compare_dit(args, width: int, height: int, res: dict, profiles: list[str]) -> None:
    """Steps 1-2: one DiT forward, the peer vs ours (bf16, then fp8-stored), same weights."""
    x, cond, ctx, t = dit_inputs(args.frames, width, height)
    dit = build_dit(fp8=False)
    if not args.skip_diffusers:
        ref = build_diffusers()
        inp, ctx16 = torch.cat([x, cond], 1).to(torch.bfloat16), ctx.to(torch.bfloat16)
        with torch.no_grad():
            med, times = cuda_time(lambda: ref(inp, t, ctx16, return_dict=False), args.repeats)
            ref_out = ref(inp, t, ctx16, return_dict=False)[0].float()
            if args.profile:
                profiles.append(profile_forward(lambda: ref(inp, t, ctx16, return_dict=False), "diffusers"))
        res["diffusers_dit"] = {"seconds": med, "times": times}
        print(f"diffusers DiT forward: {med:.3f} s  {times}", flush=True)
        copy_from_diffusers_(dit, ref)
        ref = inp = ctx16 = None
        gc.collect()
        torch.cuda.empty_cache()
    with torch.no_grad():
        med, times = cuda_time(lambda: dit(x, t, ctx, cond), args.repeats)
        if args.profile:
            profiles.append(profile_forward(lambda: dit(x, t, ctx, cond), "ours bf16"))
    res["ours_dit_bf16"] = {"seconds": med, "times": times}
    print(f"our DiT forward (bf16 weights): {med:.3f} s  {times}", flush=True)
    if not args.skip_diffusers:
        res["ratio_ours_bf16_to_diffusers"] = med / res["diffusers_dit"]["seconds"]
        with torch.no_grad():
            ours_out = dit(x, t, ctx, cond).float()
        cos = torch.nn.functional.cosine_similarity(ours_out.flatten(), ref_out.flatten(), 0).item()
        rel = ((ours_out - ref_out).norm() / ref_out.norm()).item()
        res["ours_vs_diffusers_output"] = {"cosine": cos, "rel_l2": rel}
        print(
            f"ours vs diffusers output (same weights, bf16, full size): cosine {cos:.6f}, rel L2 {rel:.4f}", flush=True
        )
        ours_out = ref_out = None
    to_fp8_(dit)
    with torch.no_grad():
        med8, times8 = cuda_time(lambda: dit(x, t, ctx, cond), args.repeats)
    res["ours_dit_fp8_storage"] = {"seconds": med8, "times": times8}
    print(f"our DiT forward (fp8-stored weights, bf16 compute): {med8:.3f} s", flush=True)
    x = cond = ctx = dit = None
    torch.cuda.empty_cache()
    for p in profiles:
        print(p)
    (OUT / "profiles.txt").write_text("\n".join(profiles))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of one forward each")
    ap.add_argument("--dit-only", action="store_true", help="skip the whole-pipeline run")
    ap.add_argument("--pipeline-only", action="store_true", help="skip the DiT comparison")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", default="off")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {"env": gpu_env(), "shape": {"frames": args.frames, "width": width, "height": height}}
    profiles: list[str] = []
    print(json.dumps(res["env"]))

    if not args.pipeline_only:
        compare_dit(args, width, height, res, profiles)
    if args.dit_only:
        (OUT / "results.json").write_text(json.dumps(res, indent=1, default=str))
        return

    # 3. The whole turbo pipeline, weights resident (full-size random weights, fp8-stored).
    from wanrender.bench.synthetic import random_engine
    from wanrender.request import from_preset
    from wanrender.runner import Runner
    from wanrender.runtime.memory import Weights

    torch.cuda.empty_cache()
    engine = random_engine("cuda")
    runner = Runner("cuda", engine=engine, weights=Weights.standard(lora=False))
    from PIL import Image
    from skimage import data

    img = OUT / "astronaut.png"
    Image.fromarray(data.astronaut()).save(img)
    prompt = ("cinematic winter scene, gentle camera motion, soft natural lighting, crisp snow highlights, "
              "realistic fur texture, calm atmosphere, subtle breathing and micro-movements, slow dolly-in")  # fmt: skip
    req = from_preset("turbo", img, prompt, frames=args.frames, width=width, height=height, seed=7,
                      lora_strength_high=0.0, lora_strength_low=0.0, out=OUT / "turbo.mp4",
                      precision=args.precision, attention=args.attention, compile=args.compile)  # fmt: skip
    t0 = time.perf_counter()
    runner.ensure_engine(runner.prepare(req, None).config, None)
    if args.compile != "off":  # compile outside the timed render: one forward per expert at the shape
        engine.warm_up(args.frames, width, height)
    plan = engine.plan
    res["plan"] = {**plan.to_json(), "setup_and_compile_s": time.perf_counter() - t0}
    print(f"plan {plan}; set-up incl. compile {res['plan']['setup_and_compile_s']:.1f} s", flush=True)
    t0 = time.perf_counter()
    result = runner.render(req)
    wall = time.perf_counter() - t0
    res["pipeline"] = {
        "timings_s": result.timings, "wall_s": wall, "peak_vram_gib": result.peak_vram_bytes / 2**30,
        "seconds_per_step": result.meta.get("step_seconds"),
    }  # fmt: skip
    print(json.dumps(res["pipeline"], indent=1), flush=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print("\n| stage | seconds |\n|---|---|")
    for k, v in result.timings.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| wall (incl. image intake) | {wall:.2f} |")
    print(f"peak VRAM (torch allocated): {result.peak_vram_bytes / 2**30:.1f} GiB")
    if "ratio_ours_bf16_to_diffusers" in res:
        print(
            f"DiT forward: diffusers {res['diffusers_dit']['seconds']:.2f} s, ours bf16 {res['ours_dit_bf16']['seconds']:.2f} s "
            f"(ratio {res['ratio_ours_bf16_to_diffusers']:.3f}), ours fp8-stored {res['ours_dit_fp8_storage']['seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
