"""Recognise what a checkpoint is from its keys, shapes and dtypes (never its file name).

Roles: a DiT expert, the VAE, the UMT5 text encoder, a tokenizer, a LoRA. Layouts:
official/ComfyUI key names (optionally prefixed ``model.diffusion_model.``),
diffusers folders, HF text-encoder names. Precision: ComfyUI ``fp8_scaled`` (old
``scale_weight`` + ``scaled_fp8`` marker, or newer ``weight_scale`` +
``comfy_quant``), plain fp8 e4m3fn, bf16, fp16, fp32.

Only the high/low *expert* of a DiT cannot be seen in the weights: it is taken from
the path (``high_noise`` / ``low_noise``, diffusers ``transformer``/``transformer_2``)
and reported as such.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanrender.errors import ModelFileError
from wanrender.models.safetensors_io import (
    Checkpoint,
    ShardedCheckpoint,
    checkpoint_files,
    load_json,
    open_checkpoint,
)

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
LORA_SUFFIXES = (".diff", ".diff_b", ".diff_m", ".alpha")
LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Keys ComfyUI writes next to quantised weights that carry no weights of their own.
QUANT_AUX_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2", ".pre_quant_scale")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    role: str  # dit | vae | text_encoder | tokenizer | lora | clip_vision | unknown
    layout: str = ""  # official | comfy | diffusers | hf | spm
    precision: str = ""  # fp8_scaled | fp8_e4m3fn | bf16 | fp16 | fp32 | mixed
    scale_style: str | None = None  # scale_weight | weight_scale
    prefix: str = ""
    variant: str = ""  # dit: i2v | t2v | ti2v-5B | wan2.1-i2v ; vae: wan2.1 | wan2.2
    expert: str | None = None  # high | low (from the path)
    files: tuple[Path, ...] = ()
    size_bytes: int = 0
    num_tensors: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    has_tokenizer: bool = False
    fp8_matmul: bool = True  # False when a ComfyUI marker asks for full-precision matmuls
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        bits = [self.role]
        if self.expert:
            bits.append(f"{self.expert}-noise expert")
        if self.variant:
            bits.append(self.variant)
        if self.layout:
            bits.append(self.layout)
        if self.precision:
            bits.append(self.precision + (f" ({self.scale_style})" if self.scale_style else ""))
        return ", ".join(bits)


def _expert_in(name: str) -> str | None:
    s = name.lower().replace("-", "_")
    if "high_noise" in s or "highnoise" in s or re.search(r"(^|_)high(_|\.|$)", s):
        return "high"
    if "low_noise" in s or "lownoise" in s or re.search(r"(^|_)low(_|\.|$)", s):
        return "low"
    return None


def expert_from_path(path: Path) -> str | None:
    """high/low from the file name, else from its own folder's name (official
    ``high_noise_model/``, diffusers ``transformer``/``transformer_2``) — never from
    folders further up, which may say anything (``/data/high_quality/...``)."""
    own = None if path.is_dir() else _expert_in(path.stem)
    if own:
        return own
    folder = path.name if path.is_dir() else path.parent.name
    if folder == "transformer":
        return "high"  # diffusers Wan 2.2 A14B: transformer = high noise, transformer_2 = low noise
    if folder == "transformer_2":
        return "low"
    return _expert_in(folder)


def strip_prefix(keys: list[str], prefixes: tuple[str, ...] = DIT_PREFIXES) -> str:
    """The prefix shared by the model keys, if it is one of the known ones."""
    for p in prefixes:
        if keys and sum(k.startswith(p) for k in keys) >= 0.9 * len(keys):
            return p
    return ""


def _precision(ck: Checkpoint, keys: list[str]) -> tuple[str, str | None, bool]:
    counts: Counter[torch.dtype] = Counter()
    for k in keys:
        if k.endswith(".weight"):
            counts[ck.dtype_of(k)] += 1
    has_marker = any(k.endswith("scaled_fp8") for k in keys)
    style = None
    if any(k.endswith(".scale_weight") for k in keys):
        style = "scale_weight"
    elif any(k.endswith(".weight_scale") for k in keys):
        style = "weight_scale"
    fp8 = counts[torch.float8_e4m3fn] + counts[torch.float8_e5m2]
    fp8_matmul = True
    if has_marker:
        marker = next(k for k in keys if k.endswith("scaled_fp8"))
        # ComfyUI: a 2-element marker means "dequantise and matmul in full precision".
        fp8_matmul = ck.shape_of(marker) != (2,)
    if fp8 and (style or has_marker):
        return "fp8_scaled", style, fp8_matmul
    if fp8:
        return "fp8_e4m3fn", None, fp8_matmul
    floats = {d: n for d, n in counts.items() if d.is_floating_point}
    if not floats:
        return "", None, fp8_matmul
    top = max(floats, key=lambda d: floats[d])
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return names.get(top, str(top)), None, fp8_matmul


def _dit_variant(ck: Checkpoint, prefix: str, diffusers: bool, config: dict | None) -> tuple[str, list[str]]:
    keys = set(ck)
    notes: list[str] = []
    if diffusers:
        in_ch = int((config or {}).get("in_channels", 0))
        dim = int((config or {}).get("num_attention_heads", 0)) * int((config or {}).get("attention_head_dim", 0))
        if "patch_embedding.weight" in keys and not (in_ch and dim):  # a weights file given without its folder
            dim, in_ch = ck.shape_of("patch_embedding.weight")[:2]
        wan21 = (config or {}).get("image_dim") is not None or any("add_k_proj" in k for k in keys)
    else:
        pe = ck.shape_of(prefix + "patch_embedding.weight")
        dim, in_ch = pe[0], pe[1]
        wan21 = any(".k_img." in k or k.startswith(prefix + "img_emb.") for k in keys)
    if wan21:
        return "wan2.1-i2v", ["a Wan 2.1 I2V model (uses a CLIP image encoder); Wan 2.2 needs the 2.2 experts"]
    if dim == 3072 or in_ch == 48:
        return "ti2v-5B", ["the Wan 2.2 TI2V-5B model; this project renders the A14B experts"]
    if in_ch == 36:
        return "i2v", notes
    if in_ch == 16:
        return "t2v", ["a text-to-video expert (16 input channels); image-to-video needs the 36-channel I2V experts"]
    return f"unknown ({in_ch} input channels)", notes


def _classify_keys(keys: list[str]) -> tuple[str, str, str]:
    """(role, layout, prefix) from key names alone."""
    ks = set(keys)
    if any(k.endswith(LORA_SUFFIXES) or any(m in k for m in LORA_PARTS) for k in keys):
        return "lora", "", ""
    prefix = strip_prefix(keys)
    if f"{prefix}patch_embedding.weight" in ks and any(".self_attn.q." in k for k in keys):
        return "dit", "comfy" if prefix else "official", prefix
    if any(".attn1.to_q." in k for k in keys) and any(k.startswith("condition_embedder.") for k in keys):
        return "dit", "diffusers", ""
    vprefix = strip_prefix(keys, ("first_stage_model.", "vae."))
    if f"{vprefix}encoder.conv1.weight" in ks and f"{vprefix}decoder.conv1.weight" in ks:
        return "vae", "official", vprefix
    if "encoder.conv_in.weight" in ks and "decoder.conv_in.weight" in ks and "quant_conv.weight" in ks:
        return "vae", "diffusers", ""
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in ks:
        return "text_encoder", "hf", ""
    if "token_embedding.weight" in ks and "blocks.0.attn.q.weight" in ks:
        return "text_encoder", "official", ""
    if any(k.startswith(("visual.", "vision_model.", "log_scale")) for k in keys):
        return "clip_vision", "", ""
    return "unknown", "", ""


def inspect_checkpoint(path: str | os.PathLike, ck: Checkpoint | None = None) -> CheckpointInfo:
    """Describe one weights file, shard index, or single-model folder.

    A header can be well-formed and still describe nonsense (a VAE convolution of
    rank 0): that is the file's fault too, one line naming it, like a damaged header."""
    try:
        return _inspect(Path(path), ck)
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as e:
        raise ModelFileError(
            path, f"unrecognised contents ({type(e).__name__})", "check the file or download it again"
        ) from None


