"""RIFE 81 -> 161 frames at 832x1216 on the GPU, host frames in and out (transfers included).

Usage: python benchmarks/gpu_interp.py --weights PATH/flownet.pkl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def pan_clip(frames: int, width: int, height: int) -> np.ndarray:
    """A slow pan with zoom over a real photo (scikit-image's astronaut), uint8 [T,H,W,3]."""
    from skimage import data
    from skimage.transform import resize

    big = (resize(data.astronaut(), (2 * height, 2 * height), anti_aliasing=True) * 255).astype(np.uint8)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        x0 = int(i * (big.shape[1] - width) / (frames - 1) * 0.5)
        out[i] = big[height // 4 : height // 4 + height, x0 : x0 + width]
    return out


def main() -> None:
    from wanrender.interp.flow import interpolate_frames
    from wanrender.interp.rife import RifeInterpolator

    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    clip = pan_clip(args.frames, w, h)
    rows = []
    for dtype in ("fp16", "fp32"):
        for batch in (4, 8, 16):
            interp = RifeInterpolator(weights=args.weights, device="cuda", dtype=dtype, batch_pairs=batch)
            list(interpolate_frames(iter(clip[:9]), interp, 2))  # warm-up: kernels, cuDNN plans
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = list(interpolate_frames(iter(clip), interp, 2))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            assert len(out) == 2 * args.frames - 1
            med = sorted(times)[1]
            rows.append({"dtype": dtype, "batch_pairs": batch, "seconds": med, "times": times,
                         "new_frames_per_s": (args.frames - 1) / med})  # fmt: skip
            print(
                f"RIFE {dtype} batch {batch}: {args.frames} -> {len(out)} frames at {w}x{h} in {med:.3f} s "
                f"(host->GPU->host included) {times}",
                flush=True,
            )
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "interp_results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
