"""What the ranks of tests/test_parallel.py run (spawned processes import it by name)."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from helpers_models import tiny_dit

from wanrender.errors import WanrenderError
from wanrender.models.dit import DiTConfig
from wanrender.parallel.launch import NVLINK_OFF, World
from wanrender.parallel.ulysses import SequenceParallel, check_replicas
from wanrender.pipeline import i2v
from wanrender.spec import Sampling

# 4 heads: splits over 2 and 4 ranks (head dim 16 leaves 4/6/6 RoPE channels).
SP_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)
# (batch, frames, height, width) of the latent: 8 tokens (divisible by 2 and 4),
# 27 tokens (padded on both) with batch 2 (the cfg batch), 1 token (fewer than the ranks).
SHAPES = ((1, 2, 4, 4), (2, 3, 6, 6), (1, 1, 2, 2))


def _inputs(b: int, f: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, h, w, generator=g)
    cond = torch.randn(b, 20, f, h, w, generator=g)
    ctx = torch.randn(b, 7, SP_DIT.text_dim, generator=g)
    t = torch.tensor([937.5, 250.0][:b])
    return x, t, ctx, cond


def sequence_parallel_checks(world: World) -> dict:
    """Forward and whole-sampler results next to the single-process ones, the replica
    checks, and the environment this rank was started with."""
    out: dict = {"env": {k: os.environ.get(k) for k in (*NVLINK_OFF, "MASTER_ADDR")}, "forward": []}
    model = tiny_dit(SP_DIT, seed=1)
    sp = SequenceParallel(model)
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            x, t, ctx, cond = _inputs(*shape, seed=10 + i)
            out["forward"].append((shape, sp(x, t, ctx, cond), model(x, t, ctx, cond)))

    high, low = model, tiny_dit(SP_DIT, seed=2)
    check_replicas([high, low])
    x, _, ctx, cond = _inputs(1, 3, 6, 6, seed=20)
    noise = i2v.initial_noise(5, tuple(x.shape))
    turbo = Sampling()  # 4 euler steps, switch at 2, cfg 1: the turbo preset's schedule
    out["sampled"] = i2v.sample(SequenceParallel(high), SequenceParallel(low), noise, cond, ctx, turbo)
    out["sampled_ref"] = i2v.sample(high, low, noise, cond, ctx, turbo)

    out["mismatch"] = []
    for change in ("dtype", "weights"):
        other = tiny_dit(SP_DIT, seed=2)
        if world.rank == 1 and change == "dtype":
            other.compute_dtype = torch.bfloat16
        if world.rank == 1 and change == "weights":
            other.blocks[1].ffn[0].weight.data[0, 0] += 0.5
        try:
            check_replicas([high, other])
            out["mismatch"].append(None)
        except WanrenderError as err:
            out["mismatch"].append(str(err))
    return out


def split_decode_checks(world: World) -> dict:
    """The VAE decode split by rows over the ranks against the whole decode in this
    process: float bands (``rows=``) and the gathered uint8 frames, channels-first and
    channels-last, on a height every rank count divides and on one it does not (7
    latent rows: padded bands)."""
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.parallel.decode import bands, split_decode

    torch.manual_seed(3)  # the same random VAE on every rank
    vae = WanVAE(VAEConfig.preset("demo")).eval()
    for p in vae.parameters():  # norms' gains near 1, conv weights large enough to mix
        p.data = p.data.normal_(0, 0.15) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    out: dict = {"rank": world.rank, "cases": []}
    for height, channels_last in ((8, False), (7, True)):
        vae.set_channels_last(channels_last)
        z = torch.randn(1, 16, 3, height, 5, generator=torch.Generator().manual_seed(height))
        whole = vae.decode(z)
        a, b = bands(height, world.size)[world.rank]
        band = vae.decode(z, rows=(a, b))
        seen: list = []
        frames = split_decode(vae, z, on_frames=seen.append)
        out["cases"].append({
            "height": height, "band_gap": (band - whole[..., a * 8 : b * 8, :]).abs().max().item(),
            "frames": frames, "whole": i2v.to_uint8(whole), "chunks": [len(c) for c in seen],
        })  # fmt: skip
    # Ranks that planned differently (each against its own free memory): rank 0's choice holds.
    from wanrender.parallel.render import Ranks

    z = torch.randn(1, 16, 2, 8, 5, generator=torch.Generator().manual_seed(1))
    out["rank0_tiled"] = Ranks(world).decode(vae, z, tiled=world.rank == 0).shape
    out["others_tiled"] = Ranks(world).decode(vae, z, tiled=world.rank != 0).shape
    return out


def fail_on_rank_1(world: World, how: str) -> None:
    """Rank 0 waits in a collective while rank 1 fails ``how``."""
    if world.rank == 1:
        if how == "error":
            raise WanrenderError("rank 1 found bad input — fix it and run again")
        os.kill(os.getpid(), signal.SIGKILL)  # a GPU that drops out: the process is gone
    dist.all_reduce(torch.ones(4))


def forward_gap(world: World) -> dict:
    """One sequence-parallel forward (27 tokens: padded) against the single-process one."""
    model = tiny_dit(SP_DIT, seed=1)
    x, t, ctx, cond = _inputs(1, 3, 6, 6, seed=3)
    with torch.no_grad():
        sp, ref = SequenceParallel(model)(x, t, ctx, cond), model(x, t, ctx, cond)
    env = {k: os.environ.get(k) for k in NVLINK_OFF}
    return {"rank": world.rank, "gap": ((sp - ref).abs().max() / ref.abs().max()).item(), "env": env}


if __name__ == "__main__":  # run by torchrun in test_parallel.py: this process is one rank
    import json

    from wanrender.parallel.launch import launch

    try:
        launch(forward_gap, 4, "cpu", heads=SP_DIT.num_heads)
    except WanrenderError as err:
        refused = str(err)
    results = launch(forward_gap, 2, "cpu", heads=SP_DIT.num_heads)
    if int(os.environ["RANK"]) == 0:
        print("RESULT " + json.dumps({"refused": refused, "results": results}))
