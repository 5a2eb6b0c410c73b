"""The embedded demo: tiny random-weight models of the real architecture, written
once to the cache in the formats users download (ComfyUI fp8_scaled experts, a
text encoder file that carries its tokenizer, 4-step-style LoRAs), so that the
demo runs the real loading code and the real pipeline end to end on any laptop.

The weights are random: the video shows structured noise, not the photo's motion.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wanrender.engine import ModelFiles
from wanrender.models.random_init import init_random_, train_tokenizer
from wanrender.paths import home as cache_dir

log = logging.getLogger(__name__)

DEMO_VERSION = 1
SEED = 20251123
_WORDS = (
    "snow winter bear cub fur light soft gentle camera motion slow dolly pan zoom tilt warm cold sky cloud "
    "mountain river forest tree leaf wind breeze sparkle crisp detail fabric texture smooth calm breathing "
    "subtle micro movement cinematic scene natural lighting golden hour portrait face smile eyes hair city "
    "street night neon rain reflection car walk run jump dance water wave ocean beach sand sun sunset dawn "
    "red blue green yellow white black gray bright dark sharp blur focus depth field wide close shot frame"
).split()


def demo_dir() -> Path:
    return cache_dir() / f"demo-models-v{DEMO_VERSION}"


def demo_image() -> Path:
    """A real photo shipped with scikit-image (the astronaut Eileen Collins, public domain)."""
    from skimage import data

    path = Path(data.__file__).parent / "astronaut.png"
    if not path.is_file():  # older layouts keep images elsewhere: write one
        from PIL import Image

        path = cache_dir() / "demo-astronaut.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.astronaut()).save(path)
    return path


def _demo_lora(dit_cfg, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A lightx2v-style LoRA (lora_down/lora_up/alpha, ``diffusion_model.`` prefix)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(dit_cfg.num_layers):
        for part in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o"):
            key = f"diffusion_model.blocks.{i}.{part}"
            out[key + ".lora_down.weight"] = torch.randn(rank, dit_cfg.dim, generator=g) * 0.05
            out[key + ".lora_up.weight"] = torch.randn(dit_cfg.dim, rank, generator=g) * 0.05
            out[key + ".alpha"] = torch.tensor(float(rank))
    return out


def build_demo_models(folder: Path) -> None:
    from wanrender.models.dit import DiTConfig, WanDiT
    from wanrender.models.export import convert_state, save_safetensors
    from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder
    from wanrender.models.vae import VAEConfig, WanVAE

    te_cfg = TextEncoderConfig.preset("demo")
    dit_cfg = DiTConfig.preset("demo")
    assert dit_cfg.text_dim == te_cfg.dim
    for i, expert in enumerate(("high", "low")):
        dit = init_random_(WanDiT(dit_cfg), SEED + i, fan_in=True)
        tensors, meta = convert_state(dit.state_dict(), "fp8_scaled")
        meta["wanrender.config"] = json.dumps(dit_cfg.to_dict())
        save_safetensors(tensors, folder / f"wan2.2_i2v_{expert}_noise_demo_fp8_scaled.safetensors", meta)
        save_safetensors(_demo_lora(dit_cfg, SEED + 10 + i), folder / f"demo_4step_lora_{expert}_noise.safetensors")
    vae = init_random_(WanVAE(VAEConfig.preset("demo")), SEED + 2, fan_in=True)
    tensors, _ = convert_state(vae.state_dict(), "fp32")
    save_safetensors(tensors, folder / "wan_2.1_vae_demo.safetensors")
    te = init_random_(UMT5Encoder(te_cfg), SEED + 3, fan_in=True)
    tensors, _ = convert_state(te.state_dict(), "bf16")
    spiece = train_tokenizer(_WORDS, vocab=te_cfg.vocab, seed=SEED)
    tensors["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_safetensors(tensors, folder / "umt5_demo_bf16.safetensors")
    (folder / "README.txt").write_text(
        "Tiny RANDOM-WEIGHT models of the Wan 2.2 I2V architecture, made by 'wanrender demo'.\n"
        "They exercise the real pipeline; they cannot make a meaningful video.\n"
    )


def ensure_demo_models() -> ModelFiles:
    folder = demo_dir()
    if not (folder / "README.txt").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
        try:
            log.info("building the demo models (random weights) in %s", folder)
            build_demo_models(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ModelFiles(
        high=folder / "wan2.2_i2v_high_noise_demo_fp8_scaled.safetensors",
        low=folder / "wan2.2_i2v_low_noise_demo_fp8_scaled.safetensors",
        vae=folder / "wan_2.1_vae_demo.safetensors",
        text_encoder=folder / "umt5_demo_bf16.safetensors",
        tokenizer=folder / "umt5_demo_bf16.safetensors",
        lora_high=folder / "demo_4step_lora_high_noise.safetensors",
        lora_low=folder / "demo_4step_lora_low_noise.safetensors",
    )
