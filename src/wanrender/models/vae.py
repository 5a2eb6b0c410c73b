"""The Wan 2.1 video VAE (the one Wan 2.2 I2V-A14B uses): causal 3-D conv autoencoder.

Pixels ``[B, 3, F, H, W]`` in [-1, 1] <-> latents ``[B, 16, (F - 1) // 4 + 1, H / 8, W / 8]``.
Time is causal: latent frame 0 sees only pixel frame 0, latent frame ``k > 0`` sees pixel
frames up to ``4k``. The networks run a few frames at a time (encoder: 1, then 4 pixel
frames; decoder: 1 latent frame) and every causal layer remembers the frames it needs
from the previous chunk (:class:`TimeCache`), so chunked output equals whole-video output
while activations only ever hold a few frames.

Parameter names follow the official checkpoint (``Wan2.1_VAE.pth``, ComfyUI's
``wan_2.1_vae.safetensors``) so those files load with ``strict=True`` and no renaming;
diffusers folders go through :func:`official_keys_from_diffusers` first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per-channel statistics of the Wan 2.1 latent space (published with the model).
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE. Defaults are the full-size Wan 2.1 VAE.

    There is no dropout field: the model is inference-only (the training graph had a
    dropout layer, whose slot is kept empty so parameter indices still line up).
    """

    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per downsampling stage (len(dim_mult) - 1)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need {self.z_dim} values (one per latent channel)")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames (81 -> 21); trailing extras are dropped."""
        return (num_frames - 1) // self.temporal_stride + 1

    def video_frames(self, latent_frames: int) -> int:
        """Pixel frames the decoder produces for ``latent_frames`` latent frames (21 -> 81)."""
        return (latent_frames - 1) * self.temporal_stride + 1

    @classmethod
    def preset(cls, name: str) -> VAEConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(PRESETS)}") from None


PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(),
    # Same graph and latent space at 1/12 of the width: for tests and quick demos.
    "demo": VAEConfig(base_dim=8),
}


_Size = int | tuple[int, int, int]


class TimeCache:
    """What each causal layer must remember between time chunks of one video.

    Kept outside the modules (keyed by module identity) so the model itself holds no
    per-video state: a fresh cache per encode/decode call (or per spatial tile) is all
    it takes to start a new stream.
    """

    def __init__(self) -> None:
        self._slots: dict[int, Any] = {}

    def get(self, owner: nn.Module) -> Any:
        return self._slots.get(id(owner))

    def put(self, owner: nn.Module, value: Any) -> None:
        self._slots[id(owner)] = value


class CausalConv3d(nn.Conv3d):
    """3-D conv that only looks back in time.

    The reference pads ``2 * pad_t`` zero frames in front of the video instead of
    ``pad_t`` on both sides. Across chunks those zeros are replaced by the last input
    frames of the previous chunk, so chunked results equal whole-video results exactly.
    """

    def __init__(self, cin: int, cout: int, kernel: _Size, stride: _Size = 1, padding: _Size = 0) -> None:
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        # Spatial zero padding is symmetric, so the conv can do it; time is handled below.
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, pad[1], pad[2]))
        self.past_frames = 2 * pad[0]

    def forward(self, x: Tensor, cache: TimeCache | None = None, *, buffered: bool = False) -> Tensor:  # type: ignore[override]
        """``buffered``: ``x`` is already a :meth:`frames_buffer` with the new frames filled in."""
        if self.past_frames == 0:
            return super().forward(x)
        if buffered:
            return self._forward_buffer(x, cache)
        ctx = self.frames_buffer(x, cache)
        ctx[:, :, self.past_frames :].copy_(x)
        return self._forward_buffer(ctx, cache)

    def frames_buffer(self, x: Tensor, cache: TimeCache | None) -> Tensor:
        """``[B, C, past + T, H, W]`` in ``x``'s layout, the remembered frames (or the
        reference's zero frames at the start of a stream) in front, room for ``x``'s T
        frames behind. Whoever makes ``x`` may write it straight there (the fused norm
        does), which saves concatenating the past with a copy of the whole chunk."""
        p = self.past_frames
        b, c, t, h, w = x.shape
        ctx = torch.empty((b, c, p + t, h, w), dtype=x.dtype, device=x.device, memory_format=_layout(x))
        past = cache.get(self) if cache is not None else None
        have = 0 if past is None else past.shape[2]
        if have < p:
            ctx[:, :, : p - have].zero_()
        if have:
            ctx[:, :, p - have : p].copy_(past)
        return ctx

    def _forward_buffer(self, ctx: Tensor, cache: TimeCache | None) -> Tensor:
        new = ctx.shape[2] - self.past_frames
        if cache is not None:
            # The last frames that were real input (never the zero padding), up to past_frames.
            past = cache.get(self)
            real = new + (0 if past is None else past.shape[2])
            keep = min(self.past_frames, real)
            # clone: a view would pin the whole chunk in memory.
            cache.put(self, ctx[:, :, ctx.shape[2] - keep :].clone())
        return super().forward(ctx)


