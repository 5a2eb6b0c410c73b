"""The 8-bit attention's math in plain PyTorch: constants, the exact fp32 reference,
realistic test inputs and ``sage8_reference``, the kernel's quantised computation key
block by key block (any device, no Triton).

Split from ``attention_sage8`` (the Triton kernels and their launcher) so each stays
readable; that module re-exports these names.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
# P is produced as exp2(s - m + P_LOG2_SCALE) = p * 256 <= 256 < 448: inside fp8 e4m3's
# range with margin, and a power of two so the scaling itself is exact.
P_LOG2_SCALE = 8.0
SUPPORTED_HEAD_DIMS = (64, 128)

# Defaults of the Triton path (also the reference's defaults, so both quantise alike).
DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 128

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
    logit_std: float = 2.5,
    k_outliers: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V with the statistics that trouble 8-bit attention, [B, L, H, D].

    - per-channel gains (log-normal) with a few 4x outlier channels per head, shared
      by Q and K (so the outliers carry a good part of the logits);
    - a low-rank token-cluster component shared by Q and K, so that attention is
      peaked on related tokens instead of uniform, and a RoPE-like rotation of channel
      pairs by token position;
    - after RoPE, a per-channel mean on K of twice its spread (the channel bias that
      K smoothing removes) and a smaller one on Q;
    - ``k_outliers``: an extra gain on K's first ``max(2, D // 32)`` channels that Q
      does not share (1: none; 8 makes the case the channel equaliser is for);
    - logits scaled so that their row-centred std is about ``logit_std``;
    - V: standard normal with per-channel gains plus a per-channel mean of
      ``v_mean`` standard deviations (0: i.i.d. zero-mean V, the hardest case for fp8
      V; a trained DiT's V has channel biases and correlated tokens).
    Drawn on ``device`` with a seeded generator, so the GPU can make long sequences.
    The one generator of attention test inputs (tests, ``bench dit``, benchmarks).
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
    rank = 16
    basis = randn(h, rank, d) / math.sqrt(rank)
    cluster = torch.einsum("blhr,hrd->blhd", randn(b, length, h, rank), basis)
    half = d // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(half, device=dev, dtype=torch.float32) / half))
    ang = torch.arange(length, device=dev, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]

    def make(mean_sd: float) -> torch.Tensor:
        own = torch.einsum("blhr,hrd->blhd", randn(b, length, h, rank), basis)
        x = (0.6 * randn(b, length, h, d) + 0.8 * own + 0.8 * cluster) * gain
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # qk-norm (RMS) before RoPE
        x1, x2 = x[..., 0::2], x[..., 1::2]
        y = torch.empty_like(x)
        y[..., 0::2] = x1 * cos - x2 * sin
        y[..., 1::2] = x1 * sin + x2 * cos
        spread = y.std(dim=1, keepdim=True, correction=0).clamp_min(0.1)  # per (batch, head, channel)
        return y + mean_sd * spread * randn(1, 1, h, d).abs().clamp(0.5, 2.0) * torch.sign(randn(1, 1, h, d))

    q, k = make(0.3), make(2.0)
    k[..., :n_out] *= k_outliers
    probe = min(length, 512)
    s = torch.einsum("bqhd,bkhd->bhqk", q[:, :probe], k[:, :probe]) / math.sqrt(d)
    s = s - s.mean(-1, keepdim=True)
    spread = float(s.std(correction=0))
    factor = math.sqrt(logit_std / spread) if spread > 1e-3 else 1.0
    q, k = q * factor, k * factor
    v_gain = torch.exp(0.25 * randn(h, d))
    v = (randn(b, length, h, d) + v_mean * randn(h, d)) * v_gain
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------------------
# Plain-PyTorch quantised reference
# --------------------------------------------------------------------------------------


def _equalizer(q_amax: torch.Tensor, k_amax: torch.Tensor) -> torch.Tensor:
    """Per-channel factors a with Q·K^T = (Q a)(K / a)^T that balance the ranges.

    a_c = sqrt(max|k_c| / max|q_c|) (over the sequence) gives channel c the same range
    in Q·a and K/a, so an outlier channel of K (or of Q) no longer sets the int8 step
    of every other channel alone; the product is unchanged.
    """
    ratio = k_amax.float().clamp_min(1e-6) / q_amax.float().clamp_min(1e-6)
    return ratio.sqrt().clamp(1.0 / 256, 256.0)


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    # The kernels round to int8 this way too (add +-0.5, truncate).
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def _quant_blocks(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation along dim 0 of a [L, D] fp32 tensor.

    ``block`` rows share one scale (``block=1``: one scale per row). Returns the 8-bit
    codes held exactly in fp32 [L, D] and the per-row scales [L] (codes * scale
    dequantises).
    """
    length, d = x.shape
    nblk = -(-length // block)
    pad = nblk * block - length
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(nblk, block, d)
    amax = xp.abs().amax(dim=(1, 2)).clamp_min(1e-12)
    qmax = FP8_MAX if fmt == "fp8" else INT8_MAX
    y = xp * (qmax / amax)[:, None, None]
    if fmt == "fp8":
        codes = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    elif fmt == "int8":
        codes = _round_half_away(y).clamp(-INT8_MAX, INT8_MAX)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    scale = (amax / qmax).repeat_interleave(block)[:length]
    return codes.view(nblk * block, d)[:length], scale


def sage8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qk_format: str = "int8",
    q_block: int = 1,
    k_block: int = DEFAULT_BLOCK_N,
    block_n: int = DEFAULT_BLOCK_N,
    smooth_k: bool = True,
    equalize: bool = True,
    pv_fp8: bool = True,
) -> torch.Tensor:
    """The kernel's quantised math in plain PyTorch; [B, L, H, D] in and out.

    Same smoothing, quantisation (``qk_format`` 'int8' or 'fp8'; ``q_block`` /
    ``k_block`` rows per scale, 1 = per token), key-block-wise online softmax with
    ``block_n`` keys per step (P is quantised against the running max, as in the
    kernel) and fp8 P·V (``pv_fp8=False`` keeps P and V unquantised, like the
    kernel's 16-bit P·V variant) as ``sage8_attention`` with the same options, up to
    fp32 summation order. ``equalize`` balances the channel ranges of Q and smoothed
    K (see ``_equalizer``). Runs on any device; cost O(L^2 D) per head, so keep L modest
    on a CPU.
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
            if equalize:
                alpha = _equalizer(qf.abs().amax(dim=0), kf.abs().amax(dim=0))
                qf, kf = qf * alpha, kf / alpha
            q8, qs = _quant_blocks(qf, q_block, qk_format)
            k8, ks = _quant_blocks(kf, k_block, qk_format)
            qs = qs * qk_scale
            if pv_fp8:
                vmax = vf.abs().amax(dim=0).clamp_min(1e-12)
                vs = vmax / FP8_MAX
                v8 = (vf * (FP8_MAX / vmax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
            else:
                vs = torch.ones(d, device=q.device)
                v8 = vf.to(v.dtype).float()
            m = torch.full((length,), -math.inf, device=q.device)
            lsum = torch.zeros(length, device=q.device)
            acc = torch.zeros(length, d, device=q.device)
            for s0 in range(0, lk, block_n):
                kb = k8[s0 : s0 + block_n]
                s = (q8 @ kb.T) * qs[:, None] * ks[None, s0 : s0 + block_n]
                m_new = torch.maximum(m, s.amax(dim=1))
                alpha = torch.exp2(m - m_new)
                p = torch.exp2(s - (m_new - P_LOG2_SCALE)[:, None])
                lsum = lsum * alpha + p.sum(dim=1)
                p = p.to(torch.float8_e4m3fn).float() if pv_fp8 else p.to(v.dtype).float()
                acc = acc * alpha[:, None] + p @ v8[s0 : s0 + block_n]
                m = m_new
            out[bi, :, hi] = acc * vs[None, :] / lsum[:, None]
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------
# Triton kernels (built on first use)
