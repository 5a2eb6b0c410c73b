"""Image-to-video, step by step, as ComfyUI's Wan 2.2 I2V workflow computes it.

1. ``image_condition``: the start image followed by gray frames, VAE-encoded, with
   the 4-channel first-frame mask in front (``WanImageToVideo``).
2. ``initial_noise``: seeded on the CPU in fp32, as ComfyUI's ``prepare_noise``.
3. ``sample``: pass 1 with the high-noise expert (noise added, leftover noise
   returned), pass 2 with the low-noise expert (no noise added) — two
   ``KSamplerAdvanced`` nodes.
4. ``decode``: VAE decode to uint8 RGB frames.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wanrender.pipeline.sampling import PassPlan, StepCallback, cfg_velocity, run_pass
from wanrender.spec import SPATIAL_STRIDE, Sampling, latent_frames

__all__ = ["Sampling", "passes", "image_condition", "initial_noise", "latent_shape", "sample", "decode"]

LATENT_CHANNELS = 16


def latent_shape(frames: int, width: int, height: int) -> tuple[int, int, int, int, int]:
    return (1, LATENT_CHANNELS, latent_frames(frames), height // SPATIAL_STRIDE, width // SPATIAL_STRIDE)


@torch.no_grad()
def image_condition(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """[3, H, W] image in [0, 1] -> [1, 4 + 16, T, H/8, W/8]: mask then image latent.

    The continuation frames are 0.5 gray (0 in the VAE's [-1, 1] range). The mask is
    1 on the first latent frame (the given image) and 0 elsewhere, in 4 channels:
    one per pixel frame that a latent frame stands for.
    """
    _, h, w = image.shape
    p = next(vae.parameters())
    video = torch.zeros(1, 3, frames, h, w, dtype=p.dtype, device=p.device)
    video[:, :, 0] = image.to(p.device, p.dtype) * 2 - 1
    latent = vae.encode(video).float()
    mask = torch.zeros(1, 4, *latent.shape[2:], device=latent.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded on the CPU in fp32, like ComfyUI: the same seed gives the same noise on any GPU."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, dtype=torch.float32, generator=g, device="cpu")


def passes(settings: Sampling) -> tuple[PassPlan, PassPlan]:
    """The two KSamplerAdvanced nodes of the workflow. At the edges (switch 0 or
    switch == steps) one expert runs the whole schedule: it then adds the noise
    itself, or denoises fully (ComfyUI's nodes would pass on an unnoised or
    still-noisy latent there, which is never what a user means)."""
    s = settings
    only_low, only_high = s.switch == 0, s.switch == s.steps
    high = PassPlan(s.steps, s.shift_high, 0, s.switch, True, not only_high, s.sampler)
    low = PassPlan(s.steps, s.shift_low, s.switch, s.steps, only_low, False, s.sampler)
    return high, low


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def sample(
    high: Denoiser,
    low: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor,
    context: torch.Tensor,
    settings: Sampling,
    negative: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    on_switch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Two KSamplerAdvanced passes; returns the final latent (fp32)."""
    p_high, p_low = passes(settings)
    latent = torch.zeros_like(noise)
    latent = run_pass(cfg_velocity(high, context, cond, settings.cfg, negative), latent, noise, p_high, callback)
    if on_switch is not None:
        on_switch()
    return run_pass(cfg_velocity(low, context, cond, settings.cfg, negative), latent, noise, p_low, callback)


@torch.no_grad()
def decode(vae, latent: torch.Tensor, tiled: bool = False, tile_px: int = 512,
           on_frames: Callable[[np.ndarray | HostFrames], None] | None = None) -> np.ndarray:  # fmt: skip
    """Latent -> uint8 RGB frames [T, H, W, 3]. ``on_frames`` gets them chunk by chunk
    while the rest still decodes (all at once at the end for a tiled decode); on a GPU
    as :class:`HostFrames`, which ``np.asarray`` turns into the array."""
    p = next(vae.parameters())
    z = latent.to(p.device)
    if tiled or on_frames is None:
        video = vae.decode_tiled(z, tile_px=tile_px, overlap_px=tile_px // 4) if tiled else vae.decode(z)
        frames = to_uint8(video)
        if on_frames is not None:
            on_frames(frames)
        return frames
    parts: list[np.ndarray | HostFrames] = []

    def on_chunk(chunk: torch.Tensor) -> None:
        # The same formula per chunk: bit-identical to the whole. On a GPU the copy to the
        # host is queued, not waited for: the decoder goes on while the frames travel.
        parts.append(to_uint8(chunk, wait=False))
        on_frames(parts[-1])

    vae.decode(z, on_chunk=on_chunk)
    return np.concatenate([np.asarray(p) for p in parts])


class HostFrames:
    """uint8 frames on their way to pinned host memory; ``np.asarray`` waits for them.
    The copy runs on the GPU's stream after the decode that made the frames, so whoever
    reads them (the encoder's thread) waits, not the thread that queues the GPU work."""

    def __init__(self, frames: torch.Tensor) -> None:
        # Under the frames' device: the copy goes on that device's stream, so the event
        # must too (a process rendering on cuda:1 need not have made it current).
        self._device = frames.device
        with torch.cuda.device(self._device):
            self._host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            self._host.copy_(frames, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(self._device))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # noqa: ANN001 - numpy's protocol
        # The encoder's thread has no current device of its own: without the guard it would
        # wake GPU 0's context there (memory a worker for another GPU must not take).
        with torch.cuda.device(self._device):
            self._done.synchronize()
        out = self._host.numpy()
        return out if dtype is None or np.dtype(dtype) == out.dtype else out.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._host.shape)


def uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] -> contiguous uint8 [T, H, W, 3] where the video is."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()


def to_uint8(video: torch.Tensor, wait: bool = True) -> np.ndarray | HostFrames:
    """[1, 3, T, H, W] in [-1, 1] -> contiguous uint8 [T, H, W, 3] on the host (made
    contiguous on the device: a strided host array costs the encoder a copy per frame;
    a channels-last video is laid out so already). With ``wait=False`` a CUDA video
    comes back as :class:`HostFrames`, still in transit."""
    frames = uint8_frames(video)
    if not wait and frames.is_cuda:
        return HostFrames(frames)
    return frames.cpu().numpy()
