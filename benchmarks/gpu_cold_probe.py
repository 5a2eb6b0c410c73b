"""Where a cold start's seconds go, part by part, on random full-size models.

Parts (each prints one table row per measurement; run the compile part twice, in two
processes sharing one cache folder, to see what a later process pays):
  merge    a rank-64 LoRA merged into a full-size fp8 expert on the GPU (PyTorch, then fused)
  compile  one forward at 81x832x1216: eager, then the first and second compiled
  vae      text encode, VAE encode of the condition video, VAE decode (variants), MP4 encode
  eager    one eager fp8 forward, the fused kernels against PyTorch's ops
  drift    one fp8 forward three ways (eager ops, fused kernels, compiled): how far apart
  first    two renders in one fresh process as ``generate`` runs them (the first under
           cProfile), their seconds per step

Usage: PYTHONPATH=src python benchmarks/gpu_cold_probe.py PART [--frames 81] [--size 832x1216]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, sync=True):
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def row(name: str, seconds: float, note: str = "") -> None:
    print(f"| {name:<44} | {seconds:8.3f} s | {note}", flush=True)


def lora_for(model, rank: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    from wanrender.models.common import Linear

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and name.startswith("blocks."):
            sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.02
            sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.002
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    return sd


def part_merge(args) -> None:
    from wanrender.bench.synthetic import random_dit
    from wanrender.models.common import quantize_fp8
    from wanrender.models.lora import apply_lora, parse_lora

    dev = torch.device("cuda")
    t, m = timed(lambda: random_dit(dev, seed=0))
    row("random fp8 expert built on the GPU", t)
    sd = lora_for(m)
    t, lora = timed(lambda: parse_lora(sd, m), sync=False)
    row("parse_lora (CPU)", t, f"{len(lora.patches)} targets")
    t, rep = timed(lambda: apply_lora(m, lora, 1.0, mode="merge"))
    row("merge rank-64 LoRA into the fp8 expert (GPU, PyTorch)", t, rep.summary()[:60])
    # The same merge with the fused kernels (kernels/fp8_merge.py) into a second copy of the
    # expert: the first call builds the kernels, the bytes must equal the plain merge's.
    from wanrender.kernels.fp8_merge import fp8_merge_for

    m2 = random_dit(dev, seed=0)
    fused, lora2 = fp8_merge_for(dev), parse_lora(sd, m2)
    t, _ = timed(lambda: apply_lora(m2, lora2, 1.0, mode="merge", fp8_merge=fused))
    same = all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
               for a, b in zip(m.parameters(), m2.parameters()))  # fmt: skip
    row("the same merge, fused kernels (GPU)", t, f"bytes identical: {same}; fallback: {fused.broken}")
    w = torch.randn(5120, 13824, generator=torch.Generator().manual_seed(3))
    t, (qc, sc) = timed(lambda: quantize_fp8(w, seed=7), sync=False)
    row("stochastic fp8 quantise 70.8M on the CPU", t)
    wg = w.cuda()
    t, (qg, sg) = timed(lambda: quantize_fp8(wg, seed=7))
    same = bool(torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8))) and float(sc) == float(sg)
    row("the same on the GPU", t, f"bytes identical to the CPU's: {same}")


def _fp8_forward(args):
    """A random full-size fp8 expert with ``--attention``, and a no-grad forward of it."""
    from wanrender.bench.synthetic import random_dit
    from wanrender.kernels import attention as attn
    from wanrender.kernels.linear import enable_fp8
    from wanrender.spec import FP8_EXCLUDE

    frames, (w, h) = args.frames, map(int, args.size.split("x"))
    dev = torch.device("cuda")
    m = random_dit(dev, seed=0)
    m.attention = attn.select(args.attention, attn.Target.of(dev, torch.bfloat16, 128), eight_bit=True).fn
    enable_fp8(m, exclude=FP8_EXCLUDE)
    t_lat = (frames - 1) // 4 + 1
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, t_lat, h // 8, w // 8, generator=g, device="cuda")
    cond = torch.randn(1, 20, t_lat, h // 8, w // 8, generator=g, device="cuda")
    ctx = torch.randn(1, 512, 4096, generator=g, device="cuda") * 0.1
    ts = torch.tensor([900.0], device="cuda")

    def fwd():
        with torch.no_grad():
            return m(x, ts, ctx, cond)

    return m, fwd


def _use_eager_kernels(m, on: bool) -> None:
    """The fused eager kernels on ``m`` (and the fused quantiser) on or off."""
    from wanrender.kernels import linear, quant_rows
    from wanrender.kernels.ln_mod import enable_norm_mod
    from wanrender.kernels.qk_norm import enable_norm_rope
    from wanrender.models.dit import Attention, Block

    linear.row_quant = quant_rows.row_quant if on else (lambda: None)
    if on:
        enable_norm_rope(m)
        enable_norm_mod(m)
        return
    for a in m.modules():
        if isinstance(a, Attention):
            a.norm_rope = None
        elif isinstance(a, Block):
            a.norm_mod = None


def part_eager(args) -> None:
    """One eager fp8 forward with the fused kernels (kernels/quant_rows.py,
    kernels/qk_norm.py, kernels/ln_mod.py) and with PyTorch's ops, outputs compared; then
    where the fused forward's GPU time goes."""
    m, fwd = _fp8_forward(args)
    outs = {}
    for name, on in (("fused kernels", True), ("PyTorch ops", False), ("fused kernels", True)):
        _use_eager_kernels(m, on)
        timed(fwd)
        t, outs[name] = timed(fwd)
        row(f"eager fp8 forward ({args.attention}), {name}", t)
    a, b = outs["fused kernels"].double().flatten(), outs["PyTorch ops"].double().flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    row("fused against PyTorch ops", 0.0, f"cosine {cos:.7f}, rel L2 {((a - b).norm() / b.norm()).item():.2e}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fwd()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


def part_drift(args) -> None:
    """How far two valid implementations of one fp8 forward land apart on random
    full-size weights: the eager PyTorch ops against the fused kernels, and against
    Inductor's compiled blocks (its own fusions and roundings)."""
    from wanrender.runtime.plan import compile_blocks, compiled_scope

    m, fwd = _fp8_forward(args)
    _use_eager_kernels(m, False)
    ops = fwd().double().flatten()
    _use_eager_kernels(m, True)
    outs = {"fused kernels": fwd().double().flatten()}
    compile_blocks(m, "default")
    with compiled_scope():
        outs["compiled blocks"] = fwd().double().flatten()
    for name, o in outs.items():
        cos = torch.nn.functional.cosine_similarity(o, ops, dim=0).item()
        row(
            f"{name} against the eager PyTorch ops",
            0.0,
            f"cosine {cos:.7f}, rel L2 {((o - ops).norm() / ops.norm()).item():.2e}",
        )


def part_compile(args) -> None:
    from wanrender.runtime.plan import compile_blocks, compiled_scope

    m, fwd = _fp8_forward(args)
    if not args.skip_eager:
        timed(fwd)
        t, _ = timed(fwd)
        row(f"eager fp8 forward ({args.attention})", t)
    compile_blocks(m, "default")
    with compiled_scope():
        t, _ = timed(fwd)
        row(f"first compiled forward (cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '?')[-24:]})", t)
        t, _ = timed(fwd)
        row("second compiled forward", t)


def part_vae(args) -> None:
    import numpy as np

    from wanrender.bench.synthetic import tiny_tokenizer
    from wanrender.media.video import write_video
    from wanrender.models.random_init import init_random_
    from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder, encode_text
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.pipeline import i2v

    frames, (w, h) = args.frames, map(int, args.size.split("x"))
    dev = torch.device("cuda")
    with torch.device("meta"):
        te = UMT5Encoder(TextEncoderConfig.preset("umt5-xxl"))
    te = te.to_empty(device=dev).to(torch.bfloat16)
    init_random_(te, seed=2, std=0.05)
    te.compute_dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp))
    with torch.no_grad():
        encode_text(te, tok, ["warm"], text_len=512)
        t, _ = timed(lambda: encode_text(te, tok, ["a slow dolly-in on an astronaut"], text_len=512))
    row("text encode (umt5-xxl bf16)", t)
    te = None  # free it before the VAE
    vae = WanVAE(VAEConfig.preset("wan2.1")).to(dev, torch.bfloat16).eval()
    init_random_(vae, seed=3)
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    t, cond = timed(lambda: i2v.image_condition(vae, image, frames))
    row("VAE encode of the condition (1st, cold)", t)
    t, cond = timed(lambda: i2v.image_condition(vae, image, frames))
    row("VAE encode of the condition (2nd)", t)
    lat = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(4))
    for label, bench in (("plain", False), ("cudnn.benchmark", True)):
        torch.backends.cudnn.benchmark = bench
        t1, _ = timed(lambda: i2v.decode(vae, lat))
        t2, fr = timed(lambda: i2v.decode(vae, lat))
        row(f"VAE decode {frames}f, {label}", t2, f"first call {t1:.2f} s")
    try:
        vae_cl = vae.to(memory_format=torch.channels_last_3d)
        t1, _ = timed(lambda: i2v.decode(vae_cl, lat))
        t2, _ = timed(lambda: i2v.decode(vae_cl, lat))
        row("VAE decode, channels_last_3d weights + benchmark", t2, f"first {t1:.2f} s")
    except Exception as e:  # noqa: BLE001
        print("channels_last failed:", e)
    torch.backends.cudnn.benchmark = False
    # where the decode's time goes: the decoder itself vs the uint8 conversion and copy
    p = next(vae.parameters())
    t, video = timed(lambda: vae.decode(lat.to(p.device)))
    row("vae.decode only (no uint8/host copy)", t)
    t, _ = timed(
        lambda: ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    )
    row("to uint8 + host copy", t)
    fr = np.ascontiguousarray(fr)
    out = Path(tempfile.mkdtemp()) / "probe.mp4"
    for preset in ("medium", "fast", "veryfast"):
        t0 = time.perf_counter()
        write_video(fr, out, fps=16, crf=18, preset=preset)
        row(
            f"MP4 encode {fr.shape[0]}x{fr.shape[2]}x{fr.shape[1]} preset {preset}",
            time.perf_counter() - t0,
            f"{out.stat().st_size / 1e6:.1f} MB; cpus {os.cpu_count()}",
        )


