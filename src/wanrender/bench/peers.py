"""wanrender and ComfyUI rows of the same render, side by side (``bench report`` and ``bench compare``).

Two rows render the same thing when the image, frames, size, steps and seed agree
(a wanrender case without ``steps`` takes its preset's). The case hashes differ by
design (the engine is part of a comfyui case's identity), so this is a second way
of matching rows, beside compare's by configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from wanrender.bench import results as res

METRICS = ("total", "pass1", "pass2", "vae_decode")


def engine(row: dict) -> str:
    """A row's engine; rows written before the comfyui engine existed are wanrender's."""
    return str(row.get("engine") or (row.get("case") or {}).get("engine") or "wanrender")


def render_key(row: dict) -> tuple:
    c = row.get("case") or {}
    steps = c.get("steps")
    # A comfyui case without a workflow renders the lab's export of its own request: the
    # preset's steps, as a wanrender case (with a workflow of its own they are that file's).
    if steps is None and (engine(row) == "wanrender" or not c.get("workflow")):
        from wanrender.request import PRESETS

        preset = PRESETS.get(str(c.get("preset")))
        steps = preset.sampling.steps if preset else None
    image = c.get("image_sha256") or c.get("image")
    return (image, c.get("frames"), c.get("width"), c.get("height"), steps, c.get("seed"))


def describe(key: tuple) -> str:
    image, frames, w, h, steps, seed = key
    name = "demo image" if image == "demo" else f"image {str(image)[:8]}"
    return f"{frames}f {w}x{h} {steps} steps seed {seed}, {name}"


@dataclass(frozen=True)
class Pair:
    render: str
    wanrender: dict
    comfyui: dict

    def value(self, row: dict, metric: str) -> float | None:
        return res.p50(row, metric) if row["status"] == "ok" else None

    def ratio(self, metric: str) -> float | None:
        """ComfyUI's p50 over wanrender's: above 1, wanrender is faster."""
        w, c = self.value(self.wanrender, metric), self.value(self.comfyui, metric)
        return c / w if w and c is not None else None


def pairs(rows: list[dict]) -> list[Pair]:
    """Every wanrender row against every ComfyUI row of the same render (latest rows only)."""
    by: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by.setdefault(render_key(r), {}).setdefault(engine(r), []).append(r)
    return [
        Pair(describe(k), w, c) for k, e in by.items() for w in e.get("wanrender", []) for c in e.get("comfyui", [])
    ]


def vram(row: dict) -> float | None:
    """Peak VRAM in bytes over the timed renders: torch's allocated peak for wanrender, the
    server's device-wide /system_stats peak for ComfyUI."""
    m = row.get("memory") or {}
    if engine(row) == "comfyui":
        return m.get("server_vram_timed_peak") or m.get("server_vram_peak")
    return m.get("torch_allocated_peak")
