"""The VAE decode of a ``--gpus N`` render split over its ranks: each rank decodes a
band of rows of every frame, rank 0 gathers the bands and hands the frames on.

The decoder is spatially local except for the whole-frame attention of its middle
block, which runs at latent resolution. ``WanVAE.decode(rows=...)`` runs everything up
to that attention on the whole (small) latent frame, then crops each later layer's
input to the rows its own band still needs (``models.vae.row_windows``), so a band
equals those rows of the whole decode up to the convolutions' summation order. The
upsampling stages, where the decode spends its time, shrink to a band plus a margin of
7-12 rows a side.

Per chunk (1, then 4 frames per latent frame) each rank turns its band into uint8 on
its device and ``dist.gather`` brings the bands to rank 0 (a quarter of the float
bytes); bands are padded to one height because a gather takes one size from every
rank. The causal time cache of each rank holds its band and margins only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist


def bands(height: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges covering ``range(height)``, sizes differing by at most one."""
    if not 1 <= parts <= height:
        raise ValueError(f"cannot split {height} rows into {parts} bands")
    base, extra = divmod(height, parts)
    out, at = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append((at, at + size))
        at += size
    return out


def can_split(latent_height: int, parts: int) -> bool:
    return 1 < parts <= latent_height


def split_decode(vae, latent: torch.Tensor, on_frames: Callable | None = None,
                 group: dist.ProcessGroup | None = None) -> np.ndarray:  # fmt: skip
    """Decode ``latent`` ([1, z, T, h, w], the same on every rank) together; rank 0 gets
    the uint8 frames [F, H, W, 3] (``on_frames`` sees them chunk by chunk, as
    ``pipeline.i2v.decode`` hands them), the other ranks an empty array."""
    from wanrender.pipeline.i2v import HostFrames, uint8_frames

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    p = next(vae.parameters())
    z = latent.to(p.device)
    split = bands(z.shape[-2], world)
    own = split[rank]
    tallest = max(b - a for a, b in split)
    stride = vae.config.spatial_stride
    parts: list = []

    def on_chunk(chunk: torch.Tensor) -> None:
        band = uint8_frames(chunk)  # [t, rows, W, 3] on this rank's device
        short = (tallest - (own[1] - own[0])) * stride
        if short:
            band = torch.cat([band, band.new_zeros(band.shape[0], short, *band.shape[2:])], dim=1)
        got = [torch.empty_like(band) for _ in range(world)] if rank == 0 else None
        dist.gather(band, got, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        if got is None:
            return
        frames = torch.cat([g[:, : (b - a) * stride] for g, (a, b) in zip(got, split)], dim=1)
        # As pipeline.i2v.decode hands chunks on: in transit to pinned memory on a GPU.
        host = HostFrames(frames) if frames.is_cuda else frames.numpy()
        parts.append(host)
        if on_frames is not None:
            on_frames(host)

    vae.decode(z, rows=own, on_chunk=on_chunk)
    if rank != 0:
        return np.zeros((0, z.shape[-2] * stride, z.shape[-1] * stride, 3), np.uint8)
    return np.concatenate([np.asarray(x) for x in parts])
