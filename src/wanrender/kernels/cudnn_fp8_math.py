"""The ``cudnn-fp8`` attention's math in plain PyTorch: the pre-pass that turns bf16
Q, K, V into what cuDNN's fp8 SDPA takes, the post-pass that turns its fp8 output
back, and ``sdpa_fp8_emulated``, what the cuDNN graph computes in between.

The GPU backend (``attention_cudnn``) runs ``prepare`` and ``finish`` as written here
and replaces only the core by the cuDNN graph, so the twin and the kernel differ in
summation order and nothing else.

The scheme (numbers: docs/benchmarks.md, CPU emulation section):

- the graph takes one fp32 descale per tensor (``descale_q/k/v/s``) and one scale for
  P (``scale_s``) and O (``scale_o``); a per-head Q or K scale would change each
  head's logits by its own factor, which the single ``attn_scale`` cannot undo, so
  Q and K are per tensor;
- K smoothing (minus its per-channel mean over tokens) is exact: it adds a constant
  to each row of scores, which softmax ignores;
- V smoothing (minus its per-channel mean, added back to O) is exact because each
  softmax row sums to 1; for the same reason O is linear in V's channels, so V can be
  normalised per channel (or per head) before quantising and O multiplied back after:
  ``v_scale`` 'tensor', 'head' or 'channel' are all exact up to rounding;
- ``scale_o``: O is a convex combination of V's rows, so ``|O| <= amax(V)`` per
  channel: the descale of the quantised V bounds O, known before the kernel runs;
- ``scale_s``: P = exp(S - rowmax) is in [0, 1]; a power of two keeps P's scaling
  exact, and 256 leaves P's useful range (down to ~1e-5) in fp8's normal numbers.

fp8 e4m3 rounds each element by ~2.6% rms (3 mantissa bits), whatever the scale. On
Hopper cuDNN's fp8 SDPA must write O in fp8 (bf16 output needs Blackwell and cuDNN
>= 9.13), so on i.i.d. zero-mean V (O as small as its own rounding allows, nothing to
smooth) the output's rounding alone is a ~2.6% floor; fp8 V and fp8 P add as much each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from wanrender.kernels.sage8_math import FP8_MAX

FP8 = torch.float8_e4m3fn
# P is in [0, 1]: a power-of-two scale keeps the scaling itself exact.
P_SCALE = 256.0
QUANTISED = ("q", "k", "v", "p", "o")
V_SCALES = ("tensor", "head", "channel")


@dataclass(frozen=True)
class Fp8Scheme:
    """How Q, K, V are smoothed and scaled before cuDNN's fp8 SDPA.

    ``quantised`` names the tensors rounded to fp8 (all five in the real kernel; the
    emulation can leave some in fp32 to attribute the error). ``qk_scale='head'`` is
    emulation-only: the graph's descales are scalars (see the module docstring)."""

    smooth_k: bool = True
    smooth_v: bool = True
    v_scale: str = "tensor"
    qk_scale: str = "tensor"
    rotate: bool = True
    quantised: tuple[str, ...] = QUANTISED

    def __post_init__(self) -> None:
        if self.v_scale not in V_SCALES:
            raise ValueError(f"v_scale must be one of {V_SCALES}, got {self.v_scale!r}")
        if self.qk_scale not in ("tensor", "head"):
            raise ValueError(f"qk_scale must be 'tensor' or 'head', got {self.qk_scale!r}")
        unknown = set(self.quantised) - set(QUANTISED)
        if unknown:
            raise ValueError(f"unknown quantised tensors {sorted(unknown)}")


DEFAULT_SCHEME = Fp8Scheme()


@dataclass(frozen=True)
class Prepared:
    """The kernel's inputs: Q, K, V as fp8 codes ([B, L, H, D], contiguous) with their
    per-tensor descales (fp32 scalars on the device), plus what ``finish`` needs:
    ``v_mean`` and ``v_gain`` ([B, 1, H, D] fp32; None when unused)."""

    q8: torch.Tensor
    k8: torch.Tensor
    v8: torch.Tensor
    descale_q: torch.Tensor
    descale_k: torch.Tensor
    descale_v: torch.Tensor
    scale_o: torch.Tensor
    v_mean: torch.Tensor | None
    v_gain: torch.Tensor | None


