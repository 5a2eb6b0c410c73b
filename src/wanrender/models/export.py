"""Write checkpoints in the formats users have (for the demo model and tests).

The demo and the test suite build tiny random-weight networks and save them in
the same formats as the real downloads, so that the real loading code is what
reads them: ComfyUI bf16/fp16, ComfyUI fp8_scaled in both scale styles, plain fp8
e4m3fn, the official sharded layout and diffusers folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanrender.models.common import quantize_fp8

FORMATS = ("bf16", "fp16", "fp32", "fp8_scaled", "fp8_scaled_v2", "fp8_e4m3fn")


def _is_quantisable(name: str, t: torch.Tensor) -> bool:
    # ComfyUI quantises the 2-D linear weights only; norms, modulation, embeddings
    # stored as convs and biases stay in high precision.
    # Token and position-bias embeddings are lookups, not matmuls: never quantised.
    lookups = ("shared.", "embed_tokens.", "relative_attention_bias.")
    return (
        name.endswith(".weight") and t.dim() == 2 and "norm" not in name.rsplit(".", 2)[-2]
        and not any(x in name for x in lookups)
    )  # fmt: skip


def convert_state(
    sd: Mapping[str, torch.Tensor], fmt: str, prefix: str = "", skip_quant: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict (official key names) as it would be stored in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    layers: dict[str, dict[str, str]] = {}
    float_dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(fmt, torch.bfloat16)
    for name, t in sd.items():
        t = t.detach().cpu()
        key = prefix + name
        quant = fmt.startswith("fp8") and _is_quantisable(name, t) and not (skip_quant and skip_quant(name))
        if not quant:
            out[key] = t.to(float_dtype).contiguous() if t.is_floating_point() else t.contiguous()
            continue
        layer = key[: -len(".weight")]
        if fmt == "fp8_e4m3fn":
            out[key] = t.float().to(torch.float8_e4m3fn)
            continue
        q, scale = quantize_fp8(t)
        out[key] = q
        if fmt == "fp8_scaled":
            out[layer + ".scale_weight"] = scale.reshape(1)
        else:
            out[layer + ".weight_scale"] = scale
            out[layer + ".comfy_quant"] = torch.tensor(
                list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8
            )
            layers[layer] = {"format": "float8_e4m3fn"}
    if fmt == "fp8_scaled":
        # Older ComfyUI marker: an fp8 tensor whose presence means "scaled fp8 file".
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if fmt == "fp8_scaled_v2":
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, meta


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write atomically: a partial file never carries the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(dict(tensors), str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return path


def save_sharded(
    tensors: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    stem: str = "diffusion_pytorch_model",
    max_shard_bytes: int = 2 << 30,
    config: Mapping | None = None,
) -> Path:
    """Sharded safetensors + ``<stem>.safetensors.index.json`` (+ config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, folder / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(dict(config), indent=1))
    return index
