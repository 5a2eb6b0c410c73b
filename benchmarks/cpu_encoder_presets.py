"""x264 presets at crf 18 on camera-like content: encode time, size and PSNR (issue #13 tail).

Random-weight renders decode to noise that no codec keeps, so the frames here are the
demo photo under a slow zoom and pan (81 frames at 832x1216 by default): content a
real Wan render resembles more than noise. Each preset encodes the same frames with
the project's writer (``media.video.write_video``), is decoded back, and is compared
with the source frames (PSNR over all pixels, 8-bit).

  PYTHONPATH=src python benchmarks/cpu_encoder_presets.py [--frames 81] [--size 832x1216]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def camera_frames(n: int, w: int, h: int) -> np.ndarray:
    from wanrender.demo import demo_image
    from wanrender.media.image import load_image

    img = torch.from_numpy(load_image(demo_image())).permute(2, 0, 1)[None].float()
    out = []
    for i in range(n):
        z = 1.0 + 0.25 * i / max(1, n - 1)  # slow dolly-in with a drift to the right
        theta = torch.tensor([[[1 / z, 0, 0.15 * i / max(1, n - 1)], [0, 1 / z, 0]]], dtype=torch.float32)
        grid = F.affine_grid(theta, (1, 3, h, w), align_corners=False)
        f = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out.append((f[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")


def main() -> None:
    import av

    from wanrender.media.video import write_video

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    ap.add_argument("--presets", default="medium,fast,faster,veryfast,superfast")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    frames = camera_frames(a.frames, w, h)
    print(f"{a.frames} frames {w}x{h}, crf 18, torch threads {torch.get_num_threads()}")
    print("| preset | encode s | size MB | PSNR dB vs source |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets.split(","):
            path = Path(tmp) / f"{preset}.mp4"
            t0 = time.perf_counter()
            write_video(iter(frames), path, fps=16, crf=18, preset=preset)
            dt = time.perf_counter() - t0
            with av.open(str(path)) as c:
                back = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
            print(f"| {preset} | {dt:.2f} | {path.stat().st_size / 1e6:.2f} | {psnr(back, frames):.2f} |", flush=True)


if __name__ == "__main__":
    main()
