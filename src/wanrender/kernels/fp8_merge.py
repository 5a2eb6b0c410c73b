"""A LoRA merged into an fp8 weight in two passes on the GPU, bit for bit what
``models.common.quantize_fp8`` gives (its stochastic rounding, its counter hash).

``quantize_fp8(w8 * s + delta, seed=...)`` in plain PyTorch runs about forty
elementwise kernels per element (an int64 hash, the neighbours of the rounded value,
the choice), each a full pass over the tensor: about 350 bytes of memory traffic per
weight, and 14 G weights per expert. Measured on an H200, the merges took 2.5 s per
expert on the load's critical path. Here one pass finds the new absmax and one writes
the fp8 bytes (about 11 bytes per weight together).

To be exact on every device the kernel leaves fp8 conversions alone: the two fp8
neighbours of a value come from its fp32 bits (the mantissa cut to 3 bits; below
2^-6, multiples of 2^-9), and the fp8 byte is assembled from the chosen value's
exponent and mantissa. ``merge_reference`` is the same arithmetic in PyTorch, tested
against ``quantize_fp8`` on the CPU; the kernel is tested against both on a GPU, and
checks a sample of its first tensor on each load (``Fp8Merge``).
"""

from __future__ import annotations

import functools
import logging

import torch

from wanrender.models.common import quantize_fp8, stochastic_round, uniform_hash

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
MAX = 448.0  # e4m3fn's largest finite value
MIN_NORMAL = 2.0**-6
TINY = 2.0**-126  # above 0, below every nonzero uniform number (multiples of 2^-24)
SUB_STEP = 2.0**-9
MASK32 = 0xFFFFFFFF
HASH_KEY = 0x9E3779B1
HASH_MULS = (0x7FEB352D, 0x846CA68B)
BLOCK = 4096
CHECK_ELEMENTS = 1 << 20  # the first tensor's leading elements, against quantize_fp8's rounding


def hash_key(seed: int) -> int:
    """The low 32 bits of ``seed * 0x9E3779B1``: all of the seed that survives
    ``uniform_hash``'s mask."""
    return (seed * HASH_KEY) & MASK32


# ------------------------------------------------------------------ the arithmetic, in PyTorch


