"""The DiT block's LayerNorm, adaLN modulation and cast to the compute dtype in one
pass (Triton), for eager runs.

Each block normalises its fp32 residual three times: twice followed by
``shift + normed * (1 + scale)``, once (``norm3``) with its own affine weights, and
each result is cast to bf16 for the projections. In PyTorch that is a LayerNorm, an
``addcmul`` and a cast, each a full pass over a [82,992 x 5120] fp32 tensor (about
9 GB of memory traffic per use). Here one program reads one token's fp32 row once and
writes its bf16 row (2.5 GB per use).

Same steps as the module: mean and variance in fp32, ``(x - mean) / sqrt(var + eps)``,
the affine weights, ``shift + y * (1 + scale)`` in fp32, one rounding to bf16. PyTorch's
LayerNorm accumulates with Welford's method in another order, so a few values differ by
one unit in the last place; the first call on each device compares its leading rows
with the PyTorch ops (``kernels.excess_error``'s two-unit bound) and falls back for good
beyond that or on any exception.

Eager only: under ``torch.compile`` the block keeps its ops, which Inductor fuses.
"""

from __future__ import annotations

import functools

import torch

from wanrender.kernels import CHECK_ROWS, MAX_ROW, CheckedKernel


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ln_mod_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr, d, tokens, eps, AFFINE: tl.constexpr,
                      MOD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        batch = row // tokens
        offs = tl.arange(0, BLOCK)
        mask = offs < d
        x = tl.load(x_ptr + row * d + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / d
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / d
        y = xc * tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        if AFFINE:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0) + tl.load(b_ptr + offs, mask=mask, other=0.0)
        if MOD:
            shift = tl.load(shift_ptr + batch * d + offs, mask=mask, other=0.0)
            scale = tl.load(scale_ptr + batch * d + offs, mask=mask, other=0.0)
            y = shift + y * (1.0 + scale)
        tl.store(out_ptr + row * d + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    return ln_mod_kernel


def ln_mod_triton(x: torch.Tensor, norm: torch.nn.LayerNorm, shift: torch.Tensor | None, scale: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``norm(x)`` (then ``shift + . * (1 + scale)`` when given) cast to ``dtype``, for a
    contiguous fp32 CUDA tensor [B, L, D]; shift and scale broadcast as [B, 1, D]."""
    import triton

    b, tokens, d = x.shape
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    affine = norm.weight is not None
    w = norm.weight.float().contiguous() if affine else x
    bias = norm.bias.float().contiguous() if affine and norm.bias is not None else torch.zeros(d, device=x.device)
    mod = shift is not None
    sh = shift.float().expand(b, 1, d).contiguous() if mod else x
    sc = scale.float().expand(b, 1, d).contiguous() if mod else x
    block = triton.next_power_of_2(d)
    _kernel()[(b * tokens,)](x, w, bias if affine else x, sh, sc, out, d, tokens, norm.eps, AFFINE=affine, MOD=mod,
                             BLOCK=block, num_warps=8 if block >= 4096 else 4)  # fmt: skip
    return out


class NormModulate(CheckedKernel):
    """What ``Block.norm_mod`` holds once the runtime enabled it: the fused result, or
    None where the kernel does not apply (the block then runs its ops)."""

    what = "fused LayerNorm + modulation"

    def applies(self, x: torch.Tensor, norm: torch.nn.LayerNorm, shift, dtype: torch.dtype) -> bool:
        if self.broken is not None or not x.is_cuda or x.dtype != torch.float32 or dtype != torch.bfloat16:
            return False
        if x.dim() != 3 or not x.is_contiguous() or not 0 < x.shape[-1] <= MAX_ROW or torch.compiler.is_compiling():
            return False
        if norm.weight is not None and norm.weight.device != x.device:
            return False
        return shift is None or (shift.device == x.device and shift.shape[-1] == x.shape[-1])

    def __call__(self, x: torch.Tensor, norm: torch.nn.LayerNorm, shift: torch.Tensor | None,
                 scale: torch.Tensor | None, dtype: torch.dtype, reference) -> torch.Tensor | None:  # fmt: skip
        """``reference(t)``: the block's own ops on the first tokens ``t`` [B, n, D]."""
        if not self.applies(x, norm, shift, dtype):
            return None
        return self.run(x.device, lambda: ln_mod_triton(x, norm, shift, scale, dtype),
                        lambda out: self._check(x, out, reference))  # fmt: skip

    def _check(self, x, out, reference) -> None:
        n = min(CHECK_ROWS, x.shape[1])
        self.compare(x.device, out[:, :n], reference(x[:, :n].contiguous()))


def enable_norm_mod(model: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """Give every DiT ``Block`` of ``model`` the fused kernel when the model computes on
    a CUDA device (``device``, default: where its weights are) and Triton imports;
    returns how many got it."""
    from wanrender.kernels import attach
    from wanrender.models.dit import Block

    return attach(model, Block, "norm_mod", NormModulate, device)
