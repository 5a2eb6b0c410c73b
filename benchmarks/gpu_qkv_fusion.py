"""Does one Q/K/V GEMM beat three? Measured before building it into the model.

The self-attention of one Wan block at 81x832x1216 (82,992 tokens, dim 5120): the
three projections plus the qk RMSNorm, as three layers (what the model does now)
and as one layer with the three weights stacked ([15360, 5120], the same
per-output-channel fp8 scales, so the two compute the same thing). Each in fp8
(per-token activations, ``_scaled_mm``) and bf16, eager and under torch.compile
(the model compiles its blocks; AOTAutograd's common-subexpression pass may
already share the activation quantisation between the three fp8 layers, which is
most of what fusing would save).

Prints ms per call and per forward (40 blocks) and the largest difference between
the fused and separate outputs. Needs a CUDA GPU (fp8: compute capability >= 8.9);
``--device cpu --tokens 256`` is a smoke run of the script itself (bf16 only).
Writes $OUT/qkv_fusion.json (or ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OUT = Path(os.environ.get("OUT", "bench_out"))
DIM = 5120


def median_ms(fn, device: str, repeats: int) -> float:
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from wanrender.kernels.linear import enable_fp8, fp8_capable
    from wanrender.models.common import Linear
    from wanrender.models.random_init import init_random_

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=82992)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev = args.device
    sep = [Linear(DIM, DIM) for _ in range(3)]
    init_random_(torch.nn.ModuleList(sep))
    g = torch.Generator().manual_seed(0)
    fused = Linear(DIM, 3 * DIM)
    fused.weight.data = torch.cat([lin.weight.data for lin in sep])
    fused.bias.data = torch.cat([lin.bias.data for lin in sep])
    norm_w = [torch.rand(DIM, generator=g) + 0.5 for _ in range(2)]
    x = (torch.randn(1, args.tokens, DIM, generator=g) + torch.randn(DIM, generator=g) * 0.3).to(torch.bfloat16)

    sep = [lin.to(dev, torch.bfloat16) for lin in sep]
    fused = fused.to(dev, torch.bfloat16)
    x = x.to(dev)
    nq, nk = (w.to(dev, torch.bfloat16) for w in norm_w)

    def three(x):
        q, k, v = (lin(x) for lin in sep)
        return F.rms_norm(q, (DIM,), nq, 1e-6), F.rms_norm(k, (DIM,), nk, 1e-6), v

    def one(x):
        q, k, v = fused(x).split(DIM, dim=-1)
        return F.rms_norm(q, (DIM,), nq, 1e-6), F.rms_norm(k, (DIM,), nk, 1e-6), v

    precisions = ["bf16"] + (["fp8"] if not fp8_capable(dev) else [])
    rows = []
    for prec in precisions:
        if prec == "fp8":
            for lin in [*sep, fused]:
                holder = torch.nn.Module()
                holder.lin = lin
                enable_fp8(holder)
        for mode in ("eager", "compile"):
            torch._dynamo.reset()
            f3 = torch.compile(three, dynamic=False) if mode == "compile" else three
            f1 = torch.compile(one, dynamic=False) if mode == "compile" else one
            with torch.no_grad():
                ms3 = median_ms(lambda: f3(x), dev, args.repeats)
                ms1 = median_ms(lambda: f1(x), dev, args.repeats)
                a, b = f3(x), f1(x)
                diff = max(((p.float() - r.float()).norm() / r.float().norm()).item() for p, r in zip(b, a))
            row = {"precision": prec, "mode": mode, "three_ms": ms3, "fused_ms": ms1,
                   "saved_per_forward_ms": (ms3 - ms1) * 40, "fused_vs_three_rel_l2": diff}  # fmt: skip
            rows.append(row)
            print(f"{prec:5} {mode:8} three {ms3:8.3f} ms  fused {ms1:8.3f} ms  "
                  f"ratio {ms1 / ms3:.3f}  saved per forward (40 blocks) {row['saved_per_forward_ms']:7.1f} ms  "
                  f"rel L2 fused vs three {diff:.2e}", flush=True)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "qkv_fusion.json").write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