def floor_neighbours(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``a`` in [0, 448] (fp32): the largest e4m3fn value <= a and the next one up
    (448 stays 448), both as fp32."""
    bits = a.view(torch.int32)
    normal = a >= MIN_NORMAL
    lo = torch.where(normal, (bits & ~0xFFFFF).view(torch.float32), torch.floor(a * 512.0) * SUB_STEP)
    # One step of e4m3 at lo's exponent: 2^(exponent - 3).
    step = torch.where(
        normal, ((bits >> 23) - 3).bitwise_left_shift(23).view(torch.float32), torch.full_like(a, SUB_STEP)
    )
    return lo, torch.clamp(lo + step, max=MAX)


def encode_e4m3(mag: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The e4m3fn byte of ``mag`` (>= 0, exactly representable), sign bit from ``negative``."""
    bits = mag.view(torch.int32)
    normal = mag >= MIN_NORMAL
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    byte = torch.where(normal, (exp << 3) | ((bits >> 20) & 7), (mag * 512.0).to(torch.int32))
    return (byte | (negative.to(torch.int32) << 7)).to(torch.uint8)


def round_bytes(x: torch.Tensor, scale: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded stochastically to e4m3fn (uniform numbers ``r``), as bytes."""
    v = (x / scale).clamp(-MAX, MAX)
    a = v.abs()
    lo, hi = floor_neighbours(a)
    gap = hi - lo
    p_hi = torch.where(gap > 0, (a - lo) / gap.clamp(min=1e-30), torch.zeros_like(a))
    # A quotient below 2^-126 may come back as zero from a GPU division that flushes
    # subnormals: x is not zero, so it rounds up (to 2^-9) only when r is 0, as the
    # unflushed quotient would, and keeps x's sign.
    flushed = (a == 0) & (x != 0)
    p_hi = torch.where(flushed, torch.full_like(a, TINY), p_hi)
    return encode_e4m3(torch.where(r < p_hi, hi, lo), (v < 0) | (flushed & (x < 0)))


def merged_weight(w8: torch.Tensor, scale: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``w8 * scale + delta`` in fp32, as ``Linear.dequantized_weight(float32) + delta``."""
    return w8.float() * (scale.float() if scale is not None else 1.0) + delta


def new_scale_of(x: torch.Tensor) -> torch.Tensor:
    """quantize_fp8's per-tensor scale of ``x``."""
    return (x.abs().amax().float().clamp(min=1e-12) / MAX).to(torch.float32)


def merge_reference(w8: torch.Tensor, scale: torch.Tensor | None, delta: torch.Tensor,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel's arithmetic in PyTorch: ``(w8 * scale + delta)`` requantised per
    tensor with stochastic rounding; returns (fp8 weight, fp32 0-d scale)."""
    x = merged_weight(w8, scale, delta)
    new_scale = new_scale_of(x)
    r = uniform_hash(seed, 0, x.numel(), x.device).view(x.shape)
    return round_bytes(x, new_scale, r).view(FP8), new_scale


# ------------------------------------------------------------------ the kernels


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def merged(w_ptr, d_ptr, s_ptr, offs, mask):
        # The old fp8 byte decoded from its bits, times its scale, plus the delta (two
        # roundings, as in PyTorch: launched with fp fusion off, so no FMA).
        b = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        normal = ((e - 7 + 127) << 23 | (m << 20)).to(tl.float32, bitcast=True)
        value = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        nan = tl.full((), 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        value = tl.where((b & 0x7F) == 0x7F, nan, value)
        value = tl.where((b >> 7) == 1, -value, value)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0)
        return value * tl.load(s_ptr) + d

    globals()["_fp8_merged"] = merged  # Triton resolves a called @jit function in the module's globals

    @triton.jit
    def amax_kernel(w_ptr, d_ptr, s_ptr, part_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = _fp8_merged(w_ptr, d_ptr, s_ptr, offs, mask)
        # NaN counts as infinite (max would skip it): the scale is then not finite, and
        # merge_fp8 hands the tensor to quantize_fp8, whose NaNs stay NaNs.
        inf = tl.full((), 0x7F800000, tl.int32).to(tl.float32, bitcast=True)
        xa = tl.where(x != x, inf, tl.abs(x))
        tl.store(part_ptr + pid, tl.max(tl.where(mask, xa, 0.0), axis=0))

    @triton.jit(do_not_specialize=["key"])  # a key of 1 would otherwise become a constant
    def round_kernel(w_ptr, d_ptr, s_ptr, scale_ptr, out_ptr, n, key, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = _fp8_merged(w_ptr, d_ptr, s_ptr, offs, mask)
        v = tl.math.div_rn(x, tl.load(scale_ptr))  # IEEE division, as PyTorch's
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        a = tl.abs(v)
        # uniform_hash: two rounds of multiply-xorshift of (index ^ key), 32 bits.
        # (a key >= 2^31 arrives as int64: cut to 32 bits, or the products would not wrap)
        h = offs.to(tl.uint32) ^ key.to(tl.uint32)
        h = h ^ (h >> 16)
        h = h * tl.full((), 0x7FEB352D, tl.uint32)
        h = h ^ (h >> 16)
        h = h * tl.full((), 0x846CA68B, tl.uint32)
        h = h ^ (h >> 16)
        r = (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
        # floor_neighbours
        bits = a.to(tl.int32, bitcast=True)
        is_normal = a >= 0.015625
        lo = tl.where(is_normal, (bits & ~0xFFFFF).to(tl.float32, bitcast=True), tl.floor(a * 512.0) * 0.001953125)
        step = tl.where(is_normal, (((bits >> 23) - 3) << 23).to(tl.float32, bitcast=True), 0.001953125)
        hi = tl.minimum(lo + step, 448.0)
        gap = hi - lo
        p_hi = tl.where(gap > 0, tl.math.div_rn(a - lo, tl.maximum(gap, 1e-30)), 0.0)
        # as round_bytes: a quotient flushed to zero by the division
        flushed = (a == 0) & (x != 0)
        p_hi = tl.where(flushed, 1.1754943508222875e-38, p_hi)  # 2^-126
        mag = tl.where(r < p_hi, hi, lo)
        # encode_e4m3
        mb = mag.to(tl.int32, bitcast=True)
        byte = tl.where(mag >= 0.015625, ((((mb >> 23) & 0xFF) - 120) << 3) | ((mb >> 20) & 7),
                        (mag * 512.0).to(tl.int32))  # fmt: skip
        byte = byte | (((v < 0) | (flushed & (x < 0))).to(tl.int32) << 7)
        tl.store(out_ptr + offs, byte.to(tl.uint8), mask=mask)

    return amax_kernel, round_kernel


def merge_fp8(w8: torch.Tensor, scale: torch.Tensor | None, delta: torch.Tensor,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`merge_reference` on the GPU (w8 e4m3fn, delta fp32, on one CUDA device)."""
    amax_kernel, round_kernel = _kernels()
    n = w8.numel()
    w = w8.contiguous().view(torch.uint8).view(-1)
    d = delta.to(torch.float32).contiguous().view(-1)
    s = (scale.float() if scale is not None else torch.ones((), device=w8.device)).reshape(1).contiguous()
    blocks = (n + BLOCK - 1) // BLOCK
    parts = torch.empty(blocks, dtype=torch.float32, device=w8.device)
    amax_kernel[(blocks,)](w, d, s, parts, n, BLOCK=BLOCK, enable_fp_fusion=False)
    new_scale = (parts.amax().clamp(min=1e-12) / MAX).to(torch.float32)
    if not bool(torch.isfinite(new_scale)):
        raise NotFinite("NaN or infinity in the merged weight")
    out = torch.empty(n, dtype=torch.uint8, device=w8.device)
    round_kernel[(blocks,)](w, d, s, new_scale.reshape(1), out, n, hash_key(seed), BLOCK=BLOCK,
                            enable_fp_fusion=False)  # fmt: skip
    return out.view(FP8).view(w8.shape), new_scale


class NotFinite(ValueError):
    """The merged weight holds NaN or infinity: quantize_fp8 merges it (its result is the
    reference's, NaNs included); the kernels stay in use for the other tensors."""


class Fp8Merge:
    """The merge ``models.lora.apply_lora`` calls for fp8 Linear weights on a CUDA GPU.
    Its first tensor is also rounded by ``quantize_fp8`` (the scale over the whole
    tensor, the bytes over its first million weights); any difference, or a kernel that
    fails to build, sends this and every later tensor to ``quantize_fp8``, with a warning.
    Weights with per-channel scales go there too (the kernel reads one scale)."""

    def __init__(self) -> None:
        self.checked = False
        self.broken: str | None = None

    def __call__(self, w8: torch.Tensor, scale: torch.Tensor | None, delta: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if self.broken is None and (scale is None or scale.numel() == 1):  # per-tensor scales only
            try:
                q, s = merge_fp8(w8, scale, delta, seed)
                if not self.checked:
                    self._check(w8, scale, delta, seed, q, s)
                    self.checked = True
                if self.broken is None:
                    return q, s
            except NotFinite:
                pass
            except Exception as e:  # noqa: BLE001 - a kernel that cannot build or run: the plain path
                self.broken = f"{type(e).__name__}: {e}"
                log.warning("fused fp8 LoRA merge unavailable (%s): merging in plain PyTorch", self.broken)
        return quantize_fp8(merged_weight(w8, scale, delta), w8.dtype, seed=seed)

    def _check(self, w8, scale, delta, seed, q, s) -> None:
        x = merged_weight(w8, scale, delta)
        ref_scale = new_scale_of(x)
        k = min(CHECK_ELEMENTS, x.numel())
        v = (x.reshape(-1)[:k] / ref_scale).clamp(-MAX, MAX)
        ref = stochastic_round(v, FP8, uniform_hash(seed, 0, k, x.device))
        if not torch.equal(ref_scale, s) or not torch.equal(ref.view(torch.uint8), q.reshape(-1)[:k].view(torch.uint8)):
            self.broken = "its bytes differ from quantize_fp8's on this GPU"
            log.warning("fused fp8 LoRA merge: %s — merging in plain PyTorch", self.broken)


def fp8_merge_for(device: torch.device) -> Fp8Merge | None:
    """The fused merge where it can run (a CUDA device with Triton), else None."""
    if torch.device(device).type != "cuda":
        return None
    from wanrender.kernels import triton_importable

    return Fp8Merge() if triton_importable() else None
