"""Noise schedules, exactly as ComfyUI computes them for Wan (flow matching).

``ModelSamplingSD3`` (discrete flow, 1000 entries): ``sigmas[i] = shift*t / (1 + (shift-1)*t)``
with ``t = (i+1)/1000``, ascending, computed in float32 as ComfyUI does so that
the ``simple`` scheduler picks bit-identical values. The model's timestep is
``sigma * 1000``.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flow_sigma_table(shift: float, timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The 1000-entry ascending sigma table of ModelSamplingSD3 (float32)."""
    t = torch.arange(1, timesteps + 1, 1) / timesteps * NUM_TRAIN_TIMESTEPS
    return shifted(t / NUM_TRAIN_TIMESTEPS, shift)


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ``simple`` scheduler: evenly spaced picks from the table, then 0.

    N=4, shift=5 gives 1.0, 0.9375, 0.8333, 0.625, 0.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    table = flow_sigma_table(shift)
    stride = len(table) / steps
    picks = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(picks + [0.0], dtype=torch.float32)


def advanced_slice(sigmas: torch.Tensor, start: int, end: int, leftover_noise: bool) -> torch.Tensor:
    """The sigmas a ``KSamplerAdvanced(start_at_step, end_at_step)`` node uses.

    Ending early keeps the last sigma unless ``return_with_leftover_noise`` is off,
    in which case it is forced to 0 (the pass denoises fully). A start at or past
    the end leaves nothing to do (an empty schedule).
    """
    s = sigmas.clone()
    if end < len(s) - 1:
        s = s[: end + 1]
        if not leftover_noise:
            s[-1] = 0.0
    if start < len(s) - 1:
        return s[start:]
    return s[:0]


def boundary_switch_step(sigmas: torch.Tensor, boundary: float = 0.9) -> int:
    """The official Wan 2.2 rule: steps whose timestep is >= boundary*1000 use the
    high-noise expert. Returns the index of the first low-noise step."""
    t = sigmas[:-1] * NUM_TRAIN_TIMESTEPS
    high = (t >= boundary * NUM_TRAIN_TIMESTEPS).nonzero()
    return int(high[-1]) + 1 if len(high) else 0
