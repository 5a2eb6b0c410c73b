"""The DiT's query/key RMSNorm and RoPE rotation in one pass (Triton), for eager runs.

``Attention`` normalises each projected query and key over the whole model width (not
per head), multiplies by the norm's weight and rotates channel pairs by the token's
RoPE angles. In PyTorch that is about eight passes over a [82,992 x 5120] tensor with
fp32 copies (some 18 GB of memory traffic per tensor, three tensors per block).
Compiled, Inductor fuses them; eager, they were the largest share of the elementwise
time left in a forward on an H200. Here one program reads one token's row once and
writes the rotated bf16 row.

Same steps and roundings as the module: the norm in fp32 rounded to bf16, times the
bf16 weight rounded, then (a c - b s, a s + b c) in fp32 rounded. The sum of squares
is added in another order and the reciprocal square root is not PyTorch's, so a few
values differ by one unit in the last place; the first call on each device compares
its leading rows with the PyTorch ops and falls back for good beyond that.

Eager only: under ``torch.compile`` the module keeps its ops, which Inductor fuses.
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
    def norm_rope_kernel(y_ptr, w_ptr, rope_ptr, out_ptr, d, tokens, eps, ROPE: tl.constexpr,
                         HALF_HEAD: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        p = tl.arange(0, PAIRS)
        mask = p < d // 2
        base = y_ptr + row * d
        a = tl.load(base + 2 * p, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(base + 2 * p + 1, mask=mask, other=0.0).to(tl.float32)
        ms = (tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / d
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))
        wa = tl.load(w_ptr + 2 * p, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
        wb = tl.load(w_ptr + 2 * p + 1, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
        a = ((a * rstd).to(tl.bfloat16).to(tl.float32) * wa).to(tl.bfloat16)
        b = ((b * rstd).to(tl.bfloat16).to(tl.float32) * wb).to(tl.bfloat16)
        if ROPE:
            tok = row % tokens
            j = p % HALF_HEAD
            c = tl.load(rope_ptr + tok * (2 * HALF_HEAD) + 2 * j, mask=mask, other=1.0)
            s = tl.load(rope_ptr + tok * (2 * HALF_HEAD) + 2 * j + 1, mask=mask, other=0.0)
            af, bf = a.to(tl.float32), b.to(tl.float32)
            a = (af * c - bf * s).to(tl.bfloat16)
            b = (af * s + bf * c).to(tl.bfloat16)
        out = out_ptr + row * d
        tl.store(out + 2 * p, a, mask=mask)
        tl.store(out + 2 * p + 1, b, mask=mask)

    return norm_rope_kernel


def norm_rope_triton(y: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm(y) * weight, rotated by ``rope`` ([L, 1, head_dim/2, 2] fp32) when given,
    for a contiguous bf16 CUDA tensor [..., L, D] (tokens on the second-to-last axis)."""
    import triton

    d = y.shape[-1]
    rows = y.numel() // d
    out = torch.empty_like(y)
    tokens = rope.shape[0] if rope is not None else 1
    half_head = rope.shape[-2] if rope is not None else 1
    pairs = triton.next_power_of_2(d // 2)
    _kernel()[(rows,)](y, weight, rope if rope is not None else y, out, d, tokens, eps, ROPE=rope is not None,
                       HALF_HEAD=half_head, PAIRS=pairs, num_warps=8 if pairs >= 2048 else 4)  # fmt: skip
    return out


class NormRope(CheckedKernel):
    """What ``Attention.norm_rope`` holds once the runtime enabled it: returns the fused
    result, or None where the kernel does not apply (the module then runs its ops)."""

    what = "fused q/k norm + RoPE"

    def applies(self, y: torch.Tensor, rope: torch.Tensor | None) -> bool:
        if self.broken is not None or not y.is_cuda or y.dtype != torch.bfloat16 or not y.is_contiguous():
            return False
        if y.dim() < 2 or y.shape[-1] % 2 or not 0 < y.shape[-1] <= MAX_ROW or torch.compiler.is_compiling():
            return False
        if rope is None:
            return True
        return (
            rope.device == y.device
            and rope.dtype == torch.float32
            and rope.is_contiguous()
            and rope.dim() == 4
            and rope.shape[0] == y.shape[-2]
            and y.shape[-1] % (2 * rope.shape[-2]) == 0
        )

    def __call__(self, y: torch.Tensor, norm: torch.nn.Module, rope: torch.Tensor | None,
                 reference) -> torch.Tensor | None:  # fmt: skip
        """``reference(t)``: the module's own ops (norm, then the rotation of ``rope``'s
        leading rows) on a [..., n, D] tensor of the first n tokens."""
        if not self.applies(y, rope) or norm.weight.device != y.device:
            return None
        return self.run(y.device, lambda: norm_rope_triton(y, norm.weight, norm.eps, rope),
                        lambda out: self._check(y, out, reference))  # fmt: skip

    def _check(self, y, out, reference) -> None:
        n = min(CHECK_ROWS, y.shape[-2])
        ref = reference(y[..., :n, :].contiguous())  # [..., n, heads, head_dim]: flattened like ours
        self.compare(y.device, out[..., :n, :], ref.flatten(-2))


def enable_norm_rope(model: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """Give every DiT ``Attention`` of ``model`` the fused kernel when the model computes
    on a CUDA device (``device``, default: where its weights are) and Triton imports
    (else set none); returns how many got it."""
    from wanrender.kernels import attach
    from wanrender.models.dit import Attention

    return attach(model, Attention, "norm_rope", NormRope, device)