@functools.cache
def _hadamard(d: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


def hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``d`` (a power of two), fp32,
    made once per device (no host-to-device copy per attention call)."""
    if d & (d - 1):
        raise ValueError(f"head dim {d} is not a power of two")
    return _hadamard(d, str(torch.device(device)))


def _codes(x: torch.Tensor, descale: torch.Tensor, on: bool) -> torch.Tensor:
    # The emulation keeps an unquantised tensor as fp32 "codes" with the same descale.
    # Contiguous: the kernel's graph is built for the [B, L, H, D] memory layout.
    y = x / descale
    return (y.clamp(-FP8_MAX, FP8_MAX).to(FP8) if on else y).contiguous()


def _amax(x: torch.Tensor, per_head: bool) -> torch.Tensor:
    # [B, L, H, D] -> scalar, or [1, 1, H, 1] per head (emulation only for Q/K).
    a = x.abs().amax(dim=(0, 1, 3), keepdim=True) if per_head else x.abs().amax()
    return a.clamp_min(1e-12)


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: Fp8Scheme = DEFAULT_SCHEME,
            rotation: torch.Tensor | None = None) -> Prepared:  # fmt: skip
    """Smooth and quantise ``[B, L, H, D]`` Q, K, V (any float dtype, views allowed)."""
    return Prepared(*prepare_parts(q, k, v, scheme, rotation))


def prepare_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: Fp8Scheme = DEFAULT_SCHEME,
                  rotation: torch.Tensor | None = None) -> tuple:  # fmt: skip
    """:func:`prepare`'s fields as a tuple, in plain tensor ops that torch.compile traces:
    inside a compiled block the pre-pass fuses with the ops before it (measured eager on
    an H200: 24 ms at 82,992 tokens, against 170 ms for the kernel). ``rotation``: the
    Hadamard matrix already on the device (made here when None)."""
    quant = set(scheme.quantised)
    qf, kf, vf = q.float(), k.float(), v.float()
    if scheme.smooth_k:
        kf = kf - kf.mean(dim=1, keepdim=True)
    if scheme.rotate:
        r = hadamard(q.shape[-1], q.device) if rotation is None else rotation
        qf, kf = qf @ r, kf @ r
    v_mean = vf.mean(dim=1, keepdim=True) if scheme.smooth_v else None
    if v_mean is not None:
        vf = vf - v_mean
    v_gain = None
    if scheme.v_scale != "tensor":
        dims = (1, 3) if scheme.v_scale == "head" else (1,)
        v_gain = vf.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)
        vf = vf / v_gain
    per_head = scheme.qk_scale == "head"
    dq = _amax(qf, per_head) / FP8_MAX
    dk = _amax(kf, per_head) / FP8_MAX
    dv = _amax(vf, False) / FP8_MAX
    return (
        _codes(qf, dq, "q" in quant),
        _codes(kf, dk, "k" in quant),
        _codes(vf, dv, "v" in quant),
        dq,
        dk,
        dv,
        # |O| <= amax(V) (convex combination): scale_o maps that bound to fp8's max.
        1.0 / dv,
        v_mean,
        v_gain,
    )


def finish(o8: torch.Tensor, prep: Prepared, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's fp8 output back to ``dtype`` with V's gain and mean restored (any
    subset of query rows: the gain and mean are per batch, head and channel)."""
    o = o8.float() / prep.scale_o
    if prep.v_gain is not None:
        o = o * prep.v_gain
    if prep.v_mean is not None:
        o = o + prep.v_mean
    return o.to(dtype)


def sdpa_fp8_emulated(
    prep: Prepared,
    *,
    quantise_p: bool = True,
    quantise_o: bool = True,
    rows: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """What cuDNN's fp8 SDPA graph computes from ``prep``, in plain PyTorch.

    S = (Q8 K8^T) * descale_q * descale_k / sqrt(D) in fp32; P = exp(S - rowmax); the
    row sum uses fp32 P; P8 = fp8(P * scale_s); O = (P8 V8) * descale_s * descale_v /
    rowsum in fp32; returns fp8(O * scale_o) (fp32 codes where not quantised), [B, L,
    H, D]. The kernel's running max only changes where P is scaled, not its values in
    [0, 1], so the exact row max stands in for it. ``rows`` (1-D indices) restricts
    the queries computed, to keep long sequences cheap; ``chunk`` rows at a time."""
    q8, k8, v8 = prep.q8, prep.k8, prep.v8
    if rows is not None:
        q8 = q8[:, rows.to(q8.device)]
    b, lq, h, d = q8.shape
    scale = 1.0 / math.sqrt(d)
    dq, dk = prep.descale_q.float(), prep.descale_k.float()
    if dq.dim() == 4:  # per-head (emulation only): [1, 1, H, 1]
        dq, dk = dq.view(h), dk.view(h)
    else:
        dq, dk = dq.expand(h), dk.expand(h)
    out_dtype = FP8 if quantise_o else torch.float32
    out = torch.empty(b, lq, h, d, dtype=out_dtype, device=q8.device)
    for bi in range(b):
        for hi in range(h):
            kf = k8[bi, :, hi].float()
            vf = v8[bi, :, hi].float()
            s_scale = dq[hi] * dk[hi] * scale
            for s0 in range(0, lq, chunk):
                s = (q8[bi, s0 : s0 + chunk, hi].float() @ kf.T) * s_scale
                p = torch.exp(s - s.amax(dim=-1, keepdim=True))
                rowsum = p.sum(dim=-1, keepdim=True)
                p8 = (p * P_SCALE).to(FP8).float() if quantise_p else p * P_SCALE
                o = (p8 @ vf) * (prep.descale_v / P_SCALE) / rowsum
                o = o * prep.scale_o
                out[bi, s0 : s0 + chunk, hi] = o.clamp(-FP8_MAX, FP8_MAX).to(FP8) if quantise_o else o
    return out


def cudnn_fp8_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: Fp8Scheme = DEFAULT_SCHEME
) -> torch.Tensor:
    """The whole ``cudnn-fp8`` backend in plain PyTorch: ``[B, L, H, D]`` in and out,
    the reference twin of the GPU kernel (any device; O(L^2 D) per head)."""
    prep = prepare(q, k, v, scheme)
    quant = set(scheme.quantised)
    o8 = sdpa_fp8_emulated(prep, quantise_p="p" in quant, quantise_o="o" in quant)
    return finish(o8, prep, q.dtype)
