"""A band of rows decoded alone (``WanVAE.decode(rows=...)``, the split decode of
``generate --gpus N``) equals those rows of the whole decode (CPU, tiny random VAEs)."""

from __future__ import annotations

import pytest
import torch

from wanrender.models.vae import VAEConfig, WanVAE, row_windows


def _vae(cfg: VAEConfig, dtype: torch.dtype = torch.float64) -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(cfg).to(dtype).eval()
    for p in vae.parameters():  # gains away from 1 and weights large enough that every row mixes
        p.data = p.data.normal_(0, 0.2) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    return vae


def _latent(height: int, width: int = 6, frames: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(height), dtype=dtype)


# fp64: the band runs the same convolutions on fewer rows, so only the summation order
# can differ (measured up to 2.1e-15 on outputs in [-1, 1]). A last window one row too
# small lets a conv's zero padding into a kept row: errors of order 0.1 (checked below);
# in early windows such an error fades through the later blocks, so every window is
# also checked against autograd's dependencies (the last test).
TOL = 1e-12


@pytest.mark.parametrize("rows", [(0, 5), (5, 11), (11, 20), (0, 20), (19, 20), (7, 8)])
def test_a_band_equals_its_rows_of_the_whole_decode(rows: tuple[int, int]) -> None:
    vae = _vae(VAEConfig.preset("demo"))
    z = _latent(20)
    whole = vae.decode(z)
    band = vae.decode(z, rows=rows)
    assert band.shape == (1, 3, 9, 8 * (rows[1] - rows[0]), 48)
    assert (band - whole[..., 8 * rows[0] : 8 * rows[1], :]).abs().max().item() < TOL


def test_channels_last_bands_and_their_chunks() -> None:
    vae = _vae(VAEConfig.preset("demo")).set_channels_last(True)
    z = _latent(12)
    whole = vae.decode(z)
    chunks: list = []
    band = vae.decode(z, rows=(4, 9), on_chunk=chunks.append)
    assert band.is_contiguous(memory_format=torch.channels_last_3d)
    assert [c.shape[2] for c in chunks] == [1, 4, 4] and all(c.shape[3] == 40 for c in chunks)
    assert (band - whole[..., 32:72, :]).abs().max().item() < TOL


def test_attention_in_an_upsampling_stage_keeps_the_whole_frame_until_after_it() -> None:
    # Wan's decoder has attention only in its middle block; a config with attention in
    # its third stage (scale 1.0: after two upsamplers) makes every window up to there
    # the whole frame at its resolution.
    cfg = VAEConfig(base_dim=8, attn_scales=(1.0,))
    vae = _vae(cfg)
    d = vae.decoder
    steps = (d.conv1, *d.middle, *d.upsamples, d.head)
    windows = row_windows(steps, 10, (3, 6))
    last_attention = max(i for i, s in enumerate(steps) if type(s).__name__ == "FrameAttention")
    heights = [10]
    for step in steps:
        heights.append(heights[-1] * (2 if getattr(step, "mode", "").startswith("up") else 1))
    assert all(w == (0, h) for w, h in zip(windows[: last_attention + 1], heights))
    assert windows[last_attention + 1] != (0, heights[last_attention + 1]) and windows[-1] == (24, 48)
    z = _latent(10)
    assert (vae.decode(z, rows=(3, 6)) - vae.decode(z)[..., 24:48, :]).abs().max().item() < TOL


def test_windows_are_no_wider_than_needed_and_a_smaller_one_is_wrong(monkeypatch) -> None:
    import wanrender.models.vae as vae_mod

    vae = _vae(VAEConfig.preset("demo"))
    d = vae.decoder
    steps = (d.conv1, *d.middle, *d.upsamples, d.head)
    # The margins of Wan's decoder (3x3 convs: a residual block reads 2 rows a side, an
    # upsampler's conv 1 at twice the resolution): 13 latent rows before the first stage,
    # 7 at full resolution.
    windows = row_windows(steps, 100, (40, 60))
    first_stage = len((d.conv1, *d.middle))
    assert windows[first_stage] == (40 - 13, 60 + 13) and windows[-2] == (320 - 1, 480 + 1)
    z = _latent(20)
    whole = vae.decode(z)
    real = vae_mod.row_windows

    def one_row_short(*a):
        w = real(*a)
        lo, hi = w[-2]
        return [*w[:-2], (lo + 1 if lo else lo, hi - 1 if hi < 160 else hi), w[-1]]

    monkeypatch.setattr(vae_mod, "row_windows", one_row_short)
    gap = (vae.decode(z, rows=(5, 11)) - whole[..., 40:88, :]).abs().max().item()
    assert gap > 1e-3  # the zero padding reached a kept row


def test_rows_outside_the_frame_are_refused() -> None:
    vae = _vae(VAEConfig.preset("demo"), torch.float32)
    with pytest.raises(ValueError, match=r"rows \(3, 3\) outside the latent height 8"):
        vae.decode(_latent(8, dtype=torch.float32), rows=(3, 3))
    with pytest.raises(ValueError, match=r"rows \(6, 9\) outside"):
        vae.decode(_latent(8, dtype=torch.float32), rows=(6, 9))


def _run(step: torch.nn.Module, x: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    from wanrender.models.vae import TimeCache, _run_layers

    cache = TimeCache()  # a first chunk: no history
    return _run_layers(step, x, cache) if step is head else step(x, cache)


@pytest.mark.parametrize("cfg", [VAEConfig.preset("demo"), VAEConfig(base_dim=8, attn_scales=(1.0,))])
def test_each_window_is_exactly_the_rows_the_next_one_depends_on(cfg: VAEConfig) -> None:
    """Autograd's answer, step by step: the input rows that the next window's rows
    depend on are exactly this window (never fewer: a row short lets the zero padding
    in; never more: wasted work). A whole-decode comparison could not show an early
    window one row short: its error fades through the later blocks (to 1e-16)."""
    from wanrender.models.vae import FrameAttention

    vae = _vae(cfg)
    d = vae.decoder
    steps = (d.conv1, *d.middle, *d.upsamples, d.head)
    height = 13
    x = vae.conv2(_latent(height, width=4, frames=1))
    inputs = []
    with torch.no_grad():
        for step in steps:  # every step's whole-frame input
            inputs.append(x)
            x = _run(step, x, d.head)
    for rows in ((0, 4), (4, 9), (9, 13), (6, 7), (0, 13)):
        windows = row_windows(steps, height, rows)
        for i, step in enumerate(steps):
            if isinstance(step, FrameAttention):
                continue  # reads the whole frame: its window is the whole frame by construction
            xi = inputs[i].detach().clone().requires_grad_(True)
            lo, hi = windows[i + 1]
            _run(step, xi, d.head)[..., lo:hi, :].sum().backward()
            used = xi.grad.abs().sum(dim=(0, 1, 2, 4)).nonzero().flatten()
            assert (int(used.min()), int(used.max()) + 1) == windows[i], (rows, i, type(step).__name__)
