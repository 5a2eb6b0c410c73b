"""Per-token fp8 quantisation of a linear layer's input in one pass (Triton), for the
eager fp8 path: bit for bit ``kernels.linear.quantize_rows``.

``quantize_rows`` in PyTorch is five elementwise kernels (abs, amax, multiply, clamp,
cast), each a full pass over the activation: about 7 GB of memory traffic per
[82,992 x 5120] input and 19 GB for the FFN's hidden state, eight inputs per block.
Compiled, Inductor fuses them; eager, they cost about 0.7 s per forward on an H200.
Here one program reads one row once and writes its fp8 bytes and its scale.

Bit-exactness: the row's absmax is exact in any order; ``448 / amax`` is an IEEE
division (``div_rn``, as PyTorch's) rounded to the input's dtype; the product is taken
in fp32 and rounded to that dtype, as PyTorch's bf16 multiply does, then clamped and
converted to e4m3fn with round-to-nearest-even (the cast PyTorch makes). The first call
on each device compares its leading rows with ``quantize_rows``; any difference, or a
kernel that cannot build, sends this and every later call to ``quantize_rows``.

Eager only: under ``torch.compile`` the caller keeps the PyTorch ops, which Inductor
fuses with the norm before them (an opaque kernel would block that).
"""

from __future__ import annotations

import functools

import torch

from wanrender.kernels import CHECK_ROWS, CheckedKernel

FP8 = torch.float8_e4m3fn
MAX_K = 32768  # one row per program, held in registers: wider rows take the PyTorch path


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quant_rows_kernel(x_ptr, q_ptr, s_ptr, k, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < k
        x = tl.load(x_ptr + row * stride + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(xf), axis=0), 1e-12)
        inv = tl.math.div_rn(448.0, amax).to(x.dtype)  # rounded to the input's dtype, as PyTorch's
        y = (xf * inv.to(tl.float32)).to(x.dtype)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        tl.store(q_ptr + row * k + offs, y.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, tl.math.div_rn(1.0, inv.to(tl.float32)))

    return quant_rows_kernel


def quant_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` of a 2-D bf16 CUDA tensor with unit column stride."""
    import triton

    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _kernel()[(m,)](x, q, s, k, x.stride(0), BLOCK=block, num_warps=8 if block >= 8192 else 4)
    return q, s


class RowQuant(CheckedKernel):
    """The quantiser ``kernels.linear.fp8_rowwise`` calls in eager mode on a GPU."""

    what = "fused fp8 row quantisation"

    def usable(self, x: torch.Tensor) -> bool:
        return (
            self.broken is None
            and x.is_cuda
            # bf16 only: in fp16, 448 / amax overflows for rows below 448/65504 and the
            # PyTorch ops then give NaN bytes, which are no reference to match
            and x.dtype == torch.bfloat16
            and x.dim() == 2
            and 0 < x.shape[1] <= MAX_K
            and x.shape[0] > 0
        )

    def __call__(self, x: torch.Tensor, reference) -> tuple[torch.Tensor, torch.Tensor]:
        """``reference``: the PyTorch quantiser, used for the check and as the fallback."""
        out = (
            self.run(x.device, lambda: quant_rows_triton(x), lambda qs: self._check(x, *qs, reference))
            if self.usable(x)
            else None
        )
        return out if out is not None else reference(x)

    def _check(self, x, q, s, reference) -> None:
        n = min(CHECK_ROWS, x.shape[0])
        rq, rs = reference(x[:n])
        same = torch.equal(rs, s[:n]) and torch.equal(rq.view(torch.uint8), q[:n].view(torch.uint8))
        self.verdict(x.device, None if same else "its bytes differ from quantize_rows' on this GPU")


@functools.cache
def row_quant() -> RowQuant | None:
    """The process's fused quantiser where Triton imports, else None (asked on first use,
    never at import time)."""
    from wanrender.kernels import triton_importable

    return RowQuant() if triton_importable() else None
