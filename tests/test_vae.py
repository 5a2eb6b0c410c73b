"""Wan 2.1 VAE: parity with diffusers, causality, tiling, key layout, shapes (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch

from wanrender.models.random_init import init_random_
from wanrender.models.vae import (
    PRESETS,
    VAEConfig,
    WanVAE,
    config_from_diffusers,
    official_keys_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

TINY = VAEConfig.preset("demo")  # base_dim 8, otherwise the full architecture


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _randomize_gammas(model: torch.nn.Module, seed: int) -> None:
    # Conv weights and biases keep torch's seeded (non-zero, fan-in scaled) init; the norm
    # gains start at exactly 1, which would hide a mixed-up gamma, so spread them.
    init_random_(model, seed, gain_std=0.25, only=lambda name: name.endswith("gamma"))


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderKLWan, WanVAE]:
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=TINY.base_dim, z_dim=TINY.z_dim).eval()
    _randomize_gammas(ref, seed=1)
    ours = WanVAE(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(official_keys_from_diffusers(ref.state_dict()), strict=True)
    return ref, ours


def _video(frames: int, h: int = 32, w: int = 48, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1


# fp32 tolerance. Measured on CPU: 0.0 (same op order as diffusers, so bit-identical).
# Other kernels (GPU, another BLAS, an attention layout) round differently by ~1 ulp, and
# this random-weight decoder amplifies that ~20x: an earlier variant of our norm and
# attention gave 8e-7 (encode) and 6.4e-6 (decode); diffusers' own fp32 decode is 2.5e-6
# off its fp64 decode. 1e-5 sits above that floor; a wrong cache frame, layer index or
# norm gives O(1) errors.
FP32_TOL = 1e-5


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_match_diffusers_fp32(pair, frames: int) -> None:
    ref, ours = pair
    x = _video(frames)
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mean
    mu = ours.encode(x, normalized=False)
    assert mu.shape == mu_ref.shape == (1, 16, (frames - 1) // 4 + 1, 4, 6)
    assert rel_err(mu, mu_ref) <= FP32_TOL

    z = mu_ref * 3.0  # the decoder sees un-normalised latents of a few units in practice
    with torch.no_grad():
        video_ref = ref.decode(z).sample
    video = ours.decode(z, normalized=False)
    assert video.shape == video_ref.shape == (1, 3, frames, 32, 48)
    # The comparison would be vacuous if everything were clamped to +-1.
    assert (video_ref.abs() < 1).float().mean() > 0.9
    assert rel_err(video, video_ref) <= FP32_TOL


def test_channels_last_matches_diffusers_and_switches_back(pair) -> None:
    """NDHWC activations (what cuDNN convolves without layout conversions) give the same
    video and latents; on the CPU the convolutions may return either layout, so this
    also covers a network whose layers see both."""
    ref, ours = pair
    x = _video(9)
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mean
        video_ref = ref.decode(mu_ref * 3.0).sample
    try:
        assert ours.set_channels_last(True).channels_last
        mu = ours.encode(x, normalized=False)
        video = ours.decode(mu_ref * 3.0, normalized=False)
        assert video.is_contiguous(memory_format=torch.channels_last_3d)  # frames land as [T, H, W, 3]
    finally:
        ours.set_channels_last(False)
    assert rel_err(mu, mu_ref) <= FP32_TOL and rel_err(video, video_ref) <= FP32_TOL
    assert not ours.channels_last and all(p.is_contiguous() for p in ours.parameters())


def test_fp64_parity_is_structural(pair) -> None:
    # In fp64 rounding vanishes, so agreement must be near-exact. Only diffusers'
    # upsampler rounds its input to fp32 (a bf16 workaround), hence 1e-6 for decode.
    ref, ours = pair
    ref64 = AutoencoderKLWan(base_dim=TINY.base_dim).eval().double()
    ref64.load_state_dict(ref.state_dict())
    ours64 = WanVAE(TINY).eval().double()
    ours64.load_state_dict(ours.state_dict())
    x = _video(9).double()
    with torch.no_grad():
        mu_ref = ref64.encode(x).latent_dist.mean
        video_ref = ref64.decode(mu_ref * 3.0).sample
    assert rel_err(ours64.encode(x, normalized=False), mu_ref) <= 1e-12
    assert rel_err(ours64.decode(mu_ref * 3.0, normalized=False), video_ref) <= 1e-6


def test_normalisation_matches_pipeline_convention(pair) -> None:
    # diffusers' Wan pipelines normalise outside the VAE: (mu - mean) / std, and back.
    ref, ours = pair
    x = _video(5)
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mean
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    z = ours.encode(x)
    assert rel_err(z, (mu_ref - mean) / std) <= FP32_TOL
    with torch.no_grad():
        video_ref = ref.decode(z * std + mean).sample
    assert rel_err(ours.decode(z), video_ref) <= FP32_TOL


def test_encoder_and_decoder_are_causal(pair) -> None:
    _, ours = pair
    x = _video(9)
    long, short = ours.encode(x), ours.encode(x[:, :, :5])
    assert short.shape[2] == 2
    # Same chunks, same ops: the first two latent frames cannot see frames 5..8.
    torch.testing.assert_close(long[:, :, :2], short, rtol=0, atol=1e-6)
    video_long, video_short = ours.decode(long), ours.decode(long[:, :, :2])
    torch.testing.assert_close(video_long[:, :, :5], video_short, rtol=0, atol=1e-6)


def _make_spatially_local(model: WanVAE) -> WanVAE:
    """Keep only the centre tap of every spatial kernel and silence the attention, so each
    output pixel depends on one latent pixel: then tiling must be exact (up to rounding)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.kernel_size[-1] == 3:
                centre = m.weight[..., 1:2, 1:2].clone()
                m.weight.zero_()
                m.weight[..., 1:2, 1:2] = centre
        for attn in (model.decoder.middle[1], model.encoder.middle[1]):
            attn.proj.weight.zero_()
            attn.proj.bias.zero_()
    return model


