"""The tail of a render, from the last DiT step to the MP4 on disk, part by part
(issue #13: target <= 3 s at 81 x 832x1216 on an H200).

Parts (each prints table rows):
  layout   the VAE decode with NCDHW activations (as is), with channels-last (NDHWC)
           activations and weights, each with the plain and the fused norm where it
           applies; which layout the convolutions saw; where the NDHWC decode's time goes
  encode   x264 on the 81 frames of two sources (a random VAE's frames, a smooth natural
           video): seconds, size and PSNR per preset, RGB or YUV handed to the encoder
  tail     decode streamed into the encoder (as ``generate`` runs it) per preset:
           decode seconds, then the wait for the file

Usage: PYTHONPATH=src python benchmarks/gpu_tail_probe.py PART [--frames 81] [--size 832x1216]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# (x264 preset, rc-lookahead or None for the preset's own)
VARIANTS = (("medium", None), ("medium", 20), ("medium", 10), ("faster", None), ("veryfast", None))


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def row(name: str, seconds: float, note: str = "") -> None:
    print(f"| {name:<52} | {seconds:8.3f} s | {note}", flush=True)


def random_vae(args):
    from wanrender.models.random_init import init_random_
    from wanrender.models.vae import VAEConfig, WanVAE

    frames, (w, h) = args.frames, map(int, args.size.split("x"))
    vae = WanVAE(VAEConfig.preset("wan2.1")).to("cuda", torch.bfloat16).eval()
    init_random_(vae, seed=3)
    lat = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(4))
    return vae, lat


def _layouts(vae) -> collections.Counter:
    seen: collections.Counter = collections.Counter()

    def pre(m, inp):
        x = inp[0]
        cl = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        seen[(type(m).__name__, "NHWC" if x.is_contiguous(memory_format=cl) else "NCHW")] += 1

    hooks = [
        m.register_forward_pre_hook(pre) for m in vae.decoder.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
    ]
    seen["_hooks"] = hooks  # type: ignore[assignment]
    return seen


def part_layout(args) -> None:
    from wanrender.kernels.vae_norm import enable_vae_kernels
    from wanrender.pipeline import i2v

    vae, lat = random_vae(args)
    t1, ref = timed(lambda: i2v.decode(vae, lat))
    t2, ref = timed(lambda: i2v.decode(vae, lat))
    row("decode NCDHW, plain norm", t2, f"first {t1:.2f} s")
    n = enable_vae_kernels(vae)
    timed(lambda: i2v.decode(vae, lat))
    t2, out = timed(lambda: i2v.decode(vae, lat))
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    row(f"decode NCDHW, fused norm ({n})", t2, f"|diff| max {d.max()} mean {d.mean():.3f}")
    for m in vae.modules():
        if hasattr(m, "kernel"):
            m.kernel = None
    vae.set_channels_last(True)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        timed(lambda: i2v.decode(vae, lat))
        t2, out = timed(lambda: i2v.decode(vae, lat))
        d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
        row(f"decode NDHWC, plain norm, cudnn.benchmark {bench}", t2, f"|diff| max {d.max()} mean {d.mean():.3f}")
    torch.backends.cudnn.benchmark = False
    seen = _layouts(vae)
    i2v.decode(vae, lat[:, :, :3])
    for h in seen.pop("_hooks"):
        h.remove()
    print("conv inputs by layout:", dict(seen))
    n = enable_vae_kernels(vae)
    timed(lambda: i2v.decode(vae, lat))
    t2, out = timed(lambda: i2v.decode(vae, lat))
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    row(f"decode NDHWC, fused norm ({n})", t2, f"|diff| max {d.max()} mean {d.mean():.3f}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        i2v.decode(vae, lat)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=110))


def natural_video(frames: int, w: int, h: int) -> np.ndarray:
    """A slow zoom into a photograph: content x264 sees in real renders (the random
    VAE's frames are close to noise, which no real render looks like)."""
    import cv2
    import skimage.data

    img = cv2.resize(skimage.data.astronaut(), (w * 5 // 4, h * 5 // 4), interpolation=cv2.INTER_CUBIC)
    out = np.empty((frames, h, w, 3), np.uint8)
    for i in range(frames):
        z = 1.0 + 0.25 * i / max(frames - 1, 1)
        m = np.array([[z, 0, (1 - z) * img.shape[1] / 2], [0, z, (1 - z) * img.shape[0] / 2]], np.float32)
        warped = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR)
        y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        out[i] = warped[y0 : y0 + h, x0 : x0 + w]
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-9)))


def part_encode(args) -> None:
    from wanrender.media.video import read_video, write_video
    from wanrender.pipeline import i2v

    vae, lat = random_vae(args)
    sources = {
        "random VAE": i2v.decode(vae, lat),
        "natural": natural_video(args.frames, *map(int, args.size.split("x"))),
    }
    del vae
    out = Path(tempfile.mkdtemp()) / "enc.mp4"
    for name, fr in sources.items():
        fr = np.ascontiguousarray(fr)
        for preset, la in VARIANTS:
            t0 = time.perf_counter()
            write_video(fr, out, fps=16, crf=18, preset=preset, lookahead=la)
            t = time.perf_counter() - t0
            back, _ = read_video(out)
            row(f"{name}: x264 {preset}, lookahead {la}, crf 18", t,
                f"{out.stat().st_size / 1e6:.2f} MB, PSNR {psnr(back, fr):.2f} dB")  # fmt: skip


def part_tail(args) -> None:
    from wanrender.kernels.vae_norm import prepare_vae
    from wanrender.media.video import StreamingWriter
    from wanrender.pipeline import i2v

    vae, lat = random_vae(args)
    prepare_vae(vae)  # as the engine runs it
    timed(lambda: i2v.decode(vae, lat))
    t, _ = timed(lambda: i2v.decode(vae, lat))
    row("decode alone (as the engine runs it)", t)
    tmp = Path(tempfile.mkdtemp())
    for preset, la in VARIANTS:
        w = StreamingWriter(tmp / f"{preset}{la}.mp4", fps=16, crf=18, preset=preset, lookahead=la)
        t_dec, _ = timed(lambda: i2v.decode(vae, lat, on_frames=w.put))
        wait = w.close()
        row(
            f"tail, x264 {preset} lookahead {la}: decode + wait",
            t_dec + wait,
            f"decode {t_dec:.3f} s, wait {wait:.3f} s",
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("layout", "encode", "tail"))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    args = ap.parse_args()
    t0 = time.perf_counter()
    {"layout": part_layout, "encode": part_encode, "tail": part_tail}[args.part](args)
    row(f"part {args.part} total", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