class ChannelRMSNorm(nn.Module):
    """``x / ||x||_channels * sqrt(C) * gamma`` (the reference's ``RMS_norm``).

    fp32/fp64 keep the reference's order of operations, so results match it bit for bit.
    In fp16/bf16 the norm is taken in fp32 (in fp16 the sum of squares of a few hundred
    channels overflows, the norm itself may too) and only the per-pixel factor is cast
    back, so no fp32 copy of the activation is kept around.
    """

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        # gamma keeps the reference's broadcastable shape: [C,1,1,1] video, [C,1,1] image.
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))
        self.scale = dim**0.5
        # A fused norm (and SiLU) the runtime may set (kernels/vae_norm.py): kernel(x, gamma,
        # scale, silu, reference, out) -> y (written into out when given), or None where it
        # does not apply. None keeps the ops.
        self.kernel: Callable[..., Tensor | None] | None = None

    def forward(self, x: Tensor, silu: bool = False, out: Tensor | None = None) -> Tensor:
        """The norm; with ``silu`` also the SiLU that follows it in the blocks. ``out``: a
        tensor of ``x``'s shape to write the result into (returned)."""
        if self.kernel is not None:
            y = self.kernel(x, self.gamma, self.scale, silu, lambda t: self._plain(t, silu), out)
            if y is not None:
                return y
        y = self._plain(x, silu)
        return y if out is None else out.copy_(y)

    def _plain(self, x: Tensor, silu: bool) -> Tensor:
        y = self._norm(x)
        return F.silu(y) if silu else y

    def _norm(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float32, torch.float64):
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
            return x / norm * self.scale * self.gamma.to(x.dtype)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
        return x * (self.scale / norm).to(x.dtype) * self.gamma.to(x.dtype)


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices matter: the checkpoint names residual.0 / .2 / .3 / .6 (slot 5 was dropout).
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut: nn.Module = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        skip = self.shortcut(x)
        return _run_layers(self.residual, x, cache) + skip


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (never across time,
    so it needs no cache and stays causal)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: TimeCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames))  # [bt, 3c, h, w], channel blocks q | k | v
        # Contiguous [bt, 1, hw, 3c] as in the reference: SDPA then picks the same kernel
        # on CPU, which keeps fp32 parity exact.
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial down/up-sampling, optionally with 2x in time.

    Time follows the "first frame alone" rule of the VAE: the first frame of a video
    bypasses the temporal conv (it is an image), every later frame goes through it.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        self.time_conv: CausalConv3d | None = None
        if mode.startswith("up"):
            # The upsampler also halves the channels; the next stage is built for that.
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                # Predicts two output frames per input frame, stacked along channels.
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            # Pad right/bottom only, so even sizes halve exactly (stride 2, no padding).
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: Tensor, cache: TimeCache) -> Tensor:
        assert self.time_conv is not None
        parts: list[Tensor] = []
        if cache.get(self) is None:
            cache.put(self, True)
            # The temporal conv's own stream starts at frame 1, with zero history.
            parts.append(x[:, :, :1])
            x = x[:, :, 1:]
        if x.shape[2] > 0:
            y = self.time_conv(x, cache)
            b, c2, t, h, w = y.shape
            c = c2 // 2
            # Channel halves [a | b] of frame i become frames 2i (a) and 2i + 1 (b): two
            # copies into a buffer in x's layout (a reshape/permute would leave channels-
            # first behind and cost the next conv a layout conversion).
            out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=_layout(x))
            pairs = out.unflatten(2, (t, 2))
            pairs[:, :, :, 0] = y[:, :c]
            pairs[:, :, :, 1] = y[:, c:]
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _halve_time(self, x: Tensor, cache: TimeCache) -> Tensor:
        assert self.time_conv is not None
        # Output frame 0 is input frame 0 as is; then unpadded windows (2k, 2k+1, 2k+2).
        # Frames not yet consumed by a window wait in the cache for the next chunk.
        pending = cache.get(self)
        parts: list[Tensor] = []
        if pending is None:
            parts.append(x[:, :, :1])
            frames = x
        else:
            frames = torch.cat([pending, x], dim=2)
        windows = (frames.shape[2] - 1) // 2
        cache.put(self, frames[:, :, 2 * windows :].clone())
        if windows > 0:
            parts.append(self.time_conv(frames[:, :, : 2 * windows + 1]))
        if not parts:
            return x[:, :, :0]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last_3d for a channels-last video, else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _run_layers(layers: nn.Sequential, x: Tensor, cache: TimeCache) -> Tensor:
    mods = list(layers)
    i = 0
    while i < len(mods):
        layer = mods[i]
        if isinstance(layer, ChannelRMSNorm) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.SiLU):
            j = i + 2
            while j < len(mods) and isinstance(mods[j], nn.Identity):  # the dropout's empty slot
                j += 1
            conv = mods[j] if j < len(mods) else None
            if isinstance(conv, CausalConv3d) and conv.past_frames:
                # norm + SiLU written straight behind the conv's remembered frames
                ctx = conv.frames_buffer(x, cache)
                layer(x, silu=True, out=ctx[:, :, conv.past_frames :])
                x = conv(ctx, cache, buffered=True)
                i = j + 1
                continue
            x = layer(x, silu=True)  # one pass where a fused kernel is set
            i += 2
            continue
        x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        i += 1
    return x


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _mid_block(dim: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(dim, dim), FrameAttention(dim), ResBlock(dim, dim))


