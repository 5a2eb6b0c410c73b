"""SageAttention-style 8-bit attention for the DiT's self-attention (Triton, Hopper).

``sage8_attention(q, k, v)`` takes and returns ``[B, L, H, D]`` tensors (bf16/fp16,
views allowed), non-causal, no mask, softmax scale ``1/sqrt(D)``, like
``wanrender.models.dit.sdpa_attention``.

The math (the SageAttention recipe):

1. Smooth K: subtract its mean over the sequence, per (batch, head, channel). Each
   row of Q·K^T moves by a constant, which softmax ignores; the channel means (often
   large next to the spread) no longer eat the quantisation range.
2. Quantise Q per block of ``block_m`` rows and K per block of ``block_n`` rows with
   one scale per block (absmax / 448 for fp8 e4m3, absmax / 127 for int8). The
   softmax scale and log2(e) are folded into Q's scale, so the dequantised score is
   already in the exp2 domain.
3. Quantise V per channel (absmax over the sequence / 448) to fp8 e4m3, stored
   transposed ``[D, L]``: Hopper's fp8 tensor-core instructions want both operands
   K-major, and the reduction dimension of P·V is the sequence.
4. Main loop over key blocks: S = (Q8·K8^T) * (q_scale * k_scale) with fp32
   accumulation; exact online softmax in fp32 with exp2; P is produced directly as
   ``exp2(S - m + 8)`` (that is, P * 256, in [0, 256]) and cast to fp8 e4m3; P8·V8
   accumulates in fp32. The row sum uses the unquantised fp32 P. The epilogue
   multiplies by the V channel scales and divides by the row sum.

``sage8_reference`` runs the same quantised math in plain PyTorch (CPU or GPU), key
block by key block, so quantisation error can be measured without Triton. The fp32
values it compares against come from ``exact_attention``.

Everything Triton-related is imported inside functions: importing this module needs
only torch.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

FP8_MAX = 448.0
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
# P is produced as exp2(s - m + P_LOG2_SCALE) = p * 256 <= 256 < 448: inside fp8 e4m3's
# range with margin, and a power of two so the scaling itself is exact.
P_LOG2_SCALE = 8.0
SUPPORTED_HEAD_DIMS = (64, 128)

# Defaults of the Triton path (also the reference's defaults, so both quantise alike).
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 128


# --------------------------------------------------------------------------------------
# Capability check
# --------------------------------------------------------------------------------------


def can_run(
    q: torch.Tensor | None = None,
    *,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[str]:
    """Reasons the Triton kernel cannot run here; an empty list means it can.

    Pass a sample tensor ``q`` ([B, L, H, D]) or ``head_dim``/``dtype``/``device``
    to include the input checks.
    """
    reasons: list[str] = []
    if q is not None:
        head_dim = q.shape[-1] if head_dim is None else head_dim
        dtype = q.dtype if dtype is None else dtype
        device = q.device if device is None else device
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim {head_dim} not supported (only {SUPPORTED_HEAD_DIMS})")
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"dtype {dtype} not supported (bf16 or fp16 only)")
    if device is not None and torch.device(device).type != "cuda":
        reasons.append(f"tensors are on {torch.device(device).type}, not a CUDA device")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device available")
    else:
        idx = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        major, minor = torch.cuda.get_device_capability(idx)
        if (major, minor) < (8, 9):
            reasons.append(f"compute capability {major}.{minor} < 8.9 (no fp8 tensor cores)")
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton is not installed")
    return reasons


# --------------------------------------------------------------------------------------
# Exact reference and realistic test inputs
# --------------------------------------------------------------------------------------


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rows: torch.Tensor | None = None, chunk: int = 1024
) -> torch.Tensor:
    """fp32 softmax attention, [B, L, H, D] in, fp32 [B, R, H, D] out.

    ``rows`` (a 1-D index tensor) restricts the computation to those query rows (to
    keep the cost sane at long sequence lengths); the keys and values stay complete.
    Processed in chunks of query rows, one (batch, head) at a time.
    """
    b, lq, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    if rows is not None:
        q = q[:, rows.to(q.device)]
        lq = q.shape[1]
    out = torch.empty(b, lq, h, d, dtype=torch.float32, device=q.device)
    for bi in range(b):
        for hi in range(h):
            kf = k[bi, :, hi].float()
            vf = v[bi, :, hi].float()
            for s in range(0, lq, chunk):
                qf = q[bi, s : s + chunk, hi].float()
                att = torch.softmax((qf @ kf.T) * scale, dim=-1)
                out[bi, s : s + chunk, hi] = att @ vf
    return out


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/inf anywhere gives inf."""
    o = out.double()
    r = ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm())


