"""The time model: seconds per stage of a render on a given GPU.

Anchored on the H200 measurements of docs/benchmarks.md (81x832x1216, L0 = 82,992
tokens, batch 1), split by kernel class and scaled to other GPUs and shapes:

- attention (self + cross) ∝ FLOPs = blocks·(4·L²·D + 4·L·512·D)·batch, at the
  GPU's effective attention rate (H200: 574 TFLOP/s measured, 245.9 ms per call);
- GEMMs ∝ FLOPs = blocks·(L·(12·D² + 4·D·F) + 2048·D²)·batch at the datasheet
  dense rate times the efficiency measured on the H200 (bf16 782/989 = 0.791,
  fp8 1419/1979 = 0.717): 2.54 s bf16 / 1.40 s fp8 per forward at L0;
- elementwise work (fp32 residual, norms, RoPE, modulation) ∝ L / memory
  bandwidth: 2.90 s eager and 1.16 s compiled at L0 on the H200 (both measured by
  difference: 15.33 s bf16-eager and 12.45 s fp8-compiled forwards minus their
  attention and GEMM shares). fp8 eager adds the activation quantisation passes
  (estimate: 0.9 s at L0 on the H200).
- streaming: a streamed block costs max(0, transfer - compute) per block, where
  transfer = block bytes / min(pinned H2D, host memcpy) — prefetch overlaps the
  copy of block i+1 with the compute of block i; the first streamed block's copy
  overlaps the resident blocks. Expert installs (swap, stream's resident part) copy
  from pageable mmap memory (7.1 GB/s measured on the H200).
- text encode 0.12 s, VAE encode 2.44 s, VAE decode 3.77 s, MP4 encode 2.17 s
  (measured at 81x832x1216); VAE scales with frames·pixels and by the geometric
  mean of the TFLOP/s and bandwidth ratios (estimate); MP4 encode runs on the host.
"""

from __future__ import annotations

import math

from wanrender.runtime.gpus import GPUSpec
from wanrender.runtime.memory import WAN_14B, DiTDims, Workload, tile_factor

L0 = 82_992
H200_BF16, H200_BW = 989.0, 4800.0
# measured (docs/benchmarks.md, H200)
GEMM_EFF_BF16 = 782.0 / 989.0
GEMM_EFF_FP8 = 1419.0 / 1979.0
# by difference: forward minus attention (self + cross, 9.89 s) minus GEMMs (2.54 s bf16, 1.40 s fp8)
EW_SECONDS_L0 = {"eager": 2.903, "fp8-eager": 2.903, "compiled": 1.163, "compiled-fp8": 1.163}
TEXT_ENCODE_S, VAE_ENCODE_S, VAE_DECODE_S, VIDEO_ENCODE_S = 0.12, 2.44, 3.77, 2.17
PAGEABLE_GBS = 7.1
REF_FRAMES_PIXELS = 81 * 832 * 1216
# estimates
FP8_QUANT_SECONDS_L0 = 0.9
HOST_COPY_GBS = 10.0  # memcpy from the page cache into pinned staging
DISK_GBS = 2.0  # re-reading weights the host cannot keep in RAM
TE_CPU_S = 10.0  # UMT5-XXL on the host CPU, one prompt (fp32, dequantised on use)
BLOCK_OVERHEAD_S = 0.0005  # per streamed block: events, re-binding parameters
CHUNK_PENALTY = 0.004  # per extra sequence chunk, fraction of the step
LORA_UNMERGED_PENALTY = 0.03  # run-time LoRA adapters, fraction of the GEMM time


TEXT_TOKENS = 512  # the text context every block cross-attends to


# FLOPs are multiply-adds x 2, counted once here for the time model and the benchmarks' TFLOP/s.
def self_attention_flops(tokens: int, dims: DiTDims = WAN_14B) -> float:
    """One self-attention call over all heads: Q·K^T and P·V, 4·L²·D."""
    return 4.0 * tokens * tokens * dims.dim


