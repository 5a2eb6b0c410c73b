"""Build networks on the meta device and assign the file's tensors to them.

No second copy of the weights is made in host RAM: tensors are mmap views
(``safetensors_io``) moved once to the target device; fp8 weights stay fp8 with
their scales (``common.Linear`` dequantises on use). Every problem is raised as a
``ModelFileError`` that names the file, before the model is handed out.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wanrender.errors import ModelFileError
from wanrender.models import dit as ditmod
from wanrender.models import upload
from wanrender.models.common import Linear, is_fp8, set_tensor
from wanrender.models.formats import (
    QUANT_AUX_SUFFIXES,
    CheckpointInfo,
    find_weights,
    inspect_checkpoint,
    read_config,
)
from wanrender.models.safetensors_io import Checkpoint, load_json, open_checkpoint

log = logging.getLogger(__name__)

DeviceLike = str | torch.device


def _open(source: str | os.PathLike) -> tuple[Path, Checkpoint, CheckpointInfo, dict | None]:
    p = Path(source)
    if not p.exists():
        raise ModelFileError(
            p, "file not found", "check the path (wanrender models check DIR lists what a folder holds)"
        )
    config = None
    if p.is_dir():
        config = read_config(p)
        weights = find_weights(p)
        if weights is None:
            raise ModelFileError(p, "no single weights file or shard index in this folder", "point at the file")
    else:
        weights = p
    ck = open_checkpoint(weights)
    info = inspect_checkpoint(p) if p.is_dir() else inspect_checkpoint(p, ck)
    return p, ck, info, config


def _expect_role(path: Path, info: CheckpointInfo, role: str, what: str) -> None:
    if info.role != role:
        found = info.role if info.role != "unknown" else "not a recognised Wan model file"
        raise ModelFileError(path, f"expected {what}, but this is a {found}", f"pass the {what} file here")


def _normalise_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == out_features:
        return scale.reshape(out_features, 1)
    raise ValueError(f"scale of shape {tuple(scale.shape)} fits neither per-tensor nor per-channel")


def canonical_state(
    ck: Mapping[str, torch.Tensor], prefix: str = "", rename: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, scales): drop the prefix and ComfyUI's quantisation side keys.

    ``scales`` maps a layer's ``<layer>.weight`` name to its fp8 scale, from either
    the old ``<layer>.scale_weight`` or the newer ``<layer>.weight_scale`` key.
    Tensors stay lazy mmap views.
    """
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key in ck:
        if prefix and not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name == "scaled_fp8" or name == "spiece_model" or name.endswith(QUANT_AUX_SUFFIXES):
            if name.endswith(".comfy_quant"):
                _check_comfy_quant(ck, key)
            continue
        if name.endswith((".scale_weight", ".weight_scale")):
            scales[name.rsplit(".", 1)[0] + ".weight"] = ck[key]
            continue
        weights[rename.get(name, name) if rename else name] = ck[key]
    return weights, scales


