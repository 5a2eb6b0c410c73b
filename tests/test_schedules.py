"""Schedules vs an independent transcription of ComfyUI's formulas."""

import math

import pytest
import torch

from wanrender.pipeline.schedules import advanced_slice, boundary_switch_step, simple_sigmas


def comfy_reference(steps: int, shift: float, start: int, end: int, leftover: bool) -> list[float]:
    # ModelSamplingDiscreteFlow: sigma(t) = shift*t/(1+(shift-1)*t) for t=i/1000,
    # i = 1..1000, float32 tensor; simple scheduler picks sigmas[-(1+int(x*len/steps))].
    ts = torch.arange(1, 1001, 1) / 1000 * 1000
    t = ts / 1000.0
    table = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    sigs = [float(table[-(1 + int(x * (len(table) / steps)))]) for x in range(steps)] + [0.0]
    sigmas = torch.FloatTensor(sigs)
    # KSampler.sample with start_step/last_step (force_full_denoise = not leftover).
    if end < len(sigmas) - 1:
        sigmas = sigmas[: end + 1]
        if not leftover:
            sigmas[-1] = 0
    if start < len(sigmas) - 1:
        sigmas = sigmas[start:]
    else:
        sigmas = sigmas[:0]
    return sigmas.tolist()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 20, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_every_split_matches_comfy(steps: int, shift: float) -> None:
    full = simple_sigmas(steps, shift)
    for start in range(steps + 1):
        for end in range(start, steps + 2):
            for leftover in (False, True):
                got = advanced_slice(full, start, end, leftover).tolist()
                assert got == comfy_reference(steps, shift, start, end, leftover), (start, end, leftover)


def test_known_values() -> None:
    s = simple_sigmas(4, 5.0).tolist()
    assert [round(v, 4) for v in s] == [1.0, 0.9375, 0.8333, 0.625, 0.0]
    # A turbo split: pass 1 keeps its leftover noise at 0.8333, pass 2 ends at 0.
    assert advanced_slice(simple_sigmas(4, 5.0), 0, 2, True).tolist()[-1] == pytest.approx(0.8333, abs=1e-4)
    assert advanced_slice(simple_sigmas(4, 5.0), 0, 2, False).tolist()[-1] == 0.0


def test_boundary_rule() -> None:
    # 40 steps, shift 5: steps with t >= 900 use the high-noise expert.
    sig = simple_sigmas(40, 5.0)
    k = boundary_switch_step(sig, 0.9)
    assert all(float(s) * 1000 >= 900 for s in sig[:k])
    assert float(sig[k]) * 1000 < 900
    assert boundary_switch_step(simple_sigmas(4, 5.0), 0.9) == 2
    assert not math.isnan(k)