def _inspect(p: Path, ck: Checkpoint | None) -> CheckpointInfo:
    if p.is_dir():
        return _inspect_dir(p)
    if p.name == "spiece.model" or p.suffix == ".model":
        return CheckpointInfo(p, "tokenizer", "spm", files=(p,), size_bytes=p.stat().st_size)
    ck = ck if ck is not None else open_checkpoint(p)
    keys = list(ck)
    role, layout, prefix = _classify_keys(keys)
    files = tuple(checkpoint_files(ck))
    size = sum(f.stat().st_size for f in files)
    dtypes = Counter(str(ck.dtype_of(k)).replace("torch.", "") for k in keys)
    precision, style, fp8_matmul = _precision(ck, keys)
    variant, notes = "", []
    if role == "dit":
        variant, notes = _dit_variant(ck, prefix, layout == "diffusers", None)
    elif role == "vae":
        z = (
            ck.shape_of(f"{prefix}conv2.weight")[0]
            if layout == "official"
            else ck.shape_of("post_quant_conv.weight")[0]
        )
        variant = {16: "wan2.1", 48: "wan2.2"}.get(z, f"z={z}")
        if z == 48:
            notes.append("the Wan 2.2 VAE (for TI2V-5B); the A14B experts need the Wan 2.1 VAE")
    elif role == "text_encoder" and layout == "hf":
        if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in set(keys) and any(
            k.startswith("encoder.block.1.") for k in keys
        ):
            variant = "t5"
            notes.append("a T5 encoder, not UMT5: Wan needs umt5-xxl")
        else:
            variant = "umt5"
    return CheckpointInfo(
        path=p,
        role=role,
        layout=layout,
        precision=precision,
        scale_style=style,
        prefix=prefix,
        variant=variant,
        expert=expert_from_path(p) if role in ("dit", "lora") else None,
        files=files,
        size_bytes=size,
        num_tensors=len(keys),
        dtypes=dict(dtypes),
        has_tokenizer="spiece_model" in set(keys),
        fp8_matmul=fp8_matmul,
        notes=tuple(notes),
    )


