"""What several GPUs of one host change in a prediction (the planner applies it).

Sequence parallelism (Ulysses, ``parallel/ulysses.py``) over N GPUs:

- memory per GPU: both experts, the VAE and the text encoder replicated; the DiT's
  activations scale with the tokens each GPU holds, ceil(L/N); the all-to-all adds
  its send and receive buffers (q, k, v of the shard, in and out);
- time: the DiT's attention, GEMMs and token-wise work divide by N (each GPU runs
  H/N heads over the whole sequence, and every token-wise layer on L/N tokens); the
  all-to-alls add ``all_to_all_seconds``; the VAE decode is split by rows
  (``decode_fraction``: a band of rows plus the margins its convolutions read, and the
  gather of the uint8 frames to rank 0); text encode, VAE encode and MP4 encode are
  not split (each rank encodes; rank 0 writes).

All-to-all bandwidth is an ASSUMPTION, not a measurement (nothing has run on several
GPUs yet): the effective per-GPU rate of an NCCL all-to-all, ``INTERCONNECT_GBS``
(NVLink 4: 300 GB/s of its 450 GB/s per direction; PCIe 4/5 through the host bridge
without NVLink: 12 GB/s).

The expert pipeline (``parallel/experts.py``) over 2 GPUs: GPU A holds the
high-noise expert (plus text encoder and VAE for the encode), GPU B the low-noise one
(plus the VAE for the decode); a stream of jobs runs at the pace of the slower side.
"""

from __future__ import annotations

import math

from wanrender.errors import WanrenderError
from wanrender.runtime.memory import WAN_14B, DiTDims, Workload

WAN_HEADS = 40
INTERCONNECT_GBS = {"nvlink": 300.0, "pcie": 12.0}  # assumptions, see the module docstring
INTERCONNECTS = tuple(INTERCONNECT_GBS)
ACT_BYTES = 2  # bf16 activations cross the link
ATTN_EXCHANGES = 4  # q, k, v out to the head owners, the attention output back


def head_divisors(heads: int, most: int = 16) -> list[int]:
    return [n for n in range(2, min(heads, most) + 1) if heads % n == 0]


def check_heads(ranks: int, heads: int) -> None:
    """Ulysses gives every rank whole heads: the rank count must divide the head count."""
    if ranks < 1 or heads % ranks:
        choices = ", ".join(map(str, head_divisors(heads))) or "1"
        raise WanrenderError(
            f"{ranks} GPUs cannot share the DiT's {heads} attention heads evenly — use {choices} (a divisor of {heads})"
        )


def default_interconnect(gpu_name: str) -> str:
    """Data-centre parts come as NVLink (SXM) boards; everything else talks over PCIe."""
    low = gpu_name.lower()
    return "nvlink" if any(k in low for k in ("h100", "h200", "a100", "b200")) else "pcie"


def check_interconnect(name: str) -> str:
    if name not in INTERCONNECT_GBS:
        raise WanrenderError(f"interconnect {name!r} is unknown — use {' or '.join(INTERCONNECTS)}")
    return name


def shard_tokens(work: Workload, gpus: int) -> int:
    return math.ceil(work.tokens / gpus)


def all_to_all_bytes(work: Workload, gpus: int, dims: DiTDims = WAN_14B, blocks: int = 40) -> int:
    """Bytes one GPU sends per DiT forward: per block q, k and v of its shard go out and
    the attention output comes back, each keeping 1/N of it at home."""
    if gpus <= 1:
        return 0
    per_block = ATTN_EXCHANGES * shard_tokens(work, gpus) * dims.dim * ACT_BYTES * work.batch
    return int(blocks * per_block * (gpus - 1) / gpus)


def all_to_all_seconds(work: Workload, gpus: int, interconnect: str) -> float:
    return all_to_all_bytes(work, gpus) / (INTERCONNECT_GBS[interconnect] * 1e9)


def exchange_buffer_bytes(work: Workload, gpus: int, dims: DiTDims = WAN_14B) -> int:
    """The all-to-all's send and receive copies of q, k and v for one shard."""
    if gpus <= 1:
        return 0
    return 2 * 3 * shard_tokens(work, gpus) * dims.dim * ACT_BYTES * work.batch


# Wan's decoder per latent frame, from its architecture (models/vae.py): the share of
# the convolutions' FLOPs in each part, and the rows of context a band needs on each
# side there, in latent rows (3x3 convs: 2 per residual block, 1 per upsampler's conv,
# at that part's resolution). The middle block's whole-frame attention makes every rank
# run the parts before it on the whole (small) latent frame.
DECODE_PARTS = (  # (share of the decode, latent rows of margin a side; None: whole frame)
    (0.03, None),  # conv1 + middle block (with its attention) at latent resolution
    (0.02, 13.0),  # stage 0 at 1x
    (0.21, 6.0),  # stage 1 at 2x (2 frames per latent frame) and its upsampler
    (0.39, 2.5),  # stage 2 at 4x (4 frames) and its upsampler
    (0.35, 0.9),  # stage 3 at 8x and the head
)


def decode_fraction(work: Workload, gpus: int) -> float:
    """The VAE decode time of the slowest rank of a split decode, against one GPU's
    (a model from the FLOP shares above, not a measurement)."""
    rows = math.ceil(work.height / 8)
    if gpus <= 1 or rows < gpus:
        return 1.0
    band = math.ceil(rows / gpus)
    # An inner band reads margins on both sides; the frame's edges clip them.
    return sum(share * (1.0 if margin is None else min(rows, band + 2 * margin) / rows)
               for share, margin in DECODE_PARTS)  # fmt: skip


def decode_gather_seconds(work: Workload, gpus: int, interconnect: str) -> float:
    """Rank 0 receives the other ranks' bands of uint8 frames."""
    if decode_fraction(work, gpus) == 1.0:  # one GPU, or fewer latent rows than GPUs: no split
        return 0.0
    frames = (work.latent_frames - 1) * 4 + 1
    return frames * work.width * work.height * 3 * (gpus - 1) / gpus / (INTERCONNECT_GBS[interconnect] * 1e9)
