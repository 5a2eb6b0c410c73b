"""The memory model: what sits on the GPU at each stage of a render, in bytes.

Weights (per component, by dtype)
    One Wan 2.2 expert has 14.283 B parameters in Linear weights (stored fp8 in the
    users' ``fp8_scaled`` files: 1 byte each) and 5.66 M others (biases, norms,
    modulation, patch embedding: the bf16 "residue"); 40 blocks of 351.27 M + 0.12 M
    parameters, 233 M outside the blocks. UMT5-XXL: 4.63 B Linear parameters (fp8)
    plus a 1.05 B-parameter token embedding (bf16): 6.73 GB. VAE: 126.9 M parameters,
    bf16 on the GPU. With model files at hand the sizes are read from their headers.

Activations of one DiT forward (per token, L = ((F-1)/4+1)·(H/16)·(W/16), x batch 2
when cfg != 1). D = 5120, F = 13824. Live tensors at the worst moment of a block,
counted from the code (models/dit.py, kernels/linear.py):

============  =====================================================================  =========
path          worst moment and what is alive (bytes per token)                       total
============  =====================================================================  =========
eager         RoPE of k: residual x fp32 4D, h 2D, q (old+rotated) 4D, k 2D, v 2D,    24 D
              RoPE temporaries (fp32 copy 4D, complex product 4D, result 2D)
fp8 eager     quantising the FFN hidden for ffn.2: x 4D, h 2D, GELU out 2F, its fp32  6D + 10F
              copy and the scaled copy 8F (``quantize_rows``)                        (= 33 D)
compiled      elementwise work fused: FFN hidden 2F + fused GELU/quant output        6D + 4F
              (1F fp8, 2F bf16) beside x and h                                       (≤ 16.8 D)
chunked (n)   x, K and V over the whole sequence (8D) + the path's temporaries of
              one chunk: (peak - 4D) / n
============  =====================================================================  =========

The attention kernel keeps only O(L) state (flash/cuDNN); RoPE table, latents and
sampler state are counted separately (``misc_bytes``).

VAE (bf16). Decode runs one latent frame at a time with a causal cache: two frames
of every causal conv's input stay cached (counted from the architecture:
``vae_cache_bytes``), one chunk's working set at full resolution (4 frames x 96
channels) is ``VAE_WORK`` times that tensor, and the output video is fp32. Tiled
decode (512 px tiles, 128 px overlap) scales cache and working set by the tile's
share of the frame; the full-size fp32 output stays.

Calibration. One measurement exists (docs/benchmarks.md, H200): 44.1 GiB torch-
allocated peak, 81x832x1216, cfg 1, both fp8-stored experts, fp8 text encoder and
bf16 VAE resident, eager dequantising path. Weights then were 33.13 GiB; the
rest, 10.97 GiB, is the DiT's activation peak (the VAE decode's modelled peak,
8.7 GiB, is below it). The code measured then (before commit df2f89b) held 26 D per
token at its worst moment; ``ACT_CALIBRATION`` = 10.77 GiB / (26 D L) = 1.047 is
the allocator's overhead over the live-tensor count, applied to every path.

Measured: the 44.1 GiB datapoint (hence ``ACT_CALIBRATION``). Counted: weights,
live-tensor units, VAE caches. Measured on an H200: ``CUDA_CONTEXT_GIB``. Estimates: ``VAE_WORK``,
``FRAGMENTATION``, the fp8-eager and compiled units, text-encoder working memory.
The capped H100/H200 validation runs recalibrate these.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from wanrender import spec
from wanrender.spec import Sampling

log = logging.getLogger(__name__)

GIB = 1 << 30

# --- counted from the architecture (tests/test_planner.py re-counts them on the meta device)
EXPERT_LINEAR_PARAMS = 14_283_243_520
EXPERT_OTHER_PARAMS = 5_657_664
BLOCK_LINEAR_PARAMS = 351_272_960
BLOCK_OTHER_PARAMS = 121_344
NUM_BLOCKS = 40
TE_LINEAR_PARAMS = 4_630_511_616
TE_EMBEDDING_PARAMS = 1_050_398_720
VAE_PARAMS = 126_892_531

# --- measured (docs/benchmarks.md, 2026-11-21, H200) and what follows from it
MEASURED_PEAK_GIB = 44.1
MEASURED_UNITS = 26.0  # live bytes per token / D of the code measured then (RoPE of k, old apply_rope)
# (44.1 GiB - 33.13 GiB weights - 0.21 GB misc) / (26 * 5120 * 82,992 B) = 1.047
ACT_CALIBRATION = 1.047

# --- estimates (validated later on capped GPUs)
VAE_WORK = 4.5  # decode/encode working set, in units of one 4-frame full-resolution activation
TE_WORK_BYTES = 400 << 20  # UMT5 at <= 512 tokens: fp32 dequantised weight of the largest layer, twice
# Memory outside torch's allocator (CUDA context, cuBLAS/cuDNN/Triton kernel images):
# NVML used minus torch reserved while rendering measured 1.28-1.35 GiB on an H200
# in every sweep case (2026-11-22, docs/bench/h200-random); 0.75 GiB had been assumed.
CUDA_CONTEXT_GIB = 1.35
FRAGMENTATION = 0.03  # caching-allocator slack over the allocated peak
# Free but unusable holes the caching allocator holds while the DiT samples, in token
# activations ([L, D] bf16, divided by the chunk count). Measured on an H200 capped
# to 23.6 / 31.4 GiB (2026-11-22, docs/benchmarks.md): 2.24 GiB = 2.8 units at 81
# frames, 2.73 GiB = 1.8 units at 161 frames, both unchunked, when a plan sized to
# 3% slack ran out of memory with its predicted peak still 1.4 GiB away. 3 covers
# the worst case seen with a margin at 81 frames; at 161 frames it is generous
# (4.6 GiB kept for 2.7 seen), which costs a few resident blocks, not a failure.
HOLE_UNITS = 3.0
# PyTorch's allocator setting for our processes unless the user chose one. Without
# expandable segments, swapping experts left 1.57 GiB reserved in holes too small for
# a 138 MiB activation, and an emulated 32 GB card ran out of memory at 33 frames
# with its planned peak 2 GiB under the cap (docs/benchmarks.md, 2026-11-22).
# Expandable segments map memory in 2 MiB pages, so a hole costs at most a page.
ALLOC_CONF = "expandable_segments:True"
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def default_allocator_config(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to ``ALLOC_CONF`` unless the user set an allocator
    config; returns what was set (None: left alone). Only takes effect when called
    before the process first touches CUDA, so the CLI calls it first thing."""
    env = os.environ if environ is None else environ
    if any(v in env for v in ALLOC_CONF_VARS):
        return None
    env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    return ALLOC_CONF


