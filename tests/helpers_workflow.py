"""ComfyUI workflows written by the tests: a small builder of the editor (UI) format and
the Wan 2.2 14B i2v template built with it. Widget values are written by hand in
ComfyUI's order (seed widgets followed by their control value), as the editor saves them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from wanrender.workflow.nodes import SPECS

SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = {
    "high": "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
    "low": "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
    "lora_high": "lightx2v_high_noise.safetensors",
    "lora_low": "lightx2v_low_noise.safetensors",
    "te": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}


class UI:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.subgraphs: list[dict] = []

    def add(self, ntype: str, widgets=None, mode: int = 0, pos=(0, 0), inputs=None, outputs=None, **extra) -> int:
        spec = SPECS.get(ntype)
        ins = inputs if inputs is not None else (list(spec.inputs) if spec else [])
        outs = outputs if outputs is not None else (list(spec.outputs) if spec else [])
        nid = max([n["id"] for n in self.nodes], default=0) + 1
        self.nodes.append({
            "id": nid, "type": ntype, "pos": list(pos), "mode": mode,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in ins],
            "outputs": [{"name": t, "type": t, "links": []} for t in outs],
            "widgets_values": widgets if widgets is not None else [], "properties": {}, **extra,
        })  # fmt: skip
        return nid

    def node(self, nid: int) -> dict:
        return next(n for n in self.nodes if n["id"] == nid)

    def link(self, src: int, slot: int, dst: int, name: str, typ: str = "*") -> int:
        target = self.node(dst)
        names = [i["name"] for i in target["inputs"]]
        if name not in names:  # a widget converted to an input
            target["inputs"].append({"name": name, "type": typ, "link": None, "widget": {"name": name}})
            names.append(name)
        lid = max([ln[0] for ln in self.links], default=0) + 1
        k = names.index(name)
        target["inputs"][k]["link"] = lid
        self.node(src)["outputs"][slot]["links"].append(lid)
        self.links.append([lid, src, slot, dst, k, typ])
        return lid

    def group(self, title: str, x: float, y: float, w: float, h: float) -> None:
        self.groups.append({"title": title, "bounding": [x, y, w, h]})

    def data(self) -> dict:
        out = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
               "links": self.links, "groups": self.groups, "config": {}, "extra": {}, "version": 0.4}  # fmt: skip
        if self.subgraphs:
            out["definitions"] = {"subgraphs": self.subgraphs}
        return out

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.data()))
        return path


def pair(w: UI, models: tuple[int, int], i2v: int, steps: int = 4, switch: int = 2, seed: int = 42, cfg: float = 1.0,
         mode: int = 0, pos=(0, 0), control: str = "fixed") -> tuple[int, int]:  # fmt: skip
    """The KSamplerAdvanced pair: high expert 0 -> switch with leftover noise, low expert switch -> end."""
    a = w.add("KSamplerAdvanced", ["enable", seed, control, steps, cfg, "euler", "simple", 0, switch, "enable"],
              mode=mode, pos=pos)  # fmt: skip
    b = w.add("KSamplerAdvanced", ["disable", seed, "fixed", steps, cfg, "euler", "simple", switch, 10000, "disable"],
              mode=mode, pos=pos)  # fmt: skip
    for s, m in ((a, models[0]), (b, models[1])):
        w.link(m, 0, s, "model", "MODEL")
        w.link(i2v, 0, s, "positive", "CONDITIONING")
        w.link(i2v, 1, s, "negative", "CONDITIONING")
    w.link(i2v, 2, a, "latent_image", "LATENT")
    w.link(a, 0, b, "latent_image", "LATENT")
    return a, b


def template(w: UI, prompt: str = "a bear cub in snow", frames: int = 81, size=(832, 1216), fps: float = 16.0,
             image: str = "cat.png", names: dict | None = None, loras: bool = True, **pair_kw) -> dict[str, int]:  # fmt: skip
    """ComfyUI's Wan 2.2 14B i2v template (turbo: 4-step LoRAs, shift 5)."""
    n = {**NAMES, **(names or {})}
    ids: dict[str, int] = {}
    for side in ("high", "low"):
        m = ids[f"unet_{side}"] = w.add("UNETLoader", [n[side], "default"])
        if loras:
            lora = ids[f"lora_{side}"] = w.add("LoraLoaderModelOnly", [n[f"lora_{side}"], 1.0])
            w.link(m, 0, lora, "model", "MODEL")
            m = lora
        ids[f"shift_{side}"] = w.add("ModelSamplingSD3", [5.0])
        w.link(m, 0, ids[f"shift_{side}"], "model", "MODEL")
    clip = ids["clip"] = w.add("CLIPLoader", [n["te"], "wan", "default"])
    vae = ids["vae"] = w.add("VAELoader", [n["vae"]])
    ids["pos"] = w.add("CLIPTextEncode", [prompt])
    ids["neg"] = w.add("CLIPTextEncode", ["blurry"])
    for t in ("pos", "neg"):
        w.link(clip, 0, ids[t], "clip", "CLIP")
    ids["image"] = w.add("LoadImage", [image, "image"])
    i2v = ids["i2v"] = w.add("WanImageToVideo", [size[0], size[1], frames, 1])
    w.link(ids["pos"], 0, i2v, "positive", "CONDITIONING")
    w.link(ids["neg"], 0, i2v, "negative", "CONDITIONING")
    w.link(vae, 0, i2v, "vae", "VAE")
    w.link(ids["image"], 0, i2v, "start_image", "IMAGE")
    ids["a"], ids["b"] = pair(w, (ids["shift_high"], ids["shift_low"]), i2v, **pair_kw)
    tail(w, ids, ids["b"], fps)
    return ids


def tail(w: UI, ids: dict, latent_from: int, fps: float = 16.0, mode: int = 0, pos=(0, 0)) -> None:
    """VAEDecode -> CreateVideo -> SaveVideo."""
    ids["decode"] = w.add("VAEDecode", mode=mode, pos=pos)
    w.link(latent_from, 0, ids["decode"], "samples", "LATENT")
    w.link(ids["vae"], 0, ids["decode"], "vae", "VAE")
    ids["video"] = w.add("CreateVideo", [fps], mode=mode, pos=pos)
    w.link(ids["decode"], 0, ids["video"], "images", "IMAGE")
    ids["save"] = w.add("SaveVideo", ["video/ComfyUI", "auto", "auto"], mode=mode, pos=pos)
    w.link(ids["video"], 0, ids["save"], "video", "VIDEO")


def cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI as a subprocess, as a user runs it."""
    full = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *args], env=full, capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command (exit 2, no traceback)."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]
