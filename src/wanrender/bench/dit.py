"""``wanrender bench dit``: one full-size DiT forward, ours vs the diffusers peer.

Works without weights: full-size experts are built with seeded random weights
(normal, never zeros) directly on the GPU. For each shape it times, in one run,
the peer (``WanTransformer3DModel``, bf16, SDPA) if diffusers is installed, our
bf16 path and our fp8 path (median of CUDA-event timings after a warm-up), each
attention backend alone at the shape, and the GEMM ceilings it measures itself;
it reports ratios to the peer, TFLOP/s, MFU and accuracy, and can append the
table to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wanrender.errors import WanrenderError
from wanrender.models.random_init import init_random_
from wanrender.runtime.memory import Workload
from wanrender.runtime.timing import forward_flops, self_attention_flops
from wanrender.spec import latent_frames, tokens

SHAPES = {"832x1216": (81, 832, 1216), "480x832": (81, 832, 480), "720x1280": (81, 1280, 720)}


@dataclass
class DitRow:
    shape: str
    path: str
    seconds: float
    times: list[float]
    tflops: float
    ratio: float | None = None
    extra: dict = field(default_factory=dict)


def cuda_median(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times), times


def gemm_ceilings() -> dict[str, float]:
    """bf16 and fp8 (_scaled_mm, pre-quantised) TFLOP/s on an 8192^3 product of random data."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(8192, 8192, generator=g, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, generator=g, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3
    t_bf16, _ = cuda_median(lambda: a @ b, repeats=10, warmup=3)
    out = {"bf16_tflops": flops / t_bf16 / 1e12}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device="cuda")
        t8, _ = cuda_median(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), repeats=10, warmup=3)
        out["fp8_tflops"] = flops / t8 / 1e12
    except (RuntimeError, TypeError) as e:  # pre-Ada GPUs
        out["fp8_error"] = str(e)[:100]
    return out


def build_ours(bf16_from: torch.nn.Module | None = None):
    from wanrender.models.dit import DiTConfig, WanDiT, official_key_from_diffusers

    with torch.device("meta"):
        m = WanDiT(DiTConfig.preset("i2v-A14B"))
    m = m.to_empty(device="cuda").to(torch.bfloat16).eval()
    if bf16_from is None:
        init_random_(m)
    else:  # the peer's exact weights, so outputs compare
        mine = dict(m.named_parameters())
        with torch.no_grad():
            for k, v in bf16_from.state_dict().items():
                mine[official_key_from_diffusers(k)].copy_(v)
    m.compute_dtype = torch.bfloat16
    return m


def build_peer():
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:
        return None
    with torch.device("meta"):
        ref = WanTransformer3DModel(in_channels=36, out_channels=16, image_dim=None, added_kv_proj_dim=None)
    ref = ref.to_empty(device="cuda").to(torch.bfloat16).eval()
    init_random_(ref)
    return ref