ADAPTER_BYTES_STANDARD = 600_000_000  # one 4-step LoRA file (approx., fetch.STANDARD_SET)


@dataclass(frozen=True)
class Weights:
    """Bytes each component occupies on the GPU in the precision it will run in."""

    expert_top: int  # one expert outside its blocks (embeddings, time projection, head)
    block: int  # one block (the largest, if they differ)
    num_blocks: int
    text_encoder: int
    vae: int
    lora: int = 0  # run-time LoRA adapters of one expert (swap/stream keep LoRAs unmerged)
    source: str = ""

    @property
    def expert(self) -> int:
        return self.expert_top + self.block * self.num_blocks

    @staticmethod
    def standard(lora: bool = True) -> Weights:
        """The users' file set: fp8_scaled experts, fp8 UMT5, bf16 VAE (counted, not read)."""
        block = BLOCK_LINEAR_PARAMS + 2 * BLOCK_OTHER_PARAMS
        expert = EXPERT_LINEAR_PARAMS + 2 * EXPERT_OTHER_PARAMS
        return Weights(
            expert_top=expert - NUM_BLOCKS * block, block=block, num_blocks=NUM_BLOCKS,
            text_encoder=TE_LINEAR_PARAMS + 2 * TE_EMBEDDING_PARAMS, vae=2 * VAE_PARAMS,
            lora=ADAPTER_BYTES_STANDARD if lora else 0, source="standard fp8_scaled file set",
        )  # fmt: skip

    @staticmethod
    def from_files(files, precision: str = "fp8") -> Weights:
        """Sizes from the files' headers (nothing is read but the headers).

        ``precision`` fp8: Linear weights stored wider are quantised to 1 byte at load
        (kernels.linear.enable_fp8), except the layers spec.FP8_EXCLUDE keeps on bf16.
        """
        top_h, blocks_h = _dit_bytes(files.high, precision)
        top_l, blocks_l = _dit_bytes(files.low, precision)
        lora = max(_size(files.lora_high), _size(files.lora_low))
        return Weights(
            expert_top=max(top_h, top_l), block=max(blocks_h + blocks_l), num_blocks=max(len(blocks_h), 1),
            text_encoder=_tensor_bytes(files.text_encoder, skip=("spiece_model",)) or _size(files.text_encoder),
            vae=_vae_bytes(files.vae), lora=lora, source="model file headers",
        )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    frames: int = 81
    width: int = 832
    height: int = 1216
    sampling: Sampling = Sampling()

    @property
    def latent_frames(self) -> int:
        return spec.latent_frames(self.frames)

    @property
    def tokens(self) -> int:
        """L: DiT tokens per sample."""
        return spec.tokens(self.frames, self.width, self.height)

    @property
    def batch(self) -> int:
        return self.sampling.batch

    @property
    def steps(self) -> int:
        return self.sampling.steps

    @property
    def switch(self) -> int:
        return self.sampling.switch

    @property
    def cfg(self) -> float:
        return self.sampling.cfg

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def label(self) -> str:
        return f"{self.frames} frames at {self.width}x{self.height}"

    @staticmethod
    def of(req) -> Workload:
        """From a ``spec.RenderRequest`` (or anything with ``.render`` and ``.sampling``)."""
        r = req.render
        return Workload(r.frames, r.width, r.height, req.sampling)


