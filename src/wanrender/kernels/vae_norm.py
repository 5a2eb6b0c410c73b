"""The VAE's channel RMSNorm, and the SiLU after it, in one pass (Triton).

``models.vae.ChannelRMSNorm`` in bf16 is a norm over the channel axis of an NCDHW
video (a reduction over a strided axis), then two broadcast multiplies, then a
separate SiLU: four or five passes over activations of up to 96 x 4 x 832 x 1216.
Measured on an H200 (``gpu_cold_probe.py vae2``), elementwise kernels and reductions
were 1.5 s of a 3.6 s decode at 81 x 832x1216, the convolutions 1.6 s. Here one
program holds all channels of a run of pixels, reads them once and writes the result.

Same arithmetic as the module: the norm in fp32, the per-pixel factor ``(1 / norm) *
sqrt(C)`` (PyTorch computes ``scalar / tensor`` as a reciprocal times the scalar)
rounded to the activation's dtype, then ``x * factor`` and ``* gamma`` each rounded
to it, then SiLU in fp32 rounded to it. The sum of squares is added in another order
than PyTorch's reduction, and Triton's exp is not the CUDA library's, so a few values
differ by one unit in the last place (bf16: 2^-8 relative); the tests bound that, and
the first call on each device is checked against the module's ops (falling back for
good beyond two units).

Eager only: the module keeps its PyTorch ops under ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch

from wanrender.kernels import CheckedKernel

MAX_C = 512  # all channels of a pixel in one tile (the Wan VAEs have up to 384)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def channel_rms_kernel(x_ptr, g_ptr, y_ptr, c, s, scale, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_S: tl.constexpr):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        chans = tl.arange(0, BLOCK_C)
        mask = (chans[:, None] < c) & (cols[None, :] < s)
        offs = b * c * s + chans[:, None].to(tl.int64) * s + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        norm = tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, axis=0)), 1e-12)
        factor = (tl.math.div_rn(1.0, norm) * scale).to(x.dtype)
        y = (xf * factor.to(tl.float32)[None, :]).to(x.dtype)
        g = tl.load(g_ptr + chans, mask=chans < c, other=0.0).to(x.dtype)
        y = (y.to(tl.float32) * g.to(tl.float32)[:, None]).to(x.dtype)
        if SILU:
            yf = y.to(tl.float32)
            y = tl.math.div_rn(yf, 1.0 + tl.exp(-yf)).to(x.dtype)
        tl.store(y_ptr + offs, y, mask=mask)

    return channel_rms_kernel


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool) -> torch.Tensor:
    """``ChannelRMSNorm`` (then SiLU when ``silu``) of a contiguous CUDA tensor
    [B, C, ...] in bf16/fp16; ``gamma`` holds C values."""
    import triton

    b, c = x.shape[:2]
    s = x[0, 0].numel()
    y = torch.empty_like(x)
    block_c = triton.next_power_of_2(c)
    block_s = max(16, min(128, 8192 // block_c))  # about 8k values per program
    grid = (triton.cdiv(s, block_s), b)
    _kernel()[grid](x, gamma.reshape(-1).contiguous(), y, c, s, scale, SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
                    num_warps=8)  # fmt: skip
    return y


class ChannelNormKernel(CheckedKernel):
    """What ``ChannelRMSNorm.kernel`` holds once the runtime enabled it: the Triton
    kernel where it applies, ``None`` from ``__call__`` where it does not (the module
    then runs its PyTorch ops)."""

    what = "fused VAE norm"

    def __call__(self, x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool,
                 reference) -> torch.Tensor | None:  # fmt: skip
        """``reference(t)``: the module's own ops (norm, then SiLU when ``silu``) on ``t``."""
        if (
            self.broken is not None
            or not x.is_cuda
            or gamma.device != x.device
            or x.dtype not in (torch.bfloat16, torch.float16)
            or not x.is_contiguous()
            or x.dim() < 3
            or x.shape[1] > MAX_C
            or x.numel() == 0
            or torch.compiler.is_compiling()
        ):
            return None
        return self.run(x.device, lambda: channel_rms_norm(x, gamma, scale, silu),
                        lambda out: self._check(x, out, reference))  # fmt: skip

    def _check(self, x, out, reference) -> None:
        first = (slice(None), slice(None), slice(0, 1))  # the first frame (or row) of every channel
        self.compare(x.device, out[first], reference(x[first].contiguous()))


def enable_vae_kernels(vae: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """Give every ``ChannelRMSNorm`` of ``vae`` the fused kernel when it computes on a
    CUDA device (``device``, default: where its weights are) and Triton imports; returns
    how many got it."""
    from wanrender.kernels import attach
    from wanrender.models.vae import ChannelRMSNorm

    return attach(vae, ChannelRMSNorm, "kernel", ChannelNormKernel, device)
