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
    def channel_rms_kernel(x_ptr, g_ptr, y_ptr, c, s, scale, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        # The tile's last axis is the one contiguous in memory (pixels, or channels when
        # channels-last), the layout Triton coalesces best; AX is the channel axis.
        AX: tl.constexpr = 1 if CHANNELS_LAST else 0
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        chans = tl.arange(0, BLOCK_C)
        if CHANNELS_LAST:
            mask = (cols[:, None] < s) & (chans[None, :] < c)
            offs = b * c * s + cols[:, None] * c + chans[None, :]
        else:
            mask = (chans[:, None] < c) & (cols[None, :] < s)
            offs = b * c * s + chans[:, None].to(tl.int64) * s + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        norm = tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, axis=AX)), 1e-12)
        factor = (tl.math.div_rn(1.0, norm) * scale).to(x.dtype)
        y = (xf * tl.expand_dims(factor.to(tl.float32), AX)).to(x.dtype)
        g = tl.load(g_ptr + chans, mask=chans < c, other=0.0).to(x.dtype)
        y = (y.to(tl.float32) * tl.expand_dims(g.to(tl.float32), 1 - AX)).to(x.dtype)
        if SILU:
            yf = y.to(tl.float32)
            y = tl.math.div_rn(yf, 1.0 + tl.exp(-yf)).to(x.dtype)
        tl.store(y_ptr + offs, y, mask=mask)

    return channel_rms_kernel


def pixel_strides(x: torch.Tensor) -> tuple[int, int] | None:
    """(channel stride, pixel stride) of ``x`` [B, C, ...] when every sample is one dense
    block with its pixels (all axes after C) at one uniform stride: contiguous
    (channels first) or channels-last; ``None`` otherwise."""
    b, c = x.shape[:2]
    s = x[0, 0].numel()
    if x.is_contiguous():
        return s, 1
    if x.stride(0) != c * s and b > 1:
        return None
    # channels-last: the channel axis is the innermost, and the pixel axes flatten at stride C
    expect, ok = c, x.stride(1) == 1 or c == 1
    for size, stride in reversed(list(zip(x.shape[2:], x.stride()[2:], strict=True))):
        ok = ok and (size == 1 or stride == expect)
        expect *= size
    return (1, c) if ok else None


def writes_into(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the kernel can write its result for ``x`` into ``out``: same shape and
    dtype, each sample laid out alike (a view into a bigger buffer qualifies for one
    sample: a causal conv's frame buffer)."""
    return (
        out.shape == x.shape
        and out.dtype == x.dtype
        and out.device == x.device
        and pixel_strides(out) == pixel_strides(x) is not None
        and (x.shape[0] == 1 or out.stride(0) == x.stride(0))
    )


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``ChannelRMSNorm`` (then SiLU when ``silu``) of a CUDA tensor [B, C, ...] in
    bf16/fp16, contiguous or channels-last (see :func:`pixel_strides`); the result has
    the layout of ``x``, or is written into ``out`` (see :func:`writes_into`). ``gamma``
    holds C values."""
    import triton

    b, c = x.shape[:2]
    s = x[0, 0].numel()
    strides = pixel_strides(x)
    if strides is None:
        raise ValueError(f"channel_rms_norm: layout {tuple(x.stride())} is neither contiguous nor channels-last")
    if out is not None and not writes_into(x, out):
        raise ValueError(f"channel_rms_norm: out {tuple(out.stride())} is not laid out as x {tuple(x.stride())}")
    # The kernel addresses x and y with the same offsets.
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) if out is None else out
    block_c = triton.next_power_of_2(c)
    block_s = max(16, min(128, 8192 // block_c))  # about 8k values per program
    grid = (triton.cdiv(s, block_s), b)
    _kernel()[grid](x, gamma.reshape(-1).contiguous(), y, c, s, scale, SILU=silu, CHANNELS_LAST=strides[1] != 1,
                    BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)  # fmt: skip
    return y


class ChannelNormKernel(CheckedKernel):
    """What ``ChannelRMSNorm.kernel`` holds once the runtime enabled it: the Triton
    kernel where it applies, ``None`` from ``__call__`` where it does not (the module
    then runs its PyTorch ops)."""

    what = "fused VAE norm"

    def __call__(self, x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool, reference,
                 out: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
        """``reference(t)``: the module's own ops (norm, then SiLU when ``silu``) on ``t``.
        ``out``: where to write the result (through a copy where its layout is not ``x``'s)."""
        if (
            self.broken is not None
            or not x.is_cuda
            or gamma.device != x.device
            or x.dtype not in (torch.bfloat16, torch.float16)
            or x.dim() < 3
            or pixel_strides(x) is None
            or x.shape[1] > MAX_C
            or x.numel() == 0
            or torch.compiler.is_compiling()
        ):
            return None
        direct = out is None or writes_into(x, out)
        # Checked once per device and layout: the two layouts take different kernel branches.
        key = (x.device, pixel_strides(x)[1] != 1)
        y = self.run(key, lambda: channel_rms_norm(x, gamma, scale, silu, out if direct else None),
                     lambda y: self._check(key, x, y, reference))  # fmt: skip
        return y if direct or y is None else out.copy_(y)

    def _check(self, key, x, out, reference) -> None:
        first = (slice(None), slice(None), slice(0, 1))  # the first frame (or row) of every channel
        self.compare(key, out[first], reference(x[first].contiguous()))


def enable_vae_kernels(vae: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """Give every ``ChannelRMSNorm`` of ``vae`` the fused kernel when it computes on a
    CUDA device (``device``, default: where its weights are) and Triton imports; returns
    how many got it."""
    from wanrender.kernels import attach
    from wanrender.models.vae import ChannelRMSNorm

    return attach(vae, ChannelRMSNorm, "kernel", ChannelNormKernel, device)


def prepare_vae(vae: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """The VAE as the engine runs it on a GPU: channels-last activations (cuDNN's
    convolutions then skip their layout conversions; with this norm writing into the
    convs' frame buffers an 81-frame decode took 2.86 s against 3.54 s channels-first on
    an H200, docs/benchmarks.md) and the fused norm. On other devices it stays
    channels-first with the PyTorch ops. Returns the fused norms."""
    dev = torch.device(device) if device is not None else next(vae.parameters()).device
    if dev.type == "cuda" and hasattr(vae, "set_channels_last"):
        vae.set_channels_last(True)
    return enable_vae_kernels(vae, dev)