@dataclass(frozen=True)
class DiTDims:
    dim: int = 5120
    ffn: int = 13824
    head_dim: int = 128


WAN_14B = DiTDims()
PATHS = ("eager", "fp8-eager", "compiled", "compiled-fp8")


def compute_path(precision: str, compile: str) -> str:
    """Which activation profile a (precision, compile) pair runs with."""
    if compile != "off":
        return "compiled-fp8" if precision == "fp8" else "compiled"
    return "fp8-eager" if precision == "fp8" else "eager"


def block_units(path: str, dims: DiTDims = WAN_14B) -> float:
    """Peak live bytes per token inside one block, for the unchunked path (table above)."""
    d, f = dims.dim, dims.ffn
    rope = 24 * d
    if path == "eager":
        return rope
    if path == "fp8-eager":
        return max(rope, 6 * d + 10 * f)
    if path in ("compiled", "compiled-fp8"):
        attention = 14 * d  # x, h, q, k, v, attention output
        return max(attention, 6 * d + 2 * f + (1 if path == "compiled-fp8" else 2) * f)
    raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")


def dit_activation_bytes(work: Workload, path: str, chunks: int = 1, dims: DiTDims = WAN_14B) -> int:
    """Peak activation bytes of one DiT forward (calibrated; see the module docstring)."""
    unchunked = block_units(path, dims)
    units = unchunked if chunks <= 1 else 8 * dims.dim + (unchunked - 4 * dims.dim) / chunks
    act = units * work.tokens * work.batch * ACT_CALIBRATION
    if path in ("eager", "compiled") and (chunks > 1 or path == "compiled"):
        # The bf16 paths dequantise each weight on use (two temporaries of the largest
        # layer); unchunked eager's worst moment (RoPE) comes after they are freed.
        act += 2 * dims.dim * dims.ffn * 2
    return int(act)


def allocator_holes(work: Workload, chunks: int = 1, dims: DiTDims = WAN_14B) -> int:
    """Room to leave for the allocator's holes during sampling (see ``HOLE_UNITS``)."""
    return int(HOLE_UNITS * work.tokens * work.batch * dims.dim * 2 / max(chunks, 1))


