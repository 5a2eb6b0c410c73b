"""The ``cudnn-fp8`` quantisation scheme measured on CPU, by emulation (no GPU).

For each input case, relative L2 of ``cudnn_fp8_reference`` (the plain-PyTorch twin
of cuDNN's fp8 SDPA plus our pre/post-pass) against fp32 attention, for the scheme
variants (smoothing, scale granularity) and, with the default scheme, for each fp8
rounding alone (the others left in fp32) to attribute the error.

Cases: ``dit`` = ``make_realistic_qkv`` with V carrying a per-channel mean (0.5 sd),
``dit-iidv`` = the same Q, K with i.i.d. zero-mean V, ``iid`` = standard normal Q, K, V.

Usage: PYTHONPATH=src python benchmarks/cpu_cudnn_fp8_scheme.py [--length 4096] [--heads 4]
Takes a few minutes on two cores at the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanrender.kernels.cudnn_fp8_math import Fp8Scheme, cudnn_fp8_reference  # noqa: E402
from wanrender.kernels.sage8_math import exact_attention, make_realistic_qkv, rel_l2  # noqa: E402

VARIANTS = {
    "as they are (no smoothing, per tensor)": Fp8Scheme(smooth_k=False, smooth_v=False, v_scale="tensor", rotate=False),
    "K smoothed": Fp8Scheme(smooth_v=False, v_scale="tensor", rotate=False),
    "K+V smoothed": Fp8Scheme(rotate=False),
    "K+V smoothed, V per head": Fp8Scheme(v_scale="head", rotate=False),
    "K+V smoothed, V per channel": Fp8Scheme(v_scale="channel", rotate=False),
    "K+V smoothed, Q/K per head (emulation only)": Fp8Scheme(qk_scale="head", rotate=False),
    "K+V smoothed, Q/K rotated (default)": Fp8Scheme(),
    "default, V per channel": Fp8Scheme(v_scale="channel"),
    "only Q rounded": Fp8Scheme(quantised=("q",)),
    "only K rounded": Fp8Scheme(quantised=("k",)),
    "only V rounded": Fp8Scheme(quantised=("v",)),
    "only P rounded": Fp8Scheme(quantised=("p",)),
    "only O rounded": Fp8Scheme(quantised=("o",)),
    "all but O (bf16 output, Blackwell)": Fp8Scheme(quantised=("q", "k", "v", "p")),
    "Q, K only (16-bit P.V)": Fp8Scheme(quantised=("q", "k")),
    "nothing rounded (smoothing only)": Fp8Scheme(quantised=()),
}


def cases(length: int, heads: int, d: int) -> dict[str, tuple[torch.Tensor, ...]]:
    q, k, v = make_realistic_qkv(1, length, heads, d, seed=0, v_mean=0.5)
    v0 = make_realistic_qkv(1, length, heads, d, seed=0, v_mean=0.0)[2]
    g = torch.Generator().manual_seed(1)
    iid = tuple(torch.randn(1, length, heads, d, generator=g).to(torch.bfloat16) for _ in range(3))
    return {"dit": (q, k, v), "dit-iidv": (q, k, v0), "iid": iid}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    inputs = cases(args.length, args.heads, args.head_dim)
    refs = {name: exact_attention(*qkv) for name, qkv in inputs.items()}
    print(f"L={args.length} H={args.heads} D={args.head_dim}, bf16 inputs, rel L2 vs fp32 attention (CPU emulation)")
    print("%-44s %9s %9s %9s" % ("variant", *inputs))
    for label, scheme in VARIANTS.items():
        t0 = time.time()
        errs = [rel_l2(cudnn_fp8_reference(*inputs[n], scheme).float(), refs[n]) for n in inputs]
        print(
            "%-44s %8.2f%% %8.2f%% %8.2f%%  (%.0f s)" % (label, *(100 * e for e in errs), time.time() - t0), flush=True
        )


if __name__ == "__main__":
    main()
