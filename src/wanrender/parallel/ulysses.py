"""Ulysses sequence parallelism for the DiT.

Each of N ranks holds the same expert (weights replicated) and a contiguous shard of
the token sequence after the patch embedding. Per block:

- self-attention: q, k and v of the local shard [B, L/N, H, D] go through one
  all-to-all and come out as the whole sequence for H/N heads [B, L, H/N, D];
  attention runs locally (any backend), and a second all-to-all returns the local
  tokens with all heads. The attention of a head over the whole sequence is exactly
  the single-process one, so the only differences are matmul rounding.
- everything else is token-wise or reads replicated tensors: RoPE uses each shard's
  global positions, cross-attention reads the replicated text keys and values, the
  modulation and the FFN work per token.

Token counts that N does not divide: the last shard is padded with zero tokens to
L/N rounded up. The pad sits at the end of the gathered sequence, so attention drops
it (it slices the first L tokens) instead of masking it: no backend needs a mask, and
no real token ever attends to a pad token. Pad tokens stay finite (norms of zeros are
zeros) and are cut off when the output is gathered.

The model code is reused as it is: ``WanDiT.embed_tokens`` / ``embed_time`` /
``embed_text``, its blocks (given the Ulysses function for self-attention and the
model's own for cross-attention), its head and ``unpatchify``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wanrender.errors import WanrenderError
from wanrender.models.dit import AttentionFn, WanDiT, rope_tables, unpatchify
from wanrender.runtime.multigpu import check_heads, head_divisors

__all__ = ["SequenceParallel", "check_heads", "check_replicas", "head_divisors", "ulysses_attention"]


def _exchange(send: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """all-to-all over dim 0 (one slice per rank): slice j goes to rank j, slice r comes from rank r."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def ulysses_attention(inner: AttentionFn, length: int, group: dist.ProcessGroup | None = None) -> AttentionFn:
    """Self-attention over sequence shards: ``inner`` runs on the whole sequence
    (``length`` real tokens, the rest pad) for this rank's H/N heads."""
    world = dist.get_world_size(group)

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, shard, heads, d = q.shape
        # One collective for q, k and v: [3, B, l, N, H/N, D] -> slice per destination rank.
        send = torch.stack((q, k, v)).unflatten(3, (world, heads // world)).permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = _exchange(send, group)  # [N (source rank = token shard), 3, B, l, H/N, D]
        full = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, world * shard, heads // world, d)[:, :, :length]
        out = inner(full[0], full[1], full[2])  # [B, L, H/N, D]
        if out.shape[1] < world * shard:
            out = F.pad(out, (0, 0, 0, 0, 0, world * shard - out.shape[1]))
        back = _exchange(out.unflatten(1, (world, shard)).transpose(0, 1).contiguous(), group)
        return back.permute(1, 2, 0, 3, 4).reshape(b, shard, heads, d)  # [B, l, H, D]

    return attn


def _replica(model: WanDiT) -> tuple:
    """What must agree between ranks: architecture, device kind, compute dtype, the
    attention backend, and the weights (checksummed; float64 sums of values and of
    absolute values, so a different file or a missing LoRA shows)."""
    dev = next(model.parameters()).device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    sums = torch.stack([torch.stack((t.float().sum(dtype=torch.float64), t.float().abs().sum(dtype=torch.float64)))
                        for t in tensors]).sum(0).tolist()  # fmt: skip
    fn = model.attention
    attention = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", repr(type(fn)))
    return (model.cfg.to_dict(), name, str(model.compute_dtype), attention, [float(f"{s:.9g}") for s in sums])


def check_replicas(models: list[WanDiT], group: dist.ProcessGroup | None = None) -> None:
    """Every rank must hold the same experts on the same kind of device: a collective,
    so every rank raises the same one-line error (none is left waiting)."""
    mine = [_replica(m) for m in models]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    fields = ("architecture", "device", "compute dtype", "attention backend", "weights")
    for rank, theirs in enumerate(everyone):
        for expert, (a, b) in enumerate(zip(everyone[0], theirs)):
            for what, x, y in zip(fields, a, b):
                if x != y:
                    shown = f"{x} vs {y}" if what != "weights" else "different checksums"
                    raise WanrenderError(
                        f"rank {rank} and rank 0 differ in expert {expert + 1}'s {what} ({shown}) — every GPU "
                        "must load the same model files with the same settings on the same kind of GPU"
                    )


class SequenceParallel:
    """``model(x, t, context, cond)`` computed by all ranks of ``group`` together.

    Every rank calls it with the same (replicated) inputs and gets the same full
    output. A drop-in denoiser for ``pipeline.i2v.sample``; the model itself is
    not changed, and its single-process ``forward`` stays as it is.
    """

    def __init__(self, model: WanDiT, group: dist.ProcessGroup | None = None,
                 gate: Callable[[], None] | None = None) -> None:  # fmt: skip
        """``gate``: called by every rank before each forward (a collective of its own:
        ``parallel/group.py`` stops all ranks there together)."""
        check_heads(dist.get_world_size(group), model.cfg.num_heads)
        self.model = model
        self.gate = gate
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        m, world = self.model, self.world
        if self.gate is not None:
            self.gate()
        if m.block_source is not None:
            # Streaming or chunking would split the self-attention into several calls per
            # block; with weights replicated and activations / N neither is needed.
            raise ValueError("sequence parallelism runs the blocks resident and unchunked (block_source is set)")
        tokens, grid = m.embed_tokens(x, cond)
        length = tokens.shape[1]
        shard = -(-length // world)
        lo, hi = min(self.rank * shard, length), min((self.rank + 1) * shard, length)
        mine = F.pad(tokens[:, lo:hi], (0, 0, 0, shard - (hi - lo)))  # a copy: the full tokens can go
        del tokens
        rope = rope_tables(m.cfg, grid, x.device)[lo:hi]
        if hi - lo < shard:  # pad positions: the identity rotation (cos 1, sin 0)
            identity = rope.new_zeros(shard - (hi - lo), *rope.shape[1:])
            identity[..., 0] = 1.0
            rope = torch.cat([rope, identity])
        temb, e = m.embed_time(t.to(x.device).float().expand(mine.shape[0]))
        ctx = m.embed_text(context)
        self_attn = ulysses_attention(m.attention, length, self.group)
        for block in m.blocks:
            mine = block(mine, e, ctx, rope, self_attn, m.compute_dtype, cross_attn=m.attention)
        out = m.head(mine, temb).contiguous()
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out, group=self.group)
        return unpatchify(torch.cat(parts, 1)[:, :length], grid, m.cfg.patch_size, m.cfg.out_channels)