def find_weights(folder: Path) -> Path | None:
    """The weights entry of a single-model folder: a shard index or the one weights file."""
    idx = sorted(folder.glob("*.safetensors.index.json"))
    if idx:
        return idx[0]
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return files[0] if len(files) == 1 else None


def read_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    conf = load_json(cfg.read_bytes(), cfg, "config")
    if not isinstance(conf, dict):
        raise ModelFileError(cfg, "not a model config (not a JSON object)", "download it again")
    return conf


def _inspect_dir(folder: Path) -> CheckpointInfo:
    if (folder / "spiece.model").is_file() and find_weights(folder) is None:
        return CheckpointInfo(folder, "tokenizer", "spm", files=(folder / "spiece.model",))
    weights = find_weights(folder)
    if weights is None:
        raise ModelFileError(folder, "no single weights file or shard index in this folder", "point at a file")
    ck = open_checkpoint(weights)
    info = inspect_checkpoint(weights, ck)
    config = read_config(folder)
    variant, notes = info.variant, info.notes
    if info.role == "dit" and info.layout == "diffusers":
        v, n = _dit_variant(ck, "", True, config)
        variant, notes = v, tuple(n)
    return CheckpointInfo(
        **{
            **info.__dict__,
            "path": folder,
            "variant": variant,
            "notes": notes,
            "expert": expert_from_path(folder) if info.role in ("dit", "lora") else None,
        }
    )


def is_sharded(ck: Checkpoint) -> bool:
    return isinstance(ck, ShardedCheckpoint)
