"""Small helpers shared by the networks: the dequantising linear layer and fp32 norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def set_tensor(mod: nn.Module, name: str, t: torch.Tensor) -> None:
    """Give ``mod`` a new tensor ``name`` (parameter or buffer, as it is now): the one
    way the loaders, the LoRA merge, fp8 conversion and weight streaming swap a tensor.
    Never an in-place write: the old tensor may be a view of the user's file."""
    if name in mod._parameters:
        mod._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[name] = t


class RuntimeAdapter(NamedTuple):
    """A LoRA term added at run time: ``y += scale * (x @ down.T) @ up.T``.

    ``up`` is None for a full-weight difference: ``y += scale * x @ down.T``.
    Kept in the LoRA file's dtype and cast to the activation's on use.
    """

    down: torch.Tensor
    up: torch.Tensor | None
    scale: float


class Linear(nn.Module):
    """``nn.Linear`` whose weight may be stored in fp8 with a scale.

    fp8 weights stay fp8 in memory (a 14 GB file never silently becomes 28 GB);
    they are dequantised on use to the activation's dtype:
    ``w = weight.to(dtype) * weight_scale``. ``weight_scale`` is ``None`` for
    unscaled weights, a 0-d tensor (per-tensor scale, ComfyUI fp8_scaled) or a
    ``[out_features, 1]`` tensor (per-output-channel).
    The weight is read as the input's dtype so the layer never upcasts the
    activations by accident.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight_scale: torch.Tensor | None
        self.register_buffer("weight_scale", None)
        # Unmerged LoRAs (models/lora.py); a plain attribute so state_dict() never sees them.
        self.adapters: tuple[RuntimeAdapter, ...] = ()
        # A faster matmul chosen by the runtime (kernels/linear.py): kernel(layer, x) -> y.
        # None keeps the plain dequantise-and-matmul path below, the reference.
        self.kernel: Callable[[Linear, torch.Tensor], torch.Tensor] | None = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.to(dtype)
        if self.weight_scale is not None:
            w = w * self.weight_scale.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel(self, x)
        else:
            w = self.dequantized_weight(x.dtype)
            b = self.bias.to(x.dtype) if self.bias is not None else None
            y = F.linear(x, w, b)
        if self.adapters:
            y = self._add_adapters(x, y)
        return y

    def _add_adapters(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for a in self.adapters:
            h = F.linear(x, a.down.to(x.dtype))
            if a.up is not None:
                h = F.linear(h, a.up.to(x.dtype))
            y = y + a.scale * h
        return y

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.weight_scale is not None else ""
        lora = f", {len(self.adapters)} runtime LoRA(s)" if self.adapters else ""
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.weight.dtype}{scaled}{lora}"
        )


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (the reference does; bf16 loses the small variances)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused kernel
        return y.type_as(x) * self.weight.to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in fp32, result cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def quantize_fp8(
    w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax quantisation: returns (fp8 weight, fp32 0-d scale).

    ``w ~= q.float() * scale``; the scale maps the largest magnitude onto the
    format's largest finite value (448 for e4m3fn). With a ``seed`` the rounding is
    stochastic (unbiased): a small change such as a LoRA delta, below half an fp8
    step, survives on average instead of rounding back to the old value. The random
    numbers come from a counter hash of (seed, element index) computed where ``w``
    lives, so a merge on the GPU gives the same bytes as one on the CPU.
    """
    amax = w.abs().amax().float().clamp(min=1e-12)
    scale = (amax / torch.finfo(dtype).max).to(torch.float32)
    if seed is None:
        v = (w.float() / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
        return v.to(dtype), scale
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    flat_w, flat_out = w.reshape(-1), out.view(-1)
    # Chunks bound the int64 temporaries of the hash (~40 bytes an element).
    step = 1 << 24
    for lo in range(0, flat_w.numel(), step):
        v = (flat_w[lo : lo + step].float() / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
        flat_out[lo : lo + step] = stochastic_round(v, dtype, uniform_hash(seed, lo, v.numel(), v.device))
    return out, scale


_MASK32 = 0xFFFFFFFF


def uniform_hash(seed: int, start: int, n: int, device: torch.device | str) -> torch.Tensor:
    """n floats in [0, 1) for element indices start..start+n-1: a 32-bit integer hash
    (two rounds of multiply-xorshift) of index and seed. Pure integer arithmetic on
    int64 with masking, so every device computes the same values; a generator's
    stream would differ between the CPU and each GPU kind."""
    x = torch.arange(start, start + n, dtype=torch.int64, device=device)
    x = (x ^ (seed * 0x9E3779B1)) & _MASK32
    for mul in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mul) & _MASK32  # wraps mod 2^64 first: the low 32 bits stay exact
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def stochastic_round(v: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """Round each value to one of its two fp8 neighbours with probability by distance
    (``r``: uniform numbers in [0, 1), one per value)."""
    a = v.abs()
    near = a.to(dtype)
    bits = near.view(torch.uint8).to(torch.int16)
    top = torch.finfo(dtype).max
    top_bits = int(torch.tensor(top).to(dtype).view(torch.uint8))
    nearf = near.float()
    below = nearf > a  # the nearest value is above: the other neighbour is one step down
    lo_bits = torch.where(below, (bits - 1).clamp(min=0), bits)
    hi_bits = torch.where(below, bits, (bits + 1).clamp(max=top_bits))
    lo = lo_bits.to(torch.uint8).view(dtype).float()
    hi = hi_bits.to(torch.uint8).view(dtype).float()
    gap = hi - lo
    p_hi = torch.where(gap > 0, (a - lo) / gap.clamp(min=1e-30), torch.zeros_like(a))
    mag = torch.where(r < p_hi, hi, lo)
    return (mag * torch.sign(v)).to(dtype)