def make_realistic_qkv(
    b: int,
    length: int,
    h: int,
    d: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    v_mean: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V with the statistics that trouble 8-bit attention, [B, L, H, D].

    - per-channel gains (log-normal) with a few outlier channels per head, shared by Q
      and K (so the outliers dominate the logits, as in trained DiTs);
    - a large non-zero per-channel mean on K (a smaller one on Q);
    - a low-rank component shared between tokens, so that attention is peaked on
      similar tokens instead of uniform; logits end with a std of about 2-3;
    - a RoPE-like rotation of channel pairs by token position;
    - V standard-normal-ish (per-channel gains, mean ``v_mean`` times the gain).
    Drawn on ``device`` with a seeded generator, so the GPU can make long sequences.
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32)

    gain = torch.exp(0.35 * randn(h, d))
    n_out = max(2, d // 32)
    for hi in range(h):
        idx = torch.randperm(d, generator=g, device=dev)[:n_out]
        gain[hi, idx] *= 4.0
    k_mean = 1.5 * randn(h, d) * gain
    q_mean = 0.3 * randn(h, d) * gain
    rank = 16
    basis = randn(h, rank, d) / math.sqrt(rank)

    out = []
    for which in ("q", "k"):
        coeff = randn(b, length, h, rank)
        shared = torch.einsum("blhr,hrd->blhd", coeff, basis)
        x = 0.7 * randn(b, length, h, d) + 1.0 * shared
        x = x * gain + (q_mean if which == "q" else k_mean)
        out.append(x)
    # Same shared coefficients for Q and K would make every token attend to itself;
    # correlate them partially instead, through a common token-cluster signal.
    cluster = torch.einsum("blhr,hrd->blhd", randn(b, length, h, rank), basis) * gain
    out[0] = out[0] + 0.8 * cluster
    out[1] = out[1] + 0.8 * cluster
    q, k = out
    # RoPE-like rotation of channel pairs with geometric frequencies.
    half = d // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(half, device=dev, dtype=torch.float32) / half))
    pos = torch.arange(length, device=dev, dtype=torch.float32)
    ang = pos[:, None] * freqs[None, :]
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        y = torch.empty_like(x)
        y[..., 0::2] = x1 * cos - x2 * sin
        y[..., 1::2] = x1 * sin + x2 * cos
        return y

    q, k = rope(q), rope(k)
    # Normalise the logit spread: RMS-normalise tokens like the DiT's qk-norm, then pick
    # the scale so that std(q.k)/sqrt(d) is about 2.5 on a probe.
    q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
    k = k / k.pow(2).mean(-1, keepdim=True).sqrt()
    probe = min(length, 512)
    s = torch.einsum("bqhd,bkhd->bhqk", q[:, :probe], k[:, :probe]) / math.sqrt(d)
    s = s - s.mean(-1, keepdim=True)
    factor = math.sqrt(2.5 / max(float(s.std()), 1e-6))
    q, k = q * factor, k * factor
    v_gain = torch.exp(0.25 * randn(h, d))
    v = (randn(b, length, h, d) + v_mean * randn(h, d)) * v_gain
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------------------
# Plain-PyTorch quantised reference
# --------------------------------------------------------------------------------------


def _quant_blocks(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation along dim 0 of a [L, D] fp32 tensor.

    Returns (dequantisable values as fp32 holding exact 8-bit codes, scales [nblk]).
    """
    length, d = x.shape
    nblk = -(-length // block)
    pad = nblk * block - length
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(nblk, block, d)
    amax = xp.abs().amax(dim=(1, 2)).clamp_min(1e-12)
    if fmt == "fp8":
        scale = amax / FP8_MAX
        codes = (xp / scale[:, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    elif fmt == "int8":
        scale = amax / INT8_MAX
        codes = torch.round(xp / scale[:, None, None]).clamp(-INT8_MAX, INT8_MAX)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return codes.view(nblk * block, d)[:length], scale


def sage8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qk_format: str = "fp8",
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    smooth_k: bool = True,
    quant_pv: bool = True,
) -> torch.Tensor:
    """The kernel's quantised math in plain PyTorch; [B, L, H, D] in and out.

    Same smoothing, block quantisation (``qk_format`` 'fp8' or 'int8'), block-wise
    online softmax (P quantised against the running max, as the kernel does) and fp8
    P·V as the Triton kernel, up to fp32 summation order. ``quant_pv=False`` keeps P
    and V in fp32 (to separate the error sources). Runs on any device.
    """
    b, length, h, d = q.shape
    lk = k.shape[1]
    qk_scale = LOG2E / math.sqrt(d)
    out = torch.empty(b, length, h, d, dtype=torch.float32, device=q.device)
    for bi in range(b):
        for hi in range(h):
            qf = q[bi, :, hi].float()
            kf = k[bi, :, hi].float()
            vf = v[bi, :, hi].float()
            if smooth_k:
                kf = kf - kf.mean(dim=0, keepdim=True)
            q8, qs = _quant_blocks(qf, block_m, qk_format)
            k8, ks = _quant_blocks(kf, block_n, qk_format)
            qs_rows = qs.repeat_interleave(block_m)[:length] * qk_scale
            if quant_pv:
                vs = (vf.abs().amax(dim=0) / FP8_MAX).clamp_min(1e-12)
                v8 = (vf / vs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
            else:
                vs = torch.ones(d, device=q.device)
                v8 = vf
            m = torch.full((length,), -math.inf, device=q.device)
            lsum = torch.zeros(length, device=q.device)
            acc = torch.zeros(length, d, device=q.device)
            for j, s0 in enumerate(range(0, lk, block_n)):
                kb = k8[s0 : s0 + block_n]
                s = (q8 @ kb.T) * (qs_rows[:, None] * ks[j])
                m_new = torch.maximum(m, s.amax(dim=1))
                alpha = torch.exp2(m - m_new)
                p = torch.exp2(s - (m_new - P_LOG2_SCALE)[:, None])
                lsum = lsum * alpha + p.sum(dim=1)
                if quant_pv:
                    p = p.to(torch.float8_e4m3fn).float()
                acc = acc * alpha[:, None] + p @ v8[s0 : s0 + block_n]
                m = m_new
            out[bi, :, hi] = acc * vs[None, :] / lsum[:, None]
    return out.to(q.dtype)