def misc_bytes(work: Workload, dims: DiTDims = WAN_14B) -> int:
    """RoPE table (cos, sin in fp32), latents and sampler state, text context: small next to the rest."""
    latent = 16 * work.latent_frames * (work.height // 8) * (work.width // 8) * 4
    rope = work.tokens * dims.head_dim // 2 * 8
    dit_input = latent * 36 // 16 * work.batch  # noise + mask + image latent, concatenated
    return rope + dit_input + 6 * latent * work.batch + 512 * 4096 * 4 * work.batch


# --- VAE ------------------------------------------------------------------------------

_BASE, _Z, _MULT, _RES = 96, 16, (1, 2, 4, 4), 2  # Wan 2.1 VAE


def vae_cache_bytes(decode: bool, pixels: int) -> int:
    """Bytes the causal cache holds: two past frames of each temporal-3 conv's input (bf16)."""
    levels = len(_MULT)
    if decode:
        dims = [_BASE * m for m in (_MULT[-1], *reversed(_MULT))]  # 384 384 384 192 96
        at = lambda lvl: pixels // 4 ** (levels - 1 - lvl)  # noqa: E731 - stage 0 is 1/8 scale
        convs = [(_Z, at(0))] + [(dims[0], at(0))] * 4  # conv1, middle (2 resblocks x 2 convs)
        for i in range(levels):
            cin = dims[i] // 2 if i > 0 else dims[i]
            for _ in range(_RES + 1):
                convs += [(cin, at(i)), (dims[i + 1], at(i))]
                cin = dims[i + 1]
            if i < 2:  # upsample3d's temporal conv (Wan 2.1: stages 0 and 1)
                convs.append((dims[i + 1], at(i)))
        convs.append((dims[-1], pixels))  # head
    else:
        dims = [_BASE * m for m in (1, *_MULT)]  # 96 96 192 384 384
        at = lambda lvl: pixels // 4**lvl  # noqa: E731
        convs = [(3, pixels)]
        for i in range(levels):
            cin = dims[i]
            for _ in range(_RES):
                convs += [(cin, at(i)), (dims[i + 1], at(i))]
                cin = dims[i + 1]
        convs += [(dims[-1], at(levels - 1))] * 5  # middle (4 convs) + head
    return sum(2 * c * p * 2 for c, p in convs)


def _vae_chunk_bytes(pixels: int) -> int:
    return 4 * _BASE * pixels * 2  # one 4-frame chunk at full resolution, 96 channels, bf16


def tile_factor(width: int, height: int, tile_px: int = 512, overlap_px: int = 128) -> tuple[float, float]:
    """(one tile's share of the frame, all tiles' pixels over the frame's) for decode_tiled."""

    def axis(n: int) -> tuple[int, int]:
        lat, tile, ov = n // 8, tile_px // 8, overlap_px // 8
        if lat <= tile:
            return lat, lat
        count = len(range(0, lat - tile, tile - ov)) + 1
        return tile, count * tile

    tw, sw = axis(width)
    th, sh = axis(height)
    frame = (width // 8) * (height // 8)
    return tw * th / frame, sw * sh / frame


def vae_decode_bytes(work: Workload, tiled: bool = False) -> int:
    out = work.frames * 3 * work.pixels * 4  # fp32 video
    share = tile_factor(work.width, work.height)[0] if tiled else 1.0
    px = int(work.pixels * share)
    running = vae_cache_bytes(True, px) + VAE_WORK * _vae_chunk_bytes(px) + (2 * out * share if tiled else 0)
    to_uint8 = 3 * out  # i2v.decode: clamp, +1, *127.5 temporaries beside the output
    return int(max(out + running, to_uint8))


def vae_encode_bytes(work: Workload) -> int:
    video = work.frames * 3 * work.pixels * 2  # the start image + gray frames, bf16
    return int(video + vae_cache_bytes(False, work.pixels) + VAE_WORK * _vae_chunk_bytes(work.pixels))


def device_bytes(allocated: int) -> int:
    """What the device must have free for an allocated peak: slack + context."""
    return int(allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB * GIB)


# --- reading sizes from files ------------------------------------------------------------

_BLOCK_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_AUX = ("scaled_fp8", "comfy_quant", "spiece_model")


def _open(path: Path | None):
    from wanrender.models.formats import find_weights
    from wanrender.models.safetensors_io import open_checkpoint

    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        w = find_weights(p)
        if w is None:
            return None
        p = w
    return open_checkpoint(p)


def _size(path: Path | None) -> int:
    if path is None or not Path(path).exists():
        return 0
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _kept_on_bf16(key: str) -> bool:
    """Whether fp8 loading leaves this Linear weight on bf16 (``spec.FP8_EXCLUDE``)."""
    from wanrender.models.dit import official_key_from_diffusers

    # The exclusion list speaks official names; a diffusers header is renamed first.
    name = official_key_from_diffusers(key) or key
    return any(k in name for k in spec.FP8_EXCLUDE)


def _dit_bytes(path: Path, precision: str) -> tuple[int, list[int]]:
    """(bytes outside the blocks, bytes of each block) of one expert as it will sit on the GPU."""
    import torch

    ck = _open(path)
    if ck is None:
        size = _size(path)
        return size // 60, [size * 59 // 60 // NUM_BLOCKS] * NUM_BLOCKS
    top, blocks = 0, {}
    for key in ck:
        if any(a in key for a in _AUX):
            continue
        dtype, shape = ck.dtype_of(key), tuple(ck.shape_of(key))
        size = _numel(shape) * dtype.itemsize
        wide_linear = (
            len(shape) == 2 and key.endswith(".weight") and dtype.itemsize > 1 and "embedding" not in key.split(".")[-2]
        )
        if precision == "fp8" and wide_linear and not _kept_on_bf16(key):
            size = _numel(shape) + shape[0] * 4  # fp8 weight + per-channel fp32 scale
        elif dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and len(shape) != 2:
            size = _numel(shape) * 2  # fp8 convs/norms are dequantised to bf16 at load
        m = _BLOCK_KEY.search(key)
        if m:
            blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + size
        else:
            top += size
    return top, [blocks[i] for i in sorted(blocks)]


def _tensor_bytes(path: Path | None, skip: tuple[str, ...] = ()) -> int:
    ck = _open(path)
    if ck is None:
        return 0
    return sum(_numel(ck.shape_of(k)) * ck.dtype_of(k).itemsize for k in ck if not any(s in k for s in skip))


def _vae_bytes(path: Path | None) -> int:
    ck = _open(path)
    if ck is None:
        return 2 * VAE_PARAMS
    return sum(2 * _numel(ck.shape_of(k)) for k in ck)  # bf16 on the GPU
