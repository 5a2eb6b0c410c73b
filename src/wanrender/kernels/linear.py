"""fp8 linear layers: e4m3 weights with per-output-channel scales, activations
quantised per token on the fly, ``torch._scaled_mm`` with bf16 output.

``fp8_rowwise`` is the function ``models.common.Linear`` calls when set as its
``kernel``: the layer keeps owning its weight (no second copy, no monkeypatched
``forward``). ``fp8_linear_reference`` is the plain-PyTorch twin: the same
quantisation, a float matmul; the tests compare the two.

Needs compute capability >= 8.9 (Ada, Hopper, Blackwell). Below that (A100) and
on the CPU the layer keeps its dequantising bf16 path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from wanrender.kernels.quant_rows import row_quant
from wanrender.models.common import Linear, quantize_fp8, set_tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def fp8_capable(device: torch.device | str) -> list[str]:
    """Reasons the fp8 matmul path cannot run on ``device`` (empty: it can)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return ["fp8 matmuls need a CUDA GPU"]
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        return [f"fp8 matmuls need compute capability >= 8.9 (this GPU: {cap[0]}.{cap[1]})"]
    return []


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) e4m3 quantisation: (x_fp8 [M, K], scale [M, 1] fp32).

    Scaled in the input's own dtype: bf16 keeps 8 mantissa bits, e4m3 keeps 3, so
    nothing is lost, and no fp32 copy of the activations (the FFN hidden state is
    2.3 GB in bf16 at 81 frames) is ever made.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    inv = (FP8_MAX / amax).to(x.dtype)
    # The scale handed to the matmul is the exact inverse of the (rounded) factor used.
    return (x * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1.0 / inv.float()


def weight_rowwise(layer: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as (fp8 [N, K], per-output-channel scale [1, N] fp32).

    fp8 files are used as stored (a per-tensor scale is broadcast to every
    channel); bf16/fp16 weights are quantised once, per output channel.
    """
    w = layer.weight
    if w.dtype == FP8:
        s = layer.weight_scale
        scale = torch.ones((), device=w.device) if s is None else s.float()
        return w, scale.reshape(-1, 1).expand(w.shape[0], 1).reshape(1, -1).contiguous()
    wf = layer.dequantized_weight(torch.float32)
    amax = wf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(1, -1).contiguous()


def fp8_rowwise(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """``y = (x_q @ w_q.T) * sx * sw + b`` through ``torch._scaled_mm`` (bf16 out).

    Stateless: it reads the layer's current weight, so a later LoRA merge or a
    weight swap is picked up without rebuilding anything. Eager on a GPU the input is
    quantised by one Triton kernel (``kernels/quant_rows.py``, the same bytes);
    compiled, by the PyTorch ops, which Inductor fuses with what comes before.
    """
    w, sw = weight_rowwise(layer)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    fused = row_quant() if x.is_cuda and not torch.compiler.is_compiling() else None
    xq, sx = fused(x2, quantize_rows) if fused is not None else quantize_rows(x2)
    bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
    y = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16)
    return y.reshape(*shape[:-1], layer.out_features).to(x.dtype)


def fp8_linear_reference(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """The same quantisation as ``Fp8RowwiseKernel``, with a float matmul (any device)."""
    w, sw = weight_rowwise(layer)
    xq, sx = quantize_rows(x.reshape(-1, x.shape[-1]))
    y = (xq.float() * sx) @ (w.float() * sw.reshape(-1, 1)).t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


def enable_fp8(model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Give the chosen ``Linear`` layers the fp8 kernel; returns their names.

    Weights already in fp8 are used in place. bf16 weights get an fp8 copy and
    the bf16 original is released (the layer keeps the fp8 weight and its
    per-channel scale), so memory halves rather than grows.
    """
    inc = tuple(include) if include is not None else None
    exc = tuple(exclude)
    done = []
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        if (inc is not None and not any(p in name for p in inc)) or any(p in name for p in exc):
            continue
        if mod.in_features % 16 or mod.out_features % 16:
            continue  # _scaled_mm needs multiples of 16
        if mod.weight.dtype != FP8:
            q, s = weight_rowwise(mod)
            set_tensor(mod, "weight", q)
            mod.weight_scale = s.reshape(-1, 1)
        mod.kernel = fp8_rowwise
        done.append(name)
    return done


def disable_fp8(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, Linear):
            mod.kernel = None


__all__ = ["fp8_rowwise", "enable_fp8", "disable_fp8", "fp8_capable", "fp8_linear_reference",
           "quantize_fp8", "quantize_rows", "weight_rowwise"]  # fmt: skip
