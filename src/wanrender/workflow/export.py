"""A render request written as a ComfyUI workflow, in the shape of ComfyUI's Wan 2.2
14B i2v template: two UNETLoaders (+ a LoRA loader each when a LoRA is used), a
ModelSamplingSD3 per expert, CLIPLoader (type wan), VAELoader, two CLIPTextEncodes,
LoadImage, WanImageToVideo, the KSamplerAdvanced pair, VAEDecode, (RIFE VFI,)
CreateVideo and SaveVideo. Reading the result back gives the same request.

``to_api`` and ``to_ui`` take the request and the model file names (a mapping of role
-> path or name; ComfyUI's widgets hold names inside its model folders, so the base
name is written). Roles left out get the names of ComfyUI's repackaged files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanrender.errors import WanrenderError
from wanrender.request import negative_prompt
from wanrender.spec import RENDER_FPS, RenderRequest
from wanrender.workflow.nodes import CONTROL, SPECS

STANDARD_NAMES = {
    "high": "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
    "low": "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
    "lora_high": "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
    "lora_low": "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
    "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}
RIFE_CKPT = "rife47.pth"


@dataclass
class _Node:
    id: int
    type: str
    widgets: dict[str, Any]
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str = ""


def _names(files: Mapping[str, Any] | None) -> dict[str, str]:
    names = dict(STANDARD_NAMES)
    for role, value in (files or {}).items():
        if value is not None and role in names:
            names[role] = Path(str(value)).name
    return names


def _graph(req: RenderRequest, files: Mapping[str, Any] | None) -> list[_Node]:
    r, s, o = req.render, req.sampling, req.output
    if r.fit != "crop":
        raise WanrenderError(f"fit {r.fit} has no ComfyUI equivalent (WanImageToVideo centre-crops) — use fit crop")
    if o.interpolate not in ("off", "rife"):
        raise WanrenderError(f"interpolate {o.interpolate} has no ComfyUI node — use rife or off")
    names = _names(files)
    nodes: list[_Node] = []

    def add(ntype: str, widgets: dict, links: dict | None = None, title: str = "") -> int:
        nodes.append(_Node(len(nodes) + 1, ntype, widgets, dict(links or {}), title))
        return len(nodes)

    models = {}
    for side, strength, shift in (("high", r.lora_strength_high, s.shift_high), ("low", r.lora_strength_low,
                                                                                 s.shift_low)):  # fmt: skip
        m = add("UNETLoader", {"unet_name": names[side], "weight_dtype": "default"}, title=f"{side}-noise expert")
        if strength:
            m = add("LoraLoaderModelOnly", {"lora_name": names[f"lora_{side}"], "strength_model": strength},
                    {"model": (m, 0)})  # fmt: skip
        models[side] = add("ModelSamplingSD3", {"shift": shift}, {"model": (m, 0)})
    clip = add("CLIPLoader", {"clip_name": names["text_encoder"], "type": "wan", "device": "default"})
    vae = add("VAELoader", {"vae_name": names["vae"]})
    pos = add("CLIPTextEncode", {"text": r.prompt}, {"clip": (clip, 0)}, "positive")
    neg = add("CLIPTextEncode", {"text": negative_prompt(req)}, {"clip": (clip, 0)}, "negative")
    image = add("LoadImage", {"image": r.image.name, "upload": "image"})
    i2v = add("WanImageToVideo", {"width": r.width, "height": r.height, "length": r.frames, "batch_size": 1},
              {"positive": (pos, 0), "negative": (neg, 0), "vae": (vae, 0), "start_image": (image, 0)})  # fmt: skip
    cond = {"positive": (i2v, 0), "negative": (i2v, 1)}
    common = {"steps": s.steps, "cfg": s.cfg, "sampler_name": s.sampler, "scheduler": "simple"}
    first = add("KSamplerAdvanced", {"add_noise": "enable" if s.switch > 0 else "disable", "noise_seed": r.seed,
                                     CONTROL: "fixed", **common, "start_at_step": 0, "end_at_step": s.switch,
                                     "return_with_leftover_noise": "enable" if s.switch < s.steps else "disable"},
                {"model": (models["high"], 0), **cond, "latent_image": (i2v, 2)}, "high noise")  # fmt: skip
    second = add("KSamplerAdvanced", {"add_noise": "disable" if s.switch > 0 else "enable", "noise_seed": r.seed,
                                      CONTROL: "fixed", **common, "start_at_step": s.switch, "end_at_step": 10000,
                                      "return_with_leftover_noise": "disable"},
                 {"model": (models["low"], 0), **cond, "latent_image": (first, 0)}, "low noise")  # fmt: skip
    images = add("VAEDecode", {}, {"samples": (second, 0), "vae": (vae, 0)})
    if o.interpolate == "rife":
        images = add("RIFE VFI", {"ckpt_name": RIFE_CKPT, "clear_cache_after_n_frames": 10, "multiplier":
                                  o.fps // RENDER_FPS, "fast_mode": True, "ensemble": True, "scale_factor": 1.0},
                     {"frames": (images, 0)})  # fmt: skip
    video = add("CreateVideo", {"fps": float(o.fps)}, {"images": (images, 0)})
    add("SaveVideo", {"filename_prefix": "video/wanrender", "format": "auto", "codec": "auto"}, {"video": (video, 0)})
    return nodes


def to_api(req: RenderRequest, files: Mapping[str, Any] | None = None) -> dict:
    """The API (prompt) format: what ComfyUI's /prompt takes."""
    out = {}
    for n in _graph(req, files):
        inputs: dict[str, Any] = {k: v for k, v in n.widgets.items() if k not in (CONTROL, "upload")}
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.links.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def to_ui(req: RenderRequest, files: Mapping[str, Any] | None = None) -> dict:
    """The editor (UI) format: what ComfyUI's Workflow > Open loads."""
    nodes = _graph(req, files)
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for order, n in enumerate(nodes):
        spec = SPECS[n.type]
        inputs = []
        for name, typ in spec.inputs:
            link_id = None
            if name in n.links:
                src, slot = n.links[name]
                link_id = len(links) + 1
                links.append([link_id, src, slot, n.id, len(inputs), typ])
                out_links.setdefault((src, slot), []).append(link_id)
            inputs.append({"name": name, "type": typ, "link": link_id})
        ui_nodes.append({
            "id": n.id, "type": n.type, "pos": [300 * (order % 6), 300 * (order // 6)], "size": [280, 120],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": typ, "type": typ, "links": [], "slot_index": k} for k, typ in enumerate(spec.outputs)],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": [n.widgets.get(w) for w in spec.widgets],
            **({"title": n.title} if n.title else {}),
        })  # fmt: skip
    for node in ui_nodes:
        for k, o in enumerate(node["outputs"]):
            o["links"] = out_links.get((node["id"], k), [])
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"wanrender": {"preset": req.preset}}, "version": 0.4}  # fmt: skip