def _res_stage(blocks: list[nn.Module], in_dim: int, out_dim: int, count: int, attention: bool) -> None:
    for _ in range(count):
        blocks.append(ResBlock(in_dim, out_dim))
        if attention:
            blocks.append(FrameAttention(out_dim))
        in_dim = out_dim


# Encoder and decoder keep their blocks in one flat Sequential each (downsamples /
# upsamples) because the checkpoint numbers them consecutively across stages.


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        stages = len(cfg.dim_mult)
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i in range(stages):
            _res_stage(blocks, dims[i], dims[i + 1], cfg.num_res_blocks, 1.0 / 2**i in cfg.attn_scales)
            if i < stages - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(dims[i + 1], mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _mid_block(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return _run_layers(self.head, x, cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        stages = len(cfg.dim_mult)
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _mid_block(dims[0])
        blocks: list[nn.Module] = []
        for i in range(stages):
            # From stage 1 on the input comes from an upsampler, which halved the channels.
            in_dim = dims[i] // 2 if i > 0 else dims[i]
            scale = 2.0 ** (i + 2 - stages)
            _res_stage(blocks, in_dim, dims[i + 1], cfg.num_res_blocks + 1, scale in cfg.attn_scales)
            if i < stages - 1:
                blocks.append(Resample(dims[i + 1], "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor, cache: TimeCache, rows: tuple[int, int] | None = None) -> Tensor:
        """``rows``: only the output rows of latent rows ``[r0, r1)``, exactly as the
        whole frame has them (:func:`row_windows`)."""
        steps = (self.conv1, *self.middle, *self.upsamples, self.head)
        windows = row_windows(steps, x.shape[-2], rows) if rows is not None else None
        at = 0  # the first row of x, at x's resolution
        for i, step in enumerate(steps):
            # Cropped where a stage starts (after a whole-frame attention, at an upsampler,
            # before the head), not before every block: a crop copies the activation, and
            # a stage run on its entry window (which holds every inner one) stays exact.
            if windows is not None and (i == 0 or isinstance(steps[i - 1], FrameAttention)
                                        or isinstance(step, Resample) or step is self.head):  # fmt: skip
                x, at = _crop_rows(x, at, windows[i]), windows[i][0]
            if step is self.head:
                x = _run_layers(step, x, cache)
            else:
                x = step(x, cache)
            at *= _row_scale(step)
        if windows is not None:
            x = _crop_rows(x, at, windows[-1])
        return x


# --- a band of rows decoded exactly (the split decode of several GPUs) -----------------


def _row_scale(step: nn.Module) -> int:
    return 2 if isinstance(step, Resample) and step.mode.startswith("up") else 1


def _context_rows(step: nn.Module, after: float) -> float:
    """Rows of input context on each side that ``after`` rows of output context need
    (inf: the whole frame). A 3x3 conv reads one row on each side, a residual block two;
    an upsampler's conv reads one row at twice the resolution."""
    if isinstance(step, FrameAttention):
        return float("inf")
    if isinstance(step, Resample):
        if step.mode.startswith("up"):
            return -(-(after + 1) // 2) if after != float("inf") else after
        raise ValueError("row windows are for the decoder (no downsampling)")
    if isinstance(step, ResBlock):
        return after + 2
    if isinstance(step, CausalConv3d):
        return after + (step.kernel_size[1] - 1) // 2
    if isinstance(step, nn.Sequential):  # the head: norm, SiLU, conv
        for layer in reversed(list(step)):
            after = _context_rows(layer, after)
        return after
    if isinstance(step, (ChannelRMSNorm, nn.SiLU, nn.Identity)):
        return after
    raise TypeError(f"no row context known for {type(step).__name__}")


def row_windows(steps: tuple[nn.Module, ...], height: int, rows: tuple[int, int]) -> list[tuple[int, int]]:
    """The rows each step must see (at its input's resolution) so that the last one
    yields latent rows ``rows`` exactly, then the output window itself. Rows outside a
    window only feed rows that are cut off later: the convs' zero padding at a window's
    edge reaches no kept row, and at the frame's own edges the windows keep its padding."""
    r0, r1 = rows
    if not 0 <= r0 < r1 <= height:
        raise ValueError(f"rows {rows} outside the latent height {height}")
    scales = [1]
    for step in steps:
        scales.append(scales[-1] * _row_scale(step))
    windows: list[tuple[int, int]] = [(r0 * scales[-1], r1 * scales[-1])]
    after = 0.0
    for step, scale in zip(reversed(steps), reversed(scales[:-1])):
        after = _context_rows(step, after)
        if after == float("inf"):
            windows.append((0, height * scale))
        else:
            windows.append((max(0, r0 * scale - int(after)), min(height * scale, r1 * scale + int(after))))
    return windows[::-1]


def _crop_rows(x: Tensor, at: int, window: tuple[int, int]) -> Tensor:
    """x holds rows from ``at`` on; keep ``window`` (in the same layout, contiguous)."""
    lo, hi = window[0] - at, window[1] - at
    if lo == 0 and hi == x.shape[-2]:
        return x
    if lo < 0 or hi > x.shape[-2]:
        raise AssertionError(f"window {window} outside the rows held ({at}..{at + x.shape[-2]})")
    return x[..., lo:hi, :].contiguous(memory_format=_layout(x))


class WanVAE(nn.Module):
    """Encoder + decoder with the official parameter layout.

    The network runs in the dtype and on the device of its parameters (cast it with
    ``.to()``; there is no autocast here). Outputs are float32 (float64 for a float64
    model): latents are small, and pixels are about to be quantised anyway.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAEConfig()
        z = self.config.z_dim
        self.encoder = Encoder(self.config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(self.config)
        self._channels_last = False

    def _param(self) -> Tensor:
        return self.conv2.weight

    @property
    def channels_last(self) -> bool:
        """Whether activations run channels-last (NDHWC), see :meth:`set_channels_last`."""
        return self._channels_last

    def set_channels_last(self, on: bool = True) -> WanVAE:
        """Run activations channels-last (NDHWC) with the conv weights to match, or back.

        cuDNN's convolutions on recent GPUs work channels-last: fed channels-first they
        convert every input and output around the kernel. Measured on an H200
        (docs/benchmarks.md) before this became a default. Same results up to the
        convolutions' own summation order."""
        fmt3, fmt2 = (torch.channels_last_3d, torch.channels_last) if on else (torch.contiguous_format,) * 2
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt3)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt2)
        self._channels_last = on
        return self

    def _enter(self, x: Tensor) -> Tensor:
        # The first conv's output layout follows its input on some backends (CPU) and its
        # weight on others (cuDNN): set it once so every later layer sees one layout.
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _out_dtype(self) -> torch.dtype:
        return torch.promote_types(self._param().dtype, torch.float32)

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Built per call in >= fp32, so a bf16 model does not round the statistics.
        shape, dtype = (1, self.config.z_dim, 1, 1, 1), self._out_dtype()
        mean = torch.tensor(self.config.latents_mean, dtype=dtype, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=dtype, device=device).view(shape)
        return mean, std

    @torch.no_grad()
    def encode(self, video: Tensor, *, normalized: bool = True) -> Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> posterior mean ``[B, z, (F-1)//4 + 1, H/8, W/8]``.

        Returns ``(mu - mean) / std`` (the latent space the DiT works in), or the raw
        ``mu`` with ``normalized=False``. As in the reference, pixel frames past the last
        full group of 4 are ignored (use F = 4k + 1).
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video [B, 3, F, H, W], got shape {tuple(video.shape)}")
        if video.shape[3] % self.config.spatial_stride or video.shape[4] % self.config.spatial_stride:
            raise ValueError(f"video height and width must be multiples of {self.config.spatial_stride}")
        p = self._param()
        x = video.to(device=p.device, dtype=p.dtype)
        n_lat = self.config.latent_frames(x.shape[2])
        step = self.config.temporal_stride
        cache = TimeCache()
        # Chunks of 1, then `step` frames: each chunk yields exactly one latent frame.
        outs = [
            self.encoder(self._enter(x[:, :, max(0, 1 + step * (i - 1)) : 1 + step * i]), cache) for i in range(n_lat)
        ]
        mu = self.conv1(torch.cat(outs, dim=2))[:, : self.config.z_dim].to(self._out_dtype())
        if not normalized:
            return mu
        mean, std = self._stats(mu.device)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(
        self, latent: Tensor, *, normalized: bool = True, on_chunk: Callable[[Tensor], None] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:  # fmt: skip
        """``[B, z, T, h, w]`` -> video ``[B, 3, 4(T-1)+1, 8h, 8w]`` float32 in [-1, 1].

        ``latent`` is normalised (as :meth:`encode` returns it) unless ``normalized=False``.
        ``on_chunk`` sees each chunk of finished frames (1, then 4 per latent frame) as
        soon as it is decoded, so a consumer can start on them (a video encoder).
        ``rows``: only the pixel rows of latent rows ``[r0, r1)``, equal to those rows of
        the whole decode (several GPUs each decode a band: ``parallel/decode.py``).
        """
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim:
            raise ValueError(f"expected latents [B, {self.config.z_dim}, T, h, w], got {tuple(latent.shape)}")
        p = self._param()
        z = latent.to(device=p.device, dtype=self._out_dtype())
        if normalized:
            mean, std = self._stats(z.device)
            z = z * std + mean
        x = self._enter(self.conv2(z.to(p.dtype)))
        b, _, t, h, w = x.shape
        s = self.config.spatial_stride
        band = h if rows is None else rows[1] - rows[0]
        shape = (b, 3, self.config.video_frames(t), band * s, w * s)
        # Channels-last output too: its frames are then [T, H, W, 3] in memory already.
        out = torch.empty(shape, dtype=self._out_dtype(), device=p.device, memory_format=_layout(x))
        cache = TimeCache()
        at = 0
        # One latent frame per call bounds activation memory to a few pixel frames.
        for i in range(t):
            frames = self.decoder(self._enter(x[:, :, i : i + 1]), cache, rows)
            chunk = out[:, :, at : at + frames.shape[2]]
            chunk.copy_(frames).clamp_(-1.0, 1.0)
            at += frames.shape[2]
            if on_chunk is not None:
                on_chunk(chunk)
        return out

    @torch.no_grad()
    def decode_tiled(
        self, latent: Tensor, tile_px: int = 256, overlap_px: int = 64, *, normalized: bool = True
    ) -> Tensor:
        """:meth:`decode` in overlapping spatial tiles, linearly cross-faded.

        Peak memory scales with the tile instead of the frame. Not identical to
        :meth:`decode`, since a tile sees only its own pixels (edge convs, and the
        middle blocks' whole-frame attention). Measured (tests/test_vae.py): a
        spatially local decoder tiles exactly (max error 1.5e-8), so the blend itself
        is exact; the tiny random-weight model, whose receptive field is wider than
        its 96 px tiles (48 px overlap), differs by max 0.51 / mean 0.026 on a 96x160
        frame (pixels in [-1, 1]), a worst case. Sizes are rounded down to 8 px.
        """
        s = self.config.spatial_stride
        tile, overlap = max(1, tile_px // s), max(0, overlap_px // s)
        if overlap >= tile:
            raise ValueError(f"overlap_px ({overlap_px}) must be smaller than tile_px ({tile_px})")
        h, w = latent.shape[-2:]
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self.decode(latent, normalized=normalized)
        th, tw = min(tile, h), min(tile, w)
        wy, wx = _blend_weights(ys, th, s), _blend_weights(xs, tw, s)
        out: Tensor | None = None
        weight_sum = torch.zeros(h * s, w * s, dtype=torch.float64)
        for iy, y0 in enumerate(ys):
            for ix, x0 in enumerate(xs):
                piece = self.decode(latent[..., y0 : y0 + th, x0 : x0 + tw], normalized=normalized)
                if out is None:
                    out = piece.new_zeros(*piece.shape[:3], h * s, w * s)
                weight = wy[iy][:, None] * wx[ix][None, :]
                rows, cols = slice(y0 * s, (y0 + th) * s), slice(x0 * s, (x0 + tw) * s)
                out[..., rows, cols] += piece * weight.to(piece)
                weight_sum[rows, cols] += weight
        assert out is not None
        # A convex combination of clamped tiles stays inside [-1, 1]: no second clamp.
        return out.div_(weight_sum.to(out))


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis; the last tile is pushed back to end at the border
    so every tile has full size (the decoder then sees as much context as possible)."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def _blend_weights(starts: list[int], tile: int, px: int) -> list[Tensor]:
    """Per-tile 1-D pixel weights: 1 inside, linear ramps across each overlap.

    Ramps use half-pixel centres so two overlapping tiles sum to exactly 1 and no
    weight is ever 0 (the final division by the weight sum stays safe).
    """
    weights = []
    for k, a in enumerate(starts):
        wt = torch.ones(tile * px, dtype=torch.float64)
        if k > 0:
            n = (starts[k - 1] + tile - a) * px
            if n > 0:
                wt[:n] = torch.minimum(wt[:n], (torch.arange(n, dtype=torch.float64) + 0.5) / n)
        if k + 1 < len(starts):
            n = (a + tile - starts[k + 1]) * px
            if n > 0:
                wt[-n:] = torch.minimum(wt[-n:], 1.0 - (torch.arange(n, dtype=torch.float64) + 0.5) / n)
        weights.append(wt)
    return weights


# ---------------------------------------------------------------------------------------
# diffusers -> official names

# Inside a residual block diffusers names the layers, the checkpoint numbers them.
_RESBLOCK_NAMES = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.": "residual.2.",
    "norm2.gamma": "residual.3.gamma",
    "conv2.": "residual.6.",
    "conv_shortcut.": "shortcut.",
}
_TOP_NAMES = {
    r"(encoder|decoder)\.conv_in\.": r"\1.conv1.",
    r"(encoder|decoder)\.norm_out\.": r"\1.head.0.",
    r"(encoder|decoder)\.conv_out\.": r"\1.head.2.",
}
_MIDDLE_SLOTS = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}


def _block_suffix(rest: str) -> str:
    for old, new in _RESBLOCK_NAMES.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest  # resample.*, time_conv.*, norm.gamma, to_qkv.*, proj.* are shared names


def official_keys_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``AutoencoderKLWan`` (Wan 2.1 layout) state dict to the official names.

    Tensors are passed through untouched: the two layouts use the same shapes (norm
    ``gamma`` included). Raises ``ValueError`` for keys it does not know, e.g. the Wan 2.2
    (z_dim 48, residual up/down blocks) VAE, which this module does not implement.
    """
    if any(".avg_shortcut." in k or re.match(r"encoder\.down_blocks\.\d+\.resnets\.", k) for k in sd):
        raise ValueError("this is a Wan 2.2 (residual-block) VAE state dict; only the Wan 2.1 VAE is supported")
    # The decoder's stages are nested in diffusers but one flat list in the checkpoint:
    # stage i holds its resnets, then an optional upsampler, numbered consecutively.
    up_key = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.+)")
    n_res: dict[int, int] = {}
    n_up: dict[int, int] = {}
    for k in sd:
        if m := up_key.match(k):
            i = int(m.group(1))
            if m.group(2) is None:
                n_up[i] = 1
            else:
                n_res[i] = max(n_res.get(i, 0), int(m.group(2)) + 1)
    first = {i: sum(n_res[j] + n_up.get(j, 0) for j in n_res if j < i) for i in n_res}

    def rename(key: str) -> str:
        for old, new in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
            if key.startswith(old):
                return new + key[len(old) :]
        for old, new in _TOP_NAMES.items():
            if re.match(old, key):
                return re.sub(old, new, key)
        if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.+)", key):
            return f"{m.group(1)}.middle.{_MIDDLE_SLOTS[m.group(2)]}.{_block_suffix(m.group(3))}"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
            return f"encoder.downsamples.{m.group(1)}.{_block_suffix(m.group(2))}"
        if m := up_key.match(key):
            i = int(m.group(1))
            slot = first[i] + (n_res[i] if m.group(2) is None else int(m.group(2)))
            return f"decoder.upsamples.{slot}.{_block_suffix(m.group(3))}"
        raise ValueError(f"unexpected key in a diffusers Wan VAE state dict: {key!r}")

    return {rename(k): v for k, v in sd.items()}


def config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """:class:`VAEConfig` from an ``AutoencoderKLWan`` ``config.json`` (missing keys take
    diffusers' defaults, which are the Wan 2.1 values)."""
    base = VAEConfig()
    base_dim = int(cfg.get("base_dim", base.base_dim))
    unsupported = {
        "is_residual": bool(cfg.get("is_residual", False)),
        "patch_size": cfg.get("patch_size") not in (None, 1),
        "decoder_base_dim": cfg.get("decoder_base_dim") not in (None, base_dim),
        "in_channels": int(cfg.get("in_channels", 3)) != 3,
        "out_channels": int(cfg.get("out_channels", 3)) != 3,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        which = ", ".join(bad)
        raise ValueError(f"not a Wan 2.1 VAE config (unsupported: {which}); the Wan 2.2 VAE is not supported")
    values: dict[str, Any] = {
        "z_dim": int(cfg.get("z_dim", base.z_dim)),
        "base_dim": base_dim,
        "dim_mult": tuple(int(v) for v in cfg.get("dim_mult", base.dim_mult)),
        "num_res_blocks": int(cfg.get("num_res_blocks", base.num_res_blocks)),
        "attn_scales": tuple(float(v) for v in cfg.get("attn_scales", base.attn_scales)),
        "temporal_downsample": tuple(bool(v) for v in cfg.get("temperal_downsample", base.temporal_downsample)),
        "latents_mean": tuple(float(v) for v in cfg.get("latents_mean", base.latents_mean)),
        "latents_std": tuple(float(v) for v in cfg.get("latents_std", base.latents_std)),
    }
    return VAEConfig(**values)
