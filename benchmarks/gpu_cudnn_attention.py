"""cuDNN's fp8 attention (``cudnn-fp8``) against SDPA-cuDNN bf16 and ``sage8`` on one GPU.

For 1x40xLx128 self-attention (L = 82,992 and 32,760 by default; bf16 [B, L, H, D]):

- time (median of ``--reps`` CUDA-event timings after warm-up) and TFLOP/s (4*L*L*D*H) of
  sdpa-cudnn (bf16), sage8, cudnn-fp8 as the backend runs it (pre-pass: smoothing,
  rotation, quantisation; graph; post-pass) and its parts alone (the cuDNN graph on
  prepared inputs, the pre-pass);
- relative L2 against fp32 attention on ``--rows`` random query rows (all keys), for
  DiT-like inputs (``make_realistic_qkv``, V with a channel mean) and i.i.d. normal
  Q, K, V; for cudnn-fp8 also against its plain-PyTorch twin (the same quantised
  inputs through ``sdpa_fp8_emulated``: the two should agree closely);
- then, if the time budget allows, one whole DiT forward (random full-size Wan 2.2
  A14B weights, bf16 linears) with sdpa-cudnn and with cudnn-fp8 attention: the
  output cosine (target >= 0.995) and both times.

Every part is guarded: a failure prints its error and the script goes on. Runs in
under 3 minutes on an H200. Writes $OUT/gpu_cudnn_attention.json (or ./bench_out).

Usage: PYTHONPATH=src python benchmarks/gpu_cudnn_attention.py [--lengths 82992,32760]
       [--reps 10] [--rows 512] [--forward 81x480x832|81x832x1216|none] [--budget-s 170]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanrender.kernels import attention as attn  # noqa: E402
from wanrender.kernels import cudnn_fp8_math as fm  # noqa: E402
from wanrender.kernels.sage8_math import exact_attention, make_realistic_qkv, rel_l2  # noqa: E402

OUT = Path(os.environ.get("OUT", "bench_out"))
HEADS, HEAD_DIM = 40, 128
T0 = time.time()


def guarded(label: str, fn, default=None):
    try:
        return fn()
    except Exception as e:
        print(f"[{label}] failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
        traceback.print_exc(limit=3)
        return default


def cuda_ms(fn, reps: int, warmup: int = 3) -> float:
    from wanrender.bench.dit import cuda_median

    return cuda_median(fn, reps, warmup)[0] * 1000


def environment() -> dict:
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "torch_cudnn": torch.backends.cudnn.version()}  # fmt: skip

    def frontend():
        from wanrender.kernels.attention_cudnn import _frontend

        cudnn = _frontend()
        env.update(cudnn_frontend=getattr(cudnn, "__version__", "?"), cudnn_backend_version=cudnn.backend_version())

    guarded("cudnn frontend", frontend)
    env["cudnn_fp8_reasons"] = attn.reasons("cudnn-fp8", attn.Target.of("cuda", torch.bfloat16, HEAD_DIM))
    return env


def inputs(length: int) -> dict[str, tuple[torch.Tensor, ...]]:
    dit = make_realistic_qkv(1, length, HEADS, HEAD_DIM, seed=1, device="cuda", v_mean=0.5)
    g = torch.Generator(device="cuda").manual_seed(2)
    iid = tuple(torch.randn(1, length, HEADS, HEAD_DIM, generator=g, device="cuda").bfloat16() for _ in range(3))
    return {"dit": dit, "iid": iid}


def measure_length(length: int, reps: int, n_rows: int) -> dict:
    from wanrender.kernels import attention_cudnn as ac
    from wanrender.runtime.timing import self_attention_flops

    flops = self_attention_flops(length)
    data = inputs(length)
    g = torch.Generator(device="cuda").manual_seed(7)
    rows = torch.randperm(length, generator=g, device="cuda")[:n_rows].sort().values
    refs = {name: exact_attention(*qkv, rows=rows) for name, qkv in data.items()}
    target = attn.Target.of("cuda", torch.bfloat16, HEAD_DIM)
    res: dict = {"tokens": length, "rows": {}}

    def add(name: str, fn, timed: bool = True, accuracy: bool = True) -> None:
        row: dict = {}
        if accuracy:
            for case, qkv in data.items():
                row[f"err_{case}"] = guarded(f"{length} {name} {case}", lambda: rel_l2(fn(*qkv)[:, rows].float(),
                                                                                       refs[case]))  # fmt: skip
        if timed:
            ms = guarded(f"{length} {name} time", lambda: cuda_ms(lambda: fn(*data["dit"]), reps))
            if ms is not None:
                row.update(ms=ms, tflops=flops / ms / 1e9)
        res["rows"][name] = row
        print(length, name, row, flush=True)

    for name in ("sdpa-cudnn", "sage8", "cudnn-fp8"):
        why = attn.reasons(name, target)
        if why:
            res["rows"][name] = {"skipped": "; ".join(why)}
            print(length, name, "skipped:", why, flush=True)
            continue
        fn = guarded(f"select {name}", lambda: attn.select(name, target).fn)
        if fn is not None:
            add(name, fn)

    if not attn.reasons("cudnn-fp8", target):

        def parts() -> None:
            q, k, v = data["dit"]
            entry = ac.graph_for(1, length, HEADS, HEAD_DIM, q.device)
            if isinstance(entry, str):
                raise RuntimeError(entry)
            prep = fm.prepare(q, k, v)
            ms = cuda_ms(lambda: ac.sdpa_fp8(prep, entry), reps)
            res["rows"]["cudnn-fp8 graph only"] = {"ms": ms, "tflops": flops / ms / 1e9}
            res["rows"]["cudnn-fp8 pre-pass"] = {"ms": cuda_ms(lambda: fm.prepare(q, k, v), reps)}
            o8 = ac.sdpa_fp8(prep, entry)
            res["rows"]["cudnn-fp8 post-pass"] = {"ms": cuda_ms(lambda: fm.finish(o8, prep, q.dtype), reps)}
            for case, qkv in data.items():
                prep = fm.prepare(*qkv)
                got = fm.finish(ac.sdpa_fp8(prep, entry)[:, rows], prep, torch.float32)
                twin = fm.finish(fm.sdpa_fp8_emulated(prep, rows=rows), prep, torch.float32)
                res["rows"]["cudnn-fp8"][f"vs_twin_{case}"] = rel_l2(got, twin)
                res["rows"]["cudnn-fp8"][f"twin_err_{case}"] = rel_l2(twin, refs[case])
            print(
                length, "cudnn-fp8 parts", {k: v for k, v in res["rows"].items() if k.startswith("cudnn")}, flush=True
            )

        guarded(f"{length} cudnn-fp8 parts", parts)
    base = res["rows"].get("sdpa-cudnn", {}).get("ms")
    for row in res["rows"].values():
        if base and "ms" in row and "tflops" in row:
            row["x_cudnn_bf16"] = base / row["ms"]
    return res


def forward_cosine(shape: str, budget_s: float) -> dict:
    """One whole DiT forward (random full-size weights) with sdpa-cudnn vs cudnn-fp8."""
    from wanrender.bench.dit import build_ours
    from wanrender.bench.dit import inputs as dit_inputs

    frames, height, width = (int(s) for s in shape.split("x"))  # the project's shape names: F x H x W
    if time.time() - T0 > budget_s - 60:
        return {"skipped": f"time budget ({time.time() - T0:.0f} s used)"}
    target = attn.Target.of("cuda", torch.bfloat16, HEAD_DIM)
    model = build_ours()
    x, cond, ctx, t = dit_inputs(frames, width, height)
    out: dict = {"shape": shape}
    ys = {}
    with torch.no_grad():
        for name in ("sdpa-cudnn", "cudnn-fp8"):
            model.attention = attn.select(name, target).fn
            model(x, t, ctx, cond)  # warm-up (graph build)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            ys[name] = model(x, t, ctx, cond).float()
            b.record()
            torch.cuda.synchronize()
            out[f"{name}_s"] = a.elapsed_time(b) / 1000
            print("forward", name, f"{out[f'{name}_s']:.3f} s", flush=True)
    ref, got = ys["sdpa-cudnn"], ys["cudnn-fp8"]
    out["cosine"] = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
    out["rel_l2"] = ((got - ref).norm() / ref.norm()).item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="82992,32760")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--forward", default="81x480x832", help="FRAMESxHEIGHTxWIDTH of the whole-forward check, or none")
    ap.add_argument("--budget-s", type=float, default=170.0)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references and the twin in true fp32
    results: dict = {"env": guarded("env", environment, {}), "lengths": {}}
    print(results["env"], flush=True)
    for length in (int(s) for s in args.lengths.split(",") if s.strip()):
        results["lengths"][length] = guarded(f"length {length}", lambda: measure_length(length, args.reps, args.rows),
                                             {})  # fmt: skip
        torch.cuda.empty_cache()
        (OUT / "gpu_cudnn_attention.json").write_text(json.dumps(results, indent=1, default=str))
    if args.forward != "none":
        results["forward"] = guarded("forward", lambda: forward_cosine(args.forward, args.budget_s), {})
        (OUT / "gpu_cudnn_attention.json").write_text(json.dumps(results, indent=1, default=str))

    env = results["env"]
    print(f"\ntorch {env.get('torch')}, torch cuDNN {env.get('torch_cudnn')}, frontend {env.get('cudnn_frontend')} "
          f"on cuDNN {env.get('cudnn_backend_version')}, {env.get('gpu')}")  # fmt: skip
    print("%-8s %-22s %9s %8s %8s %9s %9s %10s %10s" % ("tokens", "method", "ms", "TFLOP/s", "x bf16", "err DiT",
                                                         "err iid", "vs twin D", "vs twin i"))  # fmt: skip
    for length, entry in results["lengths"].items():
        for name, row in (entry or {}).get("rows", {}).items():
            if "skipped" in row:
                print("%-8s %-22s %s" % (length, name, row["skipped"][:90]))
                continue

            def f(key, fmt="%9.4f"):
                return fmt % row[key] if isinstance(row.get(key), float) else " " * (len(fmt % 0.0) - 1) + "-"

            print("%-8s %-22s %s %s %s %s %s %s %s" % (length, name, f("ms", "%9.2f"), f("tflops", "%8.1f"),
                  f("x_cudnn_bf16", "%8.3f"), f("err_dit"), f("err_iid"), f("vs_twin_dit", "%10.4f"),
                  f("vs_twin_iid", "%10.4f")))  # fmt: skip
    fwd = results.get("forward")
    if fwd:
        print("whole forward:", json.dumps(fwd))
    print(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