def attention_flops(work: Workload, dims: DiTDims = WAN_14B, blocks: int = 40) -> float:
    """Self- and cross-attention of one forward."""
    L = work.tokens
    return blocks * (self_attention_flops(L, dims) + 4.0 * L * TEXT_TOKENS * dims.dim) * work.batch


def gemm_flops(work: Workload, dims: DiTDims = WAN_14B, blocks: int = 40) -> float:
    """The linear layers of one forward: self-attention q, k, v, o and cross-attention q, o
    on the tokens (12·D²), the FFN (4·D·F), cross-attention k, v on the text (4·512·D²)."""
    d, f = dims.dim, dims.ffn
    return blocks * (work.tokens * (12.0 * d * d + 4.0 * d * f) + 4.0 * TEXT_TOKENS * d * d) * work.batch


def forward_flops(work: Workload, dims: DiTDims = WAN_14B, blocks: int = 40) -> float:
    """One DiT forward (one sampling step)."""
    return gemm_flops(work, dims, blocks) + attention_flops(work, dims, blocks)


def dit_step_seconds(
    gpu: GPUSpec, work: Workload, path: str, chunks: int = 1, lora_unmerged: bool = False
) -> dict[str, float]:
    """One DiT forward (= one sampling step), split into its parts."""
    fp8 = path in ("fp8-eager", "compiled-fp8")
    gemm_rate = (gpu.fp8_tflops * GEMM_EFF_FP8) if fp8 and gpu.fp8_tflops else gpu.bf16_tflops * GEMM_EFF_BF16
    scale_l = work.tokens * work.batch / L0
    bw = H200_BW / gpu.mem_bw_gbs
    parts = {
        "attention": attention_flops(work) / (gpu.attention_tflops * 1e12),
        "gemm": gemm_flops(work) / (gemm_rate * 1e12) * (1 + (LORA_UNMERGED_PENALTY if lora_unmerged else 0)),
        "elementwise": EW_SECONDS_L0[path] * scale_l * bw
        + (FP8_QUANT_SECONDS_L0 * scale_l * bw if path == "fp8-eager" else 0),
    }
    parts["total"] = sum(parts.values()) * (1 + CHUNK_PENALTY * max(0, chunks - 1))
    return parts


def stream_overhead(step_s: float, block_bytes: int, streamed: int, resident: int, gbs: float) -> float:
    """Extra seconds per step from streaming ``streamed`` blocks at ``gbs`` GB/s."""
    if streamed <= 0:
        return 0.0
    blocks = streamed + resident
    compute = step_s / blocks
    transfer = block_bytes / (gbs * 1e9)
    exposed_first = max(0.0, transfer - resident * compute)  # hidden behind the resident blocks if any
    return streamed * (max(0.0, transfer - compute) + BLOCK_OVERHEAD_S) + exposed_first


def vae_scale(gpu: GPUSpec) -> float:
    return math.sqrt((H200_BF16 / gpu.bf16_tflops) * (H200_BW / gpu.mem_bw_gbs))


def vae_seconds(gpu: GPUSpec, work: Workload, decode: bool, tiled: bool = False) -> float:
    base = VAE_DECODE_S if decode else VAE_ENCODE_S
    t = base * work.frames * work.pixels / REF_FRAMES_PIXELS * vae_scale(gpu)
    return t * (tile_factor(work.width, work.height)[1] if tiled else 1.0)


def text_encode_seconds(gpu: GPUSpec, placement: str, te_bytes: int) -> float:
    if placement == "cpu":
        return TE_CPU_S
    t = TEXT_ENCODE_S * H200_BF16 / gpu.bf16_tflops
    return t + (te_bytes / (PAGEABLE_GBS * 1e9) if placement == "release" else 0.0)


def video_encode_seconds(work: Workload) -> float:
    return VIDEO_ENCODE_S * work.frames * work.pixels / REF_FRAMES_PIXELS
