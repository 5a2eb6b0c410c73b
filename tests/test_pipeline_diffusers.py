"""Our I2V pipeline vs diffusers' WanImageToVideoPipeline on the same tiny weights.

Comparable settings: the same sigmas (diffusers' FlowMatchEulerDiscreteScheduler
fed ComfyUI's ``simple`` schedule; its default schedule differs by design), the
same prompt embeddings (given directly, so no tokenizer difference), equal shifts
for both experts (diffusers has one scheduler; ComfyUI workflows may use one
shift per expert, which diffusers cannot express), the boundary rule
(boundary_ratio 0.9 == our switch at step 2 for 4 steps at shift 5), cfg 1, and
an image already at the render size (the two resize differently by design:
ComfyUI centre-crops then resizes bilinearly without antialiasing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_models import TINY_DIT, tiny_dit

from wanrender.models import dit as ditmod
from wanrender.models.vae import WanVAE, config_from_diffusers, official_keys_from_diffusers
from wanrender.pipeline import i2v
from wanrender.pipeline.schedules import simple_sigmas

diffusers = pytest.importorskip("diffusers")


def _to_diffusers_dit(model: ditmod.WanDiT):
    from diffusers import WanTransformer3DModel

    cfg = model.cfg
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
    ).eval()  # fmt: skip
    inverse = {ditmod.official_key_from_diffusers(k): k for k in ref.state_dict()}
    ref.load_state_dict({inverse[k]: v for k, v in model.state_dict().items()})
    return ref


def test_latents_match_diffusers_pipeline() -> None:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from PIL import Image

    steps, frames, height, width, seed = 4, 9, 32, 48, 123
    sigmas = simple_sigmas(steps, 5.0)

    class ComfySimpleSchedule(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            self.num_inference_steps = num_inference_steps
            self.sigmas = sigmas.to(device)
            self.timesteps = (sigmas[:-1] * 1000).to(device)
            self._step_index = None
            self._begin_index = None

    torch.manual_seed(0)
    ref_vae = AutoencoderKLWan(base_dim=8, z_dim=16).eval()
    our_vae = WanVAE(config_from_diffusers(dict(ref_vae.config))).eval()
    our_vae.load_state_dict(official_keys_from_diffusers(ref_vae.state_dict()))
    high, low = tiny_dit(TINY_DIT, seed=21), tiny_dit(TINY_DIT, seed=22)
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=ref_vae, scheduler=ComfySimpleSchedule(shift=5.0),
        transformer=_to_diffusers_dit(high), transformer_2=_to_diffusers_dit(low), boundary_ratio=0.9,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    ctx = torch.randn(1, 8, TINY_DIT.text_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = pipe(
            image=Image.fromarray(pixels), prompt_embeds=ctx, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).frames  # fmt: skip

        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        cond = i2v.image_condition(our_vae, image, frames)
        noise = i2v.initial_noise(seed, i2v.latent_shape(frames, width, height))
        got = i2v.sample(high, low, noise, cond, ctx, i2v.Sampling(steps, 2, 1.0, 5.0, 5.0))
    assert got.shape == want.shape
    # fp32 on both sides; the VAE alone differs by ~1e-6 (see test_vae), the ComfyUI
    # noise re-scaling at the expert switch is an exact round trip up to rounding.
    err = ((got - want).norm() / want.norm()).item()
    print(f"relative error vs diffusers: {err:.2e}")
    assert err <= 2e-5