def part_load(args) -> None:
    """Engine.load on the files of ``--models`` under cProfile: where the seconds go."""
    import cProfile
    import pstats

    from wanrender.engine import Engine, EngineConfig
    from wanrender.models.inventory import resolve_files
    from wanrender.runtime.plan import make_plan

    files = resolve_files(Path(args.models))
    plan, _ = make_plan("cuda", "fp8", "sage8", "off")
    torch.zeros(1, device="cuda")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    engine = Engine.load(files, "cuda", EngineConfig(plan, None, 1.0, 1.0))
    prof.disable()
    row(
        "Engine.load, LoRAs at 1.0",
        time.perf_counter() - t0,
        str({k: round(v, 2) for k, v in engine.load_parts.items()}),
    )
    pstats.Stats(prof).sort_stats("cumulative").print_stats(28)
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def part_upload(args) -> None:
    """Engine.load with the plain per-tensor copies and with pinned staging
    (models/upload.py), alternated in one process; the experts' bytes must agree."""
    import gc
    import os

    from wanrender.engine import Engine, EngineConfig
    from wanrender.models.inventory import resolve_files
    from wanrender.runtime.plan import make_plan

    files = resolve_files(Path(args.models))
    plan, _ = make_plan("cuda", "fp8", "sage8", "off")
    torch.zeros(1, device="cuda")
    sums: dict[str, list[int]] = {}
    for i, mode in enumerate(("0", "1", "0", "1")):
        os.environ["WANRENDER_STAGED_UPLOAD"] = mode
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine = Engine.load(files, "cuda", EngineConfig(plan, None, 1.0, 1.0))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        got = [int(t.detach().contiguous().view(-1).view(torch.uint8).sum()) for m in (engine.high, engine.low)
               for t in m.state_dict().values()]  # fmt: skip
        same = sums.setdefault("ref", got) == got
        row(f"Engine.load, staged={mode} (#{i + 1})", dt,
            f"{ {k: round(v, 2) for k, v in engine.load_parts.items()} } experts' bytes as the first: {same}")  # fmt: skip
        engine.release()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def part_vae2(args) -> None:
    """VAE decode as is, then with the fused channel norm + SiLU (kernels/vae_norm.py);
    then where the fused decode's GPU time goes."""
    from wanrender.models.random_init import init_random_
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.pipeline import i2v

    frames, (w, h) = args.frames, map(int, args.size.split("x"))
    vae = WanVAE(VAEConfig.preset("wan2.1")).to("cuda", torch.bfloat16).eval()
    init_random_(vae, seed=3)
    lat = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(4))
    t1, ref = timed(lambda: i2v.decode(vae, lat))
    t2, ref = timed(lambda: i2v.decode(vae, lat))
    row("VAE decode, as is", t2, f"first {t1:.2f} s")
    from wanrender.kernels.vae_norm import enable_vae_kernels

    n = enable_vae_kernels(vae)
    t1, _ = timed(lambda: i2v.decode(vae, lat))
    t2, out = timed(lambda: i2v.decode(vae, lat))
    diff = abs(out.astype("int16") - ref.astype("int16"))
    row(f"VAE decode, fused norm + SiLU ({n} norms)", t2,
        f"first {t1:.2f} s; |diff| max {diff.max()}, mean {diff.mean():.4f}")  # fmt: skip
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        i2v.decode(vae, lat)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def part_first(args) -> None:
    """Why pass 1 of a fresh process is slower than pass 2: the per-step seconds of a
    first and a second render (fp8, ``--attention``, eager, as ``generate`` runs on an
    H200), and the first's Python profile (all threads: cProfile on Python 3.12)."""
    import cProfile
    import pstats

    import numpy as np
    from PIL import Image

    from wanrender.models.inventory import resolve_files
    from wanrender.request import from_preset
    from wanrender.runner import Runner

    files = resolve_files(Path(args.models))
    w, h = map(int, args.size.split("x"))
    img = Path(tempfile.mkdtemp()) / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(img)
    runner = Runner("cuda")
    for i in range(2):
        req = from_preset("turbo", img, "an astronaut waves", seed=42, frames=args.frames, width=w, height=h,
                          precision="fp8", attention=args.attention, compile="off",
                          out=img.parent / f"first{i}.mp4")  # fmt: skip
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        if i == 0:
            prof.enable()
        res = runner.render(req, files)
        prof.disable()
        steps = [round(x, 2) for x in res.meta.get("step_seconds", [])]
        row(f"render {i + 1} ({runner.engine.plan})", time.perf_counter() - t0,
            f"steps {steps}; {({k: round(v, 2) for k, v in res.timings.items()})}")  # fmt: skip
        if i == 0:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("merge", "compile", "vae", "load", "vae2", "upload", "first", "eager", "drift"))
    ap.add_argument("--models", default="/tmp/wr-models")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--attention", default="sage8", help="the compile part's attention backend")
    args = ap.parse_args()
    t0 = time.perf_counter()
    {
        "merge": part_merge,
        "compile": part_compile,
        "vae": part_vae,
        "load": part_load,
        "vae2": part_vae2,
        "upload": part_upload,
        "first": part_first,
        "eager": part_eager,
        "drift": part_drift,
    }[args.part](args)
    row(f"part {args.part} total", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