def inputs(frames: int, width: int, height: int):
    g = torch.Generator(device="cuda").manual_seed(1)
    t = latent_frames(frames)
    x = torch.randn(1, 16, t, height // 8, width // 8, generator=g, device="cuda")
    cond = torch.randn(1, 20, t, height // 8, width // 8, generator=g, device="cuda")
    ctx = torch.randn(1, 512, 4096, generator=g, device="cuda") * 0.1
    return x, cond, ctx, torch.tensor([937.5], device="cuda")


def attention_rows(n: int, shape: str, repeats: int, sage8_options: dict | None = None) -> list[dict]:
    """Each available backend alone on one self-attention call, with its error vs fp32
    (``make_realistic_qkv`` inputs, V i.i.d.: the hard case for 8-bit P·V)."""
    from wanrender.kernels import attention as attn
    from wanrender.kernels.sage8_math import make_realistic_qkv

    q, k, v = make_realistic_qkv(1, n, 40, 128, seed=3, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256].cuda()
    # fp32 reference on a subsample of query rows (the full one costs n^2 fp32 memory).
    with torch.no_grad():
        ref = attn.reference_attention(q[:, idx].float(), k.float(), v.float())
    rows, base = [], None
    target = attn.Target.of("cuda", torch.bfloat16, 128)
    for name in ("sdpa-cudnn", "sdpa-flash", "sdpa", "flash-attn", "sage", "sage8", "cudnn-fp8"):
        why = attn.reasons(name, target)
        if why:
            rows.append({"shape": shape, "backend": name, "skipped": "; ".join(why)})
            continue
        choice = attn.select(name, target, options=sage8_options if name == "sage8" else None)
        fn = choice.fn
        try:
            sec, times = cuda_median(lambda: fn(q, k, v), repeats=repeats)
            out = fn(q, k, v)
        except Exception as e:  # a backend failing at this shape is a result, not a crash
            rows.append({"shape": shape, "backend": name, "skipped": f"failed: {type(e).__name__}: {str(e)[:80]}"})
            continue
        err = ((out[:, idx].float() - ref).norm() / ref.norm()).item()
        base = sec if name == "sdpa-cudnn" else base
        rows.append({"shape": shape, "backend": name, "seconds": sec, "times": times,
                     "tflops": self_attention_flops(n) / sec / 1e12, "rel_l2_vs_fp32": err,
                     "speedup_vs_cudnn": (base / sec) if base else None})  # fmt: skip
        if choice.options:
            rows[-1]["options"] = dict(choice.options)
        del out
    return rows


def parse_variants(text: str) -> list[tuple[str, str]]:
    """'auto:off,sage8:default' -> [(attention, compile mode), ...] for the bf16 path."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, mode = part.partition(":")
        mode = mode or "off"
        if not name or mode not in ("off", "default", "max-autotune"):
            raise WanrenderError(
                f"--bf16-variants {part!r} is invalid — use ATTENTION:COMPILE, e.g. sdpa-cudnn:default"
            )
        out.append((name, mode))
    if not out:
        raise WanrenderError("--bf16-variants is empty — e.g. auto:off")
    return out


def run(*args, **kwargs) -> dict:
    """``_run`` with Dynamo's recompile limit raised, as the engine renders: every shape
    x attention x compile variant timed here adds an entry to the blocks' one cache."""
    from wanrender.runtime.plan import compiled_scope

    with compiled_scope():
        return _run(*args, **kwargs)


def _run(shapes: list[str], repeats: int = 3, compile_mode: str = "default", attention: str = "auto",
        peer: bool = True, log: Callable[[str], None] = print, bf16: bool = True,
        bf16_variants: list[tuple[str, str]] | None = None, fp8: bool = True,
        sage8_options: dict | None = None) -> dict:  # fmt: skip
    """Times the peer, our bf16 path (each of ``bf16_variants``: attention and compile
    mode; default exact attention, eager) and our fp8 path (``attention``, ``compile_mode``).
    ``sage8_options``: kernel options wherever sage8 runs (named, or picked by auto)."""
    from wanrender.kernels import attention as attn
    from wanrender.kernels.linear import enable_fp8
    from wanrender.runtime.plan import compile_blocks
    from wanrender.spec import FP8_EXCLUDE

    torch.backends.cuda.matmul.allow_tf32 = True
    target = attn.Target.of("cuda", torch.bfloat16, 128)

    def pick(name: str, eight_bit: bool = False) -> attn.Choice:
        # Only sage8 takes kernel options: another named backend runs without them.
        opts = sage8_options if name in ("sage8", "auto") else None
        return attn.select(name, target, eight_bit=eight_bit, options=opts)

    variants = [(pick(a), m) for a, m in (bf16_variants or [("auto", "off")])] if bf16 else []
    fast = pick(attention, eight_bit=True) if fp8 else None  # the fp8 path
    result: dict = {"ceilings": gemm_ceilings(), "dit": [], "attention": [], "accuracy": {}}
    if sage8_options:
        result["sage8_options"] = dict(sage8_options)
    log(f"GEMM ceilings: {result['ceilings']}")
    ref = build_peer() if peer else None
    ours = build_ours(ref)
    log(f"bf16 path {', '.join(f'{c.describe()} compile {m}' for c, m in variants) or 'not timed'}; "
        f"fp8 path {fast.describe() if fp8 else 'not timed'}")  # fmt: skip
    outs: dict[str, torch.Tensor] = {}
    for shape in shapes:
        f, w, h = SHAPES[shape]
        x, cond, ctx, t = inputs(f, w, h)
        flops = forward_flops(Workload(f, w, h))
        peer_s = None
        with torch.no_grad():
            if ref is not None:
                inp = torch.cat([x, cond], 1).bfloat16()
                sec, times = cuda_median(lambda: ref(inp, t, ctx.bfloat16(), return_dict=False), repeats)
                peer_s = sec
                result["dit"].append(DitRow(shape, "diffusers (peer)", sec, times, flops / sec / 1e12, 1.0).__dict__)
                log(f"{shape} peer: {sec:.3f} s")
                if shape == shapes[0]:
                    outs["peer"] = ref(inp, t, ctx.bfloat16(), return_dict=False)[0].float()
            for i, (choice, mode) in enumerate(variants):
                ours.attention = choice.fn
                compile_blocks(ours, mode)
                tc = time.perf_counter()
                ours(x, t, ctx, cond)
                torch.cuda.synchronize()
                first = time.perf_counter() - tc
                sec, times = cuda_median(lambda: ours(x, t, ctx, cond), repeats, warmup=0)
                how = "eager" if mode == "off" else f"compile {mode}"
                result["dit"].append(DitRow(shape, f"ours bf16 ({choice.backend.name}, {how})", sec, times,
                                            flops / sec / 1e12, sec / peer_s if peer_s else None,
                                            {"first_call_s": first}).__dict__)  # fmt: skip
                log(f"{shape} ours bf16 {choice.backend.name} {how}: {sec:.3f} s")
                if shape == shapes[0]:
                    y = ours(x, t, ctx, cond).float()
                    if "peer" in outs:
                        result["accuracy"][f"bf16_{choice.backend.name}_{mode}_vs_peer_cosine"] = _cos(y, outs["peer"])
                    if i == 0:  # the first variant is the bf16 reference of the fp8 comparison
                        outs["bf16"] = y
                    del y
    compile_blocks(ours, "off")
    if ref is not None:
        ref = None
        gc.collect()
        torch.cuda.empty_cache()
    # fp8 path: fp8 linears (per-token activations) + regional compile.
    t0 = time.perf_counter()
    if fp8:
        enable_fp8(ours, exclude=FP8_EXCLUDE)
        ours.attention = fast.fn
        compile_blocks(ours, compile_mode)
    for shape in shapes if fp8 else []:
        f, w, h = SHAPES[shape]
        x, cond, ctx, t = inputs(f, w, h)
        flops = forward_flops(Workload(f, w, h))
        peer_s = next(
            (r["seconds"] for r in result["dit"] if r["shape"] == shape and r["path"].startswith("diff")), None
        )
        with torch.no_grad():
            tc = time.perf_counter()
            ours(x, t, ctx, cond)
            torch.cuda.synchronize()
            first = time.perf_counter() - tc
            sec, times = cuda_median(lambda: ours(x, t, ctx, cond), repeats, warmup=0)
            row = DitRow(shape, f"ours fp8 ({fast.backend.name}, compile {compile_mode})", sec, times,
                         flops / sec / 1e12, sec / peer_s if peer_s else None, {"first_call_s": first})  # fmt: skip
            result["dit"].append(row.__dict__)
            log(f"{shape} ours fp8: {sec:.3f} s (first call incl. compile {first:.1f} s)")
            if shape == shapes[0]:
                outs["fp8"] = ours(x, t, ctx, cond).float()
    if fp8:
        result["fp8_setup_s"] = time.perf_counter() - t0
    acc = result["accuracy"]
    if "peer" in outs and "bf16" in outs:
        acc["bf16_vs_peer_cosine"] = _cos(outs["bf16"], outs["peer"])
    base = "bf16" if "bf16" in outs else "peer"
    if base in outs and "fp8" in outs:
        acc[f"fp8_vs_{base}_cosine"] = _cos(outs["fp8"], outs[base])
        acc[f"fp8_vs_{base}_rel_l2"] = ((outs["fp8"] - outs[base]).norm() / outs[base].norm()).item()
    outs.clear()
    ours = None  # free both experts before the attention-only timings
    gc.collect()
    torch.cuda.empty_cache()
    for shape in shapes:
        f, w, h = SHAPES[shape]
        result["attention"] += attention_rows(tokens(f, w, h), shape, repeats, sage8_options)
    return result


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item()


def markdown(result: dict, env: dict) -> str:
    lines = [f"### `wanrender bench dit` — {env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, {time.strftime('%Y-%m-%d')}", "",
             f"GEMM ceilings measured in the run: {', '.join(f'{k} {v:.0f}' for k, v in result['ceilings'].items() if isinstance(v, float))}", "",
             "| shape | path | seconds (median) | TFLOP/s | MFU vs bf16 GEMM | ratio to peer |", "|---|---|---|---|---|---|"]  # fmt: skip
    ceiling = result["ceilings"].get("bf16_tflops", math.nan)
    for r in result["dit"]:
        ratio = f"{r['ratio']:.3f}x" if r.get("ratio") else "—"
        lines.append(
            f"| {r['shape']} | {r['path']} | {r['seconds']:.3f} | {r['tflops']:.0f} | {r['tflops'] / ceiling:.0%} | {ratio} |"
        )
    lines += [
        "",
        "| shape | attention backend | ms | TFLOP/s | vs SDPA-cuDNN | rel. L2 vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["attention"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['backend']} | — | — | — | {r['skipped']} |")
        else:
            sp = f"{r['speedup_vs_cudnn']:.2f}x" if r.get("speedup_vs_cudnn") else "—"
            lines.append(
                f"| {r['shape']} | {r['backend']} | {r['seconds'] * 1e3:.1f} | {r['tflops']:.0f} | {sp} | {r['rel_l2_vs_fp32']:.4f} |"
            )
    lines += [
        "",
        "Accuracy (production shape): " + ", ".join(f"{k} {v:.5f}" for k, v in result["accuracy"].items()),
        "",
    ]
    return "\n".join(lines)