@pytest.mark.parametrize("tile_px,overlap_px", [(64, 32), (64, 16), (48, 0), (80, 24)])
def test_tiled_decode_blends_exactly_for_a_local_decoder(pair, tile_px: int, overlap_px: int) -> None:
    _, ours = pair
    local = WanVAE(TINY).eval()
    local.load_state_dict(ours.state_dict())
    _make_spatially_local(local)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 2, 12, 20, generator=g)  # 96x160 px; last tiles are shifted back
    full, tiled = local.decode(z), local.decode_tiled(z, tile_px=tile_px, overlap_px=overlap_px)
    assert tiled.shape == full.shape == (1, 3, 5, 96, 160)
    # Measured ~1e-7: the blend weights form a partition of unity and tiles are placed right.
    assert (tiled - full).abs().max().item() <= 1e-5


def test_tiled_decode_close_to_untiled(pair) -> None:
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 16, 2, 12, 20, generator=g)
    full = ours.decode(z)
    assert torch.equal(ours.decode_tiled(z, tile_px=256, overlap_px=64), full)  # one tile: plain decode
    err = (ours.decode_tiled(z, tile_px=96, overlap_px=48) - full).abs()
    # Random weights are the worst case: the tiny decoder's receptive field (~+-13 latent
    # px) exceeds the 12-px tiles and the middle attention spans the whole frame. Measured
    # max 0.51, mean 0.026 (pixels in [-1, 1]); without the linear ramps the mean is 0.044.
    assert err.mean().item() <= 0.035
    assert err.max().item() <= 1.0


def test_shapes_81_to_21_arithmetic() -> None:
    cfg = VAEConfig.preset("wan2.1")
    assert (cfg.temporal_stride, cfg.spatial_stride) == (4, 8)
    assert cfg.latent_frames(81) == 21 and cfg.video_frames(21) == 81
    assert [cfg.latent_frames(f) for f in (1, 5, 9, 17)] == [1, 2, 3, 5]
    torch.manual_seed(0)
    vae = WanVAE(TINY).eval()
    z = vae.encode(torch.zeros(2, 3, 17, 16, 24))
    assert z.shape == (2, 16, 5, 2, 3) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, 17, 16, 24)
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(1, 3, 5, 20, 24))  # not a multiple of 8


def test_full_size_key_layout_is_official() -> None:
    # Both directions against diffusers: its own official->diffusers converter (written for
    # Wan2.1_VAE.pth) must map our keys onto AutoencoderKLWan's, and ours must invert it.
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        ref = AutoencoderKLWan()
        ours = WanVAE(VAEConfig.preset("wan2.1"))
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert len(ours_shapes) == 194
    assert {k: v.shape for k, v in official_keys_from_diffusers(ref.state_dict()).items()} == ours_shapes
    assert {k: v.shape for k, v in convert_wan_vae_to_diffusers(ours.state_dict()).items()} == ref_shapes
    assert config_from_diffusers(dict(ref.config)) == PRESETS["wan2.1"]


def test_rejects_wan22_vae() -> None:
    with pytest.raises(ValueError):
        config_from_diffusers({"is_residual": True, "z_dim": 48, "patch_size": 2})
    with pytest.raises(ValueError):
        official_keys_from_diffusers({"decoder.up_blocks.0.avg_shortcut.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        VAEConfig.preset("nope")


@pytest.mark.parametrize("dtype,mean_tol", [(torch.bfloat16, 0.03), (torch.float16, 0.01)])
def test_half_precision_stays_close(pair, dtype: torch.dtype, mean_tol: float) -> None:
    _, ours = pair
    half = WanVAE(TINY).eval().to(dtype)
    half.load_state_dict(ours.state_dict())
    x = _video(5)
    z32 = ours.encode(x)
    z = half.encode(x)
    video = half.decode(z32)
    assert z.dtype == video.dtype == torch.float32
    assert torch.isfinite(video).all()
    # Measured mean abs error of the decode: bf16 6.5e-3, fp16 8e-4 (pixels in [-1, 1]).
    assert (z - z32).abs().mean().item() <= mean_tol
    assert (video - ours.decode(z32)).abs().mean().item() <= mean_tol
