"""Write tiny DiT checkpoints in every format users have."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wanrender.models import dit as ditmod
from wanrender.models.export import convert_state, save_safetensors, save_sharded

DIT_FORMATS = ("comfy-bf16", "comfy-fp16", "fp8_scaled", "fp8_scaled_v2", "fp8_e4m3fn", "official", "diffusers")


def diffusers_config(cfg: ditmod.DiTConfig) -> dict:
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
    }


def official_config(cfg: ditmod.DiTConfig) -> dict:
    return {
        "_class_name": "WanModel",
        "model_type": "i2v" if cfg.is_i2v else "t2v",
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_channels,
        "out_dim": cfg.out_channels,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "text_len": cfg.text_len,
        "eps": cfg.eps,
        "patch_size": list(cfg.patch_size),
    }


def write_dit(model: ditmod.WanDiT, fmt: str, where: Path, name: str = "dit") -> Path:
    """Save ``model`` as ``fmt``; returns what a user would pass to the loader."""
    sd = model.state_dict()
    cfg_meta = {"wanrender.config": json.dumps(model.cfg.to_dict())}
    if fmt == "comfy-bf16":
        tensors, meta = convert_state(sd, "bf16", prefix="model.diffusion_model.")
        return save_safetensors(tensors, where / f"{name}_bf16.safetensors", {**meta, **cfg_meta})
    if fmt == "comfy-fp16":
        tensors, meta = convert_state(sd, "fp16")
        return save_safetensors(tensors, where / f"{name}_fp16.safetensors", {**meta, **cfg_meta})
    if fmt in ("fp8_scaled", "fp8_scaled_v2", "fp8_e4m3fn"):
        tensors, meta = convert_state(sd, fmt)
        return save_safetensors(tensors, where / f"{name}_{fmt}.safetensors", {**meta, **cfg_meta})
    if fmt == "official":
        tensors, _ = convert_state(sd, "fp32")
        folder = where / f"{name}_official"
        save_sharded(tensors, folder, max_shard_bytes=200_000, config=official_config(model.cfg))
        return folder
    if fmt == "diffusers":
        inverse = {ditmod.official_key_from_diffusers(k): k for k in _diffusers_keys(model.cfg)}
        tensors = {inverse[k]: v.contiguous() for k, v in sd.items()}
        folder = where / f"{name}_diffusers" / "transformer"
        folder.mkdir(parents=True)
        save_safetensors(tensors, folder / "diffusion_pytorch_model.safetensors")
        (folder / "config.json").write_text(json.dumps(diffusers_config(model.cfg)))
        return folder
    raise ValueError(fmt)


def _diffusers_keys(cfg: ditmod.DiTConfig) -> list[str]:
    from diffusers import WanTransformer3DModel

    c = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        return list(WanTransformer3DModel(**c).state_dict())


def dequantized_copy(model: ditmod.WanDiT, fmt: str) -> dict[str, torch.Tensor]:
    """The weights a lossless loader must reproduce for ``fmt`` (as fp32)."""
    kind = {"comfy-bf16": "bf16", "comfy-fp16": "fp16", "official": "fp32", "diffusers": "fp32"}.get(fmt, fmt)
    tensors, _ = convert_state(model.state_dict(), kind)
    out = {}
    for k, v in model.state_dict().items():
        t = tensors[k].float()
        if f"{k[: -len('.weight')]}.scale_weight" in tensors:
            t = t * tensors[f"{k[: -len('.weight')]}.scale_weight"].float()
        if f"{k[: -len('.weight')]}.weight_scale" in tensors:
            t = t * tensors[f"{k[: -len('.weight')]}.weight_scale"].float()
        out[k] = t
    return out
