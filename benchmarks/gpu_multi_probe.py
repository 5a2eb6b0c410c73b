"""Issue #17's parts that need no model files, on several GPUs of one host (or CPU
processes over gloo with --device cpu, to check the script itself):

- ``a2a``: the Ulysses all-to-all per DiT forward. Each rank holds its shard of q, k,
  v ([1, L/N, 40, 128] bf16 at 81 x 832x1216) and runs ``ulysses_attention`` with an
  attention that does nothing, 40 times (one per block): both exchanges and their
  reshapes, nothing else.
- ``decode``: the VAE decode of 21 latent frames (81 x 832x1216) split by rows
  (``parallel/decode.py``) against rank 0 decoding alone, random full-size VAE (not
  zeros), channels-last with the fused norm as the engine runs it; the frames of the
  two compared.

    python benchmarks/gpu_multi_probe.py a2a decode --gpus 2,4 [--device cuda] [--size 832x1216]

Prints a table per part; the JSON goes to $OUT/multi_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OUT = Path(os.environ.get("OUT", "bench_out"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def a2a_rank(world, frames: int, width: int, height: int, repeats: int, tiny: bool) -> dict:
    from wanrender.parallel.ulysses import ulysses_attention
    from wanrender.spec import tokens

    heads, d, blocks = (4, 16, 2) if tiny else (40, 128, 40)
    length = tokens(frames, width, height)
    shard = -(-length // world.size)
    dtype = torch.bfloat16 if world.device.type == "cuda" else torch.float32
    g = torch.Generator(device=world.device).manual_seed(world.rank)
    q, k, v = (torch.randn(1, shard, heads, d, generator=g, device=world.device, dtype=dtype) for _ in range(3))
    attn = ulysses_attention(lambda q, k, v: v, length)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        _sync(world.device)
        t = time.perf_counter()
        for _ in range(blocks):
            out = attn(q, k, v)
        _sync(world.device)
        if i:  # the first round warms up the communicator
            times.append(time.perf_counter() - t)
    sent = 4 * shard * heads * d * q.element_size() * blocks * (world.size - 1) / world.size
    return {"rank": world.rank, "seconds": sorted(times)[len(times) // 2], "bytes_sent": sent,
            "out_ok": bool(torch.isfinite(out).all())}  # fmt: skip


def decode_rank(world, frames: int, width: int, height: int, tiny: bool) -> dict:
    from wanrender.kernels.vae_norm import prepare_vae
    from wanrender.models.random_init import init_random_
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.parallel.decode import split_decode
    from wanrender.pipeline import i2v
    from wanrender.spec import latent_frames

    cuda = world.device.type == "cuda"
    vae = WanVAE(VAEConfig.preset("demo" if tiny else "wan2.1"))
    vae = vae.to(world.device, torch.bfloat16 if cuda else torch.float32).eval()
    init_random_(vae, seed=3)  # the same weights on every rank
    prepare_vae(vae)
    g = torch.Generator(device=world.device).manual_seed(7)
    z = torch.randn(1, 16, latent_frames(frames), height // 8, width // 8, generator=g, device=world.device)
    out: dict = {"rank": world.rank}
    for run in ("warm-up", "timed"):
        dist.barrier()
        _sync(world.device)
        t = time.perf_counter()
        split = split_decode(vae, z)
        _sync(world.device)
        out["split_s"] = time.perf_counter() - t
        dist.barrier()
        if world.rank == 0:
            t = time.perf_counter()
            alone = i2v.decode(vae, z)
            _sync(world.device)
            out["alone_s"] = time.perf_counter() - t
        dist.barrier()
    if world.rank == 0:
        diff = (split.astype("int16") - alone.astype("int16")).__abs__()
        out.update(frames=list(split.shape), max_diff=int(diff.max()), differ=float((diff > 0).mean()))
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
    return out


def main() -> None:
    from wanrender.parallel.launch import launch

    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="+", choices=["a2a", "decode"])
    ap.add_argument("--gpus", default="2,4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216", help="WIDTHxHEIGHT")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    tiny = args.device == "cpu"  # gloo processes: the script's own check, tiny models
    OUT.mkdir(parents=True, exist_ok=True)
    found: dict = {"device": args.device, "frames": args.frames, "size": args.size}
    if args.device == "cuda":
        found["gpu"] = torch.cuda.get_device_name(0)
        found["visible"] = torch.cuda.device_count()
    for part in args.parts:
        print(f"\n{part} at {args.frames} x {args.size}")
        for n in map(int, args.gpus.split(",")):
            if part == "a2a":
                r = launch(a2a_rank, n, args.device, args=(args.frames, width, height, args.repeats, tiny))
                slowest = max(x["seconds"] for x in r)
                print(f"  {n} ranks: all-to-all per forward {slowest * 1e3:.1f} ms (slowest rank, median of "
                      f"{args.repeats}), {r[0]['bytes_sent'] / 1e9:.2f} GB sent per rank, "
                      f"{r[0]['bytes_sent'] / slowest / 1e9:.0f} GB/s")  # fmt: skip
            else:
                r = launch(decode_rank, n, args.device, args=(args.frames, width, height, tiny))
                slowest = max(x["split_s"] for x in r)
                print(f"  {n} ranks: split {slowest:.3f} s (slowest rank) against rank 0 alone "
                      f"{r[0]['alone_s']:.3f} s = {slowest / r[0]['alone_s']:.3f}x; frames {r[0]['frames']}, "
                      f"max diff {r[0]['max_diff']}, {r[0]['differ']:.2e} of values differ"
                      + (f"; peak {max(x['peak_gib'] for x in r):.1f} GiB" if "peak_gib" in r[0] else ""))  # fmt: skip
            found[f"{part}_{n}"] = r
    (OUT / "multi_probe.json").write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