def _check_comfy_quant(ck: Mapping[str, torch.Tensor], key: str) -> None:
    try:
        conf = json.loads(bytes(ck[key].tolist()).decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return
    fmt = conf.get("format", "float8_e4m3fn") if isinstance(conf, dict) else "float8_e4m3fn"
    if fmt not in ("float8_e4m3fn", "float8_e5m2"):
        raise ModelFileError(
            getattr(ck, "path", "checkpoint"),
            f"layer {key.rsplit('.', 1)[0]} is quantised as {fmt!r}, which wanrender does not read yet",
            "use the fp8_scaled, fp16 or bf16 file",
        )


def assign_weights(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor],
    *,
    source: Path,
    device: DeviceLike = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Give a meta-device model the file's tensors, strictly.

    ``dtype``: cast floating (non-fp8) tensors to it; None keeps the file's dtype.
    fp8 weights of ``Linear`` layers stay fp8 with their scale; an fp8 tensor
    anywhere else (convs, norms) is dequantised to ``dtype`` or bf16.
    """
    expected = dict(model.state_dict(keep_vars=True))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown tensor(s) (e.g. {unexpected[0]})")
        raise ModelFileError(source, "does not fit the network: " + ", ".join(parts), "check it is the right file")
    modules = dict(model.named_modules())
    fallback = dtype or torch.bfloat16
    for name, target in expected.items():  # shapes first: a wrong file fails before any copy
        t = weights[name]
        if tuple(t.shape) != tuple(target.shape):
            raise ModelFileError(
                source,
                f"tensor {name} has shape {tuple(t.shape)}, the network needs {tuple(target.shape)}",
                "check it is the right file for this model",
            )
    dev = torch.device(device)
    for name, t in upload.to_device(((n, weights[n]) for n in expected), dev):
        mod_name, _, attr = name.rpartition(".")
        mod = modules[mod_name]
        scale = scales.get(name)
        if is_fp8(t.dtype) and isinstance(mod, Linear) and attr == "weight":
            t = t.to(device)
            if scale is not None:
                mod.weight_scale = _normalise_scale(scale, mod.out_features).to(device)
        elif is_fp8(t.dtype):
            t = t.to(device).to(fallback)
            if scale is not None:
                t = t * _normalise_scale(scale, t.shape[0]).to(device).to(fallback).reshape(-1, *[1] * (t.dim() - 1))
        else:
            t = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        set_tensor(mod, attr, t)
    # Linear layers without a scale in the file keep weight_scale None (unscaled).
    leftover = sorted(set(scales) - set(expected))
    if leftover:
        raise ModelFileError(source, f"scale for unknown layer {leftover[0]}", "check it is the right file")
    return model


def load_dit(
    source: str | os.PathLike,
    *,
    device: DeviceLike = "cpu",
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    require_i2v: bool = True,
    config: ditmod.DiTConfig | None = None,
) -> ditmod.WanDiT:
    """Load one DiT expert from a ComfyUI/official file, a shard index or a diffusers folder."""
    path, ck, info, folder_cfg = _open(source)
    _expect_role(path, info, "dit", "a Wan DiT expert")
    if require_i2v and info.variant != "i2v":
        fix = "use the wan2.2_i2v_high/low_noise_14B files"
        problem = info.notes[0] if info.notes else f"not an image-to-video expert ({info.variant})"
        raise ModelFileError(path, problem, fix)
    if info.layout == "diffusers":
        raw, scales = canonical_state(ck)
        try:
            weights = ditmod.official_keys_from_diffusers(raw)
            scales = ditmod.official_keys_from_diffusers(scales)  # keyed by "<layer>.weight" too
        except KeyError as e:
            raise ModelFileError(path, str(e.args[0]), "check it is a Wan 2.2 diffusers transformer folder") from None
        if config is None:
            # A folder has config.json; a bare weights file is read from its shapes.
            config = (
                ditmod.config_from_diffusers(folder_cfg)
                if folder_cfg
                else ditmod.config_from_state_dict({k: tuple(v.shape) for k, v in weights.items()})
            )
        cfg = config
    else:
        weights, scales = canonical_state(ck, info.prefix)
        cfg = config or _dit_config(ck, weights, folder_cfg)
    with torch.device("meta"):
        model = ditmod.WanDiT(cfg)
    assign_weights(model, weights, scales, source=path, device=device, dtype=dtype)
    model.compute_dtype = compute_dtype or _default_compute_dtype(device)
    log.info("loaded DiT %s (%s) from %s", info.expert or "", info.describe(), path)
    return model.eval()


def _dit_config(ck: Checkpoint, weights: Mapping[str, torch.Tensor], folder_cfg: dict | None) -> ditmod.DiTConfig:
    meta = getattr(ck, "metadata", {}) or {}
    if "wanrender.config" in meta:
        return ditmod.DiTConfig.from_dict(load_json(meta["wanrender.config"], getattr(ck, "path", ""), "config"))
    # Shapes give everything but the head count, which an official config.json has.
    heads = int(folder_cfg["num_heads"]) if folder_cfg and "num_heads" in folder_cfg else None
    return ditmod.config_from_state_dict({k: tuple(v.shape) for k, v in weights.items()}, num_heads=heads)


def _default_compute_dtype(device: DeviceLike) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def describe(source: str | os.PathLike) -> CheckpointInfo:
    return inspect_checkpoint(source)


def load_vae(source: str | os.PathLike, *, device: DeviceLike = "cpu", dtype: torch.dtype | None = None):
    """Load the Wan 2.1 VAE (official/ComfyUI file, ``.pth``, or a diffusers ``vae/`` folder)."""
    from wanrender.models import vae as vaemod

    path, ck, info, folder_cfg = _open(source)
    _expect_role(path, info, "vae", "the Wan 2.1 VAE")
    if info.variant != "wan2.1":
        raise ModelFileError(
            path, info.notes[0] if info.notes else f"unsupported VAE ({info.variant})", "use wan_2.1_vae.safetensors"
        )
    weights, scales = canonical_state(ck, info.prefix)
    if info.layout == "diffusers":
        weights = vaemod.official_keys_from_diffusers(weights)
        cfg = vaemod.config_from_diffusers(folder_cfg or {})
    else:
        meta = getattr(ck, "metadata", {}) or {}
        cfg = vaemod.VAEConfig.preset(meta.get("wanrender.preset", "wan2.1"))
        base = weights["encoder.conv1.weight"].shape[0]
        if base != cfg.base_dim:
            cfg = vaemod.VAEConfig(base_dim=base)
    with torch.device("meta"):
        model = vaemod.WanVAE(cfg)
    assign_weights(model, weights, scales, source=path, device=device, dtype=dtype)
    log.info("loaded VAE (%s) from %s", info.describe(), path)
    return model.eval()


def load_text_encoder(
    source: str | os.PathLike,
    *,
    device: DeviceLike = "cpu",
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
):
    """Load the UMT5 encoder (ComfyUI ``umt5_xxl_*`` file, official ``.pth``, or an HF folder)."""
    from wanrender.models import text_encoder as te

    path, ck, info, _ = _open(source)
    _expect_role(path, info, "text_encoder", "the UMT5-XXL text encoder")
    if info.variant == "t5":
        raise ModelFileError(path, info.notes[0], "use umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    try:
        model = te.UMT5Encoder.from_state_dict({k: ck[k] for k in ck}, compute_dtype=compute_dtype)
    except (ValueError, KeyError) as e:
        raise ModelFileError(path, f"does not fit the UMT5 encoder ({e})", "check it is the right file") from None
    _place(model, device, dtype)
    log.info("loaded text encoder (%s) from %s", info.describe(), path)
    return model


def load_tokenizer(source: str | os.PathLike):
    """The umt5 SentencePiece tokenizer: ``spiece.model``, a folder holding it, or a
    text-encoder file that carries it (ComfyUI's ``spiece_model`` tensor)."""
    from wanrender.models.text_encoder import Tokenizer

    p = Path(source)
    if not p.exists():
        raise ModelFileError(p, "file not found", "check the path")
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.suffix == ".model":
        return Tokenizer.from_file(p)
    ck = open_checkpoint(p)
    if "spiece_model" not in ck:
        raise ModelFileError(p, "this file carries no tokenizer", "pass the umt5 tokenizer folder (spiece.model)")
    return Tokenizer.from_bytes(ck["spiece_model"])


def _place(model: nn.Module, device: DeviceLike, dtype: torch.dtype | None) -> None:
    """Move to ``device``; cast floating non-fp8 tensors to ``dtype`` (fp8 stays fp8)."""
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                new = t.to(device)
                if dtype is not None and new.is_floating_point() and not is_fp8(new.dtype):
                    new = new.to(dtype)
                set_tensor(mod, name, new)


def dit_config(source: str | os.PathLike) -> ditmod.DiTConfig:
    """A DiT file's architecture (head count included) from its header and shapes,
    without reading its weights: what must be known before processes start."""
    path, ck, info, folder_cfg = _open(source)
    _expect_role(path, info, "dit", "a Wan DiT expert")
    if info.layout == "diffusers":
        if folder_cfg:
            return ditmod.config_from_diffusers(folder_cfg)
        raw, _ = canonical_state(ck)
        shapes = {k: tuple(v.shape) for k, v in ditmod.official_keys_from_diffusers(raw).items()}
        return ditmod.config_from_state_dict(shapes)
    weights, _ = canonical_state(ck, info.prefix)
    return _dit_config(ck, weights, folder_cfg)
