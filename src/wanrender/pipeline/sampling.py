"""The two-expert sampling loop with ComfyUI ``KSamplerAdvanced`` semantics.

All latents here are in the VAE's normalised latent space. ComfyUI's flow models
scale noise as ``x = sigma*noise + (1-sigma)*latent`` on entry to a pass and undo
it (``latent = x / (1-sigma_last)``) on return; between two passes whose experts
have different shifts, the second pass re-enters at *its own* schedule's sigma.
That is reproduced here because it is what users' workflows compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wanrender.pipeline.schedules import advanced_slice, simple_sigmas
from wanrender.spec import SAMPLERS

# velocity(x, sigma) -> v; sigma is a Python float (no device sync in the loop).
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class PassPlan:
    """One KSamplerAdvanced node."""

    steps: int
    shift: float
    start: int
    end: int
    add_noise: bool
    leftover_noise: bool
    sampler: str = "euler"

    def sigmas(self) -> torch.Tensor:
        return advanced_slice(simple_sigmas(self.steps, self.shift), self.start, self.end, self.leftover_noise)


def _denoised(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    return x - v * sigma


def euler(velocity: VelocityFn, x: torch.Tensor, sigmas: list[float], callback: StepCallback | None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback:
            callback(i, len(sigmas) - 1, sigmas[i])
    return x


def dpmpp_2m(velocity: VelocityFn, x: torch.Tensor, sigmas: list[float], callback: StepCallback | None) -> torch.Tensor:
    """DPM-Solver++(2M) as ComfyUI runs it on flow models: second order from the
    previous step's prediction, one model call per step, first order on the first
    and on the final (sigma -> 0) step."""
    import math

    old: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = _denoised(x, velocity(x, s), s)
        if s_next == 0:
            x = den
        else:
            h = math.log(s) - math.log(s_next)
            if old is None:
                d = den
            else:
                r = (math.log(sigmas[i - 1]) - math.log(s)) / h
                d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
        old = den
        if callback:
            callback(i, len(sigmas) - 1, s)
    return x


def run_pass(
    velocity: VelocityFn,
    latent: torch.Tensor,
    noise: torch.Tensor,
    plan: PassPlan,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """One KSamplerAdvanced call: returns the latent, leftover noise included."""
    if plan.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {plan.sampler!r}; choose one of {SAMPLERS}")
    sig = [float(s) for s in plan.sigmas()]
    if len(sig) < 2:
        return latent
    n = noise if plan.add_noise else torch.zeros_like(noise)
    # An all-zero latent is not scaled (ComfyUI skips empty latents), so the
    # first pass starts from sigma0 * noise.
    x = sig[0] * n + (1.0 - sig[0]) * latent
    step = euler if plan.sampler == "euler" else dpmpp_2m
    x = step(velocity, x, sig, callback)
    return x / (1.0 - sig[-1]) if sig[-1] != 0 else x


def cfg_velocity(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    context: torch.Tensor,
    cond: torch.Tensor | None,
    cfg: float,
    negative: torch.Tensor | None = None,
) -> VelocityFn:
    """Wrap a DiT into velocity(x, sigma) with classifier-free guidance.

    cfg == 1 makes no unconditional pass at all; otherwise cond and uncond run as
    one batch of two. CFG on the velocity equals ComfyUI's CFG on the denoised
    prediction (the two are affine in each other with the same x).
    """
    if cfg != 1.0 and negative is None:
        raise ValueError("cfg != 1 needs a negative prompt embedding")
    if cfg == 1.0:

        def single(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
            return model(x, t, context, cond)

        return single
    ctx2 = torch.cat([context, negative], 0)
    cond2 = torch.cat([cond, cond], 0) if cond is not None else None

    def guided(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((2 * x.shape[0],), sigma * 1000.0, device=x.device)
        pos, neg = model(torch.cat([x, x], 0), t, ctx2, cond2).chunk(2)
        return neg + (pos - neg) * cfg

    return guided
