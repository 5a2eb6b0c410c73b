"""The two-expert I2V sampling: a step-by-step reference, seeds, samplers, and
diffusers' WanImageToVideoPipeline on the same tiny weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_models import TINY_DIT, tiny_dit

from wanrender.pipeline import i2v
from wanrender.pipeline.sampling import PassPlan, cfg_velocity, run_pass
from wanrender.pipeline.schedules import simple_sigmas

T, H, W = 3, 4, 6


def _setup(seed: int = 0):
    high, low = tiny_dit(TINY_DIT, seed=11), tiny_dit(TINY_DIT, seed=12)
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 20, T, H, W, generator=g)
    ctx = torch.randn(1, 6, TINY_DIT.text_dim, generator=g)
    neg = torch.randn(1, 6, TINY_DIT.text_dim, generator=g)
    noise = i2v.initial_noise(42, (1, 16, T, H, W))
    return high, low, cond, ctx, neg, noise


def _reference(high, low, cond, ctx, noise, steps, switch, sh, sl, cfg=1.0, neg=None):
    """Written out by hand from ComfyUI's KSamplerAdvanced + Euler + CONST scaling."""

    def v(model, x, s):
        t = torch.tensor([s * 1000.0])
        pos = model(x, t, ctx, cond)
        if cfg == 1.0:
            return pos
        return model(x, t, neg, cond) + cfg * (pos - model(x, t, neg, cond))

    s1 = simple_sigmas(steps, sh).tolist()[: switch + 1]  # leftover noise kept
    x = s1[0] * noise  # empty latent: not scaled
    for i in range(len(s1) - 1):
        x = x + (s1[i + 1] - s1[i]) * v(high, x, s1[i])
    latent = x / (1 - s1[-1])  # inverse_noise_scaling on return
    s2 = simple_sigmas(steps, sl).tolist()[switch:]
    x = (1 - s2[0]) * latent  # no noise added: noise_scaling with zero noise
    for i in range(len(s2) - 1):
        x = x + (s2[i + 1] - s2[i]) * v(low, x, s2[i])
    return x


@pytest.mark.parametrize("shifts", [(5.0, 5.0), (5.0, 6.0)])
def test_turbo_run_equals_step_by_step_reference(shifts) -> None:
    high, low, cond, ctx, _, noise = _setup()
    settings = i2v.Sampling(steps=4, switch=2, cfg=1.0, shift_high=shifts[0], shift_low=shifts[1])
    with torch.no_grad():
        got = i2v.sample(high, low, noise, cond, ctx, settings)
        want = _reference(high, low, cond, ctx, noise, 4, 2, *shifts)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_cfg_batched_equals_separate_passes() -> None:
    high, low, cond, ctx, neg, noise = _setup()
    settings = i2v.Sampling(steps=4, switch=2, cfg=3.5)
    with torch.no_grad():
        got = i2v.sample(high, low, noise, cond, ctx, settings, negative=neg)
        want = _reference(high, low, cond, ctx, noise, 4, 2, 5.0, 5.0, cfg=3.5, neg=neg)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_cfg_one_makes_no_uncond_pass() -> None:
    calls = []

    def model(x, t, c, cond):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    vel = cfg_velocity(model, torch.zeros(1, 2, 3), None, 1.0)
    vel(torch.zeros(1, 16, 1, 2, 2), 0.5)
    assert calls == [1]
    vel = cfg_velocity(model, torch.zeros(1, 2, 3), None, 2.0, torch.zeros(1, 2, 3))
    vel(torch.zeros(1, 16, 1, 2, 2), 0.5)
    assert calls == [1, 2]  # cond and uncond in one batch of two


def test_dpmpp_2m_matches_independent_formula() -> None:
    # A velocity field with a known form: v = x - x0_target (denoised = x0_target*sigma + x(1-sigma)).
    g = torch.Generator().manual_seed(3)
    target = torch.randn(1, 4, 2, 2, 2, generator=g)
    noise = torch.randn(1, 4, 2, 2, 2, generator=g)

    def velocity(x, s):
        return (x - target) * (1 + 0.3 * s)

    plan = PassPlan(6, 5.0, 0, 6, True, False, "dpmpp_2m")
    got = run_pass(velocity, torch.zeros_like(noise), noise, plan)
    sig = simple_sigmas(6, 5.0).tolist()
    x, old = sig[0] * noise, None
    for i in range(len(sig) - 1):
        den = x - velocity(x, sig[i]) * sig[i]
        if sig[i + 1] == 0:
            x = den
        else:
            t, tn = -math.log(sig[i]), -math.log(sig[i + 1])
            h = tn - t
            if old is None:
                d = den
            else:
                r = (t - (-math.log(sig[i - 1]))) / h
                d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (math.exp(-tn) / math.exp(-t)) * x - math.expm1(-h) * d
        old = den
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_same_seed_same_noise_other_seed_differs() -> None:
    a = i2v.initial_noise(7, (1, 16, 2, 4, 4))
    assert torch.equal(a, i2v.initial_noise(7, (1, 16, 2, 4, 4)))
    assert not torch.equal(a, i2v.initial_noise(8, (1, 16, 2, 4, 4)))
    # ComfyUI's prepare_noise: torch.randn on a CPU generator seeded with manual_seed.
    assert torch.equal(a, torch.randn((1, 16, 2, 4, 4), generator=torch.manual_seed(7)))


def _single_pass(model, cond, ctx, noise, steps, shift):
    sig = simple_sigmas(steps, shift).tolist()
    x = sig[0] * noise
    for i in range(len(sig) - 1):
        x = x + (sig[i + 1] - sig[i]) * model(x, torch.tensor([sig[i] * 1000.0]), ctx, cond)
    return x


def test_switch_edges_run_one_expert_over_the_whole_schedule() -> None:
    high, low, cond, ctx, _, noise = _setup()
    with torch.no_grad():
        only_low = i2v.sample(high, low, noise, cond, ctx, i2v.Sampling(4, 0))
        only_high = i2v.sample(high, low, noise, cond, ctx, i2v.Sampling(4, 4))
        want_l = _single_pass(low, cond, ctx, noise, 4, 5.0)
        want_h = _single_pass(high, cond, ctx, noise, 4, 5.0)
    torch.testing.assert_close(only_low, want_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only_high, want_h, rtol=1e-5, atol=1e-5)
