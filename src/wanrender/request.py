"""Presets, and building a validated ``RenderRequest`` at the edge.

Every error names the nearest valid value so the user can fix the input at once.
Errors name the spec's field (``frames``), a ``SpecError``; the CLI shows its flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

from wanrender.errors import shown
from wanrender.spec import (
    INTERPOLATE,
    MEMORY_MODES,
    RENDER_FPS,
    SAMPLERS,
    OutputSpec,
    RenderRequest,
    RenderSpec,
    RuntimeKnobs,
    Sampling,
    SpecError,
    check_encoding,
    check_reserve,
)

# The official Wan 2.2 negative prompt (used when cfg != 1 and none is given).
DEFAULT_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
MAX_FRAMES = 321
MIN_SIDE, MAX_SIDE = 64, 2048


@dataclass(frozen=True)
class Preset:
    sampling: Sampling
    lora_strength: float  # strength of the 4-step LoRAs (0: none)
    frames: int = 81
    width: int = 832
    height: int = 1216
    description: str = ""


PRESETS: dict[str, Preset] = {
    "turbo": Preset(Sampling(4, 2, 1.0, 5.0, 5.0, "euler"), 1.0,
                    description="the production workflow: 4 steps with the 4-step LoRAs"),
    "quality": Preset(Sampling(20, 10, 3.5, 5.0, 5.0, "euler"), 0.0,
                      description="20 steps, CFG 3.5 with a negative prompt, no LoRA"),
    "demo": Preset(Sampling(4, 2, 1.0, 5.0, 5.0, "euler"), 1.0, frames=17, width=320, height=192,
                   description="tiny random-weight models, for trying the pipeline without downloads"),
}  # fmt: skip

_PARTS = {"render": RenderSpec, "sampling": Sampling, "knobs": RuntimeKnobs, "output": OutputSpec}
_FIELD_PART = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


def negative_prompt(req: RenderRequest) -> str:
    return DEFAULT_NEGATIVE if req.render.negative is None else req.render.negative


def with_fields(req: RenderRequest, **fields: object) -> RenderRequest:
    """``req`` with fields of any of its specs replaced, by field name (not validated)."""
    parts: dict[str, dict] = {}
    for name, value in fields.items():
        if name not in _FIELD_PART:
            raise TypeError(f"no render field named {name!r}")
        parts.setdefault(_FIELD_PART[name], {})[name] = value
    return replace(req, **{part: replace(getattr(req, part), **kv) for part, kv in parts.items()})


def from_preset(name: str, image: Path, prompt: str, **overrides: object) -> RenderRequest:
    """A validated request from a preset; ``overrides`` are fields of any spec by name
    (plus ``boundary``); those set to None keep the preset's value."""
    if name not in PRESETS:
        raise SpecError("preset", f"unknown preset {name!r} — choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    base = RenderRequest(
        RenderSpec(image, prompt, frames=p.frames, width=p.width, height=p.height,
                   lora_strength_high=p.lora_strength, lora_strength_low=p.lora_strength),
        p.sampling, preset=name,
    )  # fmt: skip
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("interpolate", "off") != "off" and "fps" not in given:
        given["fps"] = 2 * RENDER_FPS
    boundary = given.pop("boundary", None)
    if boundary is not None:
        # The official Wan 2.2 rule instead of a step number: steps whose timestep is
        # >= boundary x 1000 on the high expert's schedule go to the high expert.
        if "switch" in given:
            raise SpecError("boundary", "switch and boundary both set the expert switch — give only one")
        if not 0.0 < float(boundary) < 1.0:
            raise SpecError("boundary", f"boundary {boundary} is invalid — use a value in (0, 1); Wan 2.2 I2V uses 0.9")
        from wanrender.pipeline.schedules import boundary_switch_step, simple_sigmas

        steps = int(given.get("steps", p.sampling.steps))
        shift = float(given.get("shift_high", p.sampling.shift_high))
        given["switch"] = boundary_switch_step(simple_sigmas(max(1, steps), shift), float(boundary))
    if "steps" in given and "switch" not in given:  # keep the preset's ratio
        given["switch"] = max(0, round(int(given["steps"]) * p.sampling.switch / p.sampling.steps))
    return validate(with_fields(base, **given))


def _nearest_4k1(n: int) -> int:
    return max(1, min(MAX_FRAMES, 4 * round((n - 1) / 4) + 1))


def _nearest16(n: int) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, 16 * round(n / 16)))


def validate(req: RenderRequest) -> RenderRequest:
    r, s, k, o = req.render, req.sampling, req.knobs, req.output
    for name, text in (("prompt", r.prompt), ("negative", r.negative or ""), ("image", str(r.image))):
        try:  # undecodable bytes from argv arrive as lone surrogates; the tokenizer and the sidecar need UTF-8
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(name, f"{name} '{shown(text)}' is not valid UTF-8 — pass it as UTF-8 text") from None
    if not r.prompt.strip():
        raise SpecError("prompt", "the prompt is empty — describe the motion you want, e.g. 'slow dolly-in'")
    if r.frames < 1 or (r.frames - 1) % 4 or r.frames > MAX_FRAMES:
        raise SpecError(
            "frames",
            f"frames {r.frames} is invalid: frames must be 4k+1, 1..{MAX_FRAMES} — try {_nearest_4k1(r.frames)}",
        )
    for name, v in (("width", r.width), ("height", r.height)):
        if v % 16 or not MIN_SIDE <= v <= MAX_SIDE:
            raise SpecError(
                name,
                f"{name} {v} is invalid: sizes must be multiples of 16 in {MIN_SIDE}..{MAX_SIDE} — try {_nearest16(v)}",
            )
    if s.steps < 1 or s.steps > 200:
        raise SpecError("steps", f"steps {s.steps} is invalid — use 1..200 (turbo uses 4, quality 20)")
    if not 0 <= s.switch <= s.steps:
        raise SpecError(
            "switch",
            f"switch {s.switch} is invalid: it must be within 0..{s.steps} — try {min(max(s.switch, 0), s.steps)}",
        )
    if not 0.0 < s.cfg <= 30.0:
        raise SpecError("cfg", f"cfg {s.cfg} is invalid — use a value in (0, 30]; 1 disables guidance")
    for name, v in (("shift_high", s.shift_high), ("shift_low", s.shift_low)):
        if not 0.0 < v <= 100.0:
            raise SpecError(name, f"{name} {v} is invalid — use a value in (0, 100]; Wan uses 5")
    if s.sampler not in SAMPLERS:
        raise SpecError("sampler", f"unknown sampler {s.sampler!r} — choose one of {', '.join(SAMPLERS)}")
    if not 0 <= r.seed < 2**63:
        raise SpecError("seed", f"seed {r.seed} is invalid — use 0..2^63-1")
    if not 1 <= o.fps <= 240:
        raise SpecError("fps", f"fps {o.fps} is invalid — use 1..240 (Wan renders at 16)")
    check_encoding(o.crf, o.x264_preset)
    for name, v in (("lora_strength_high", r.lora_strength_high), ("lora_strength_low", r.lora_strength_low)):
        if not -10.0 <= v <= 10.0:  # also rejects nan and inf
            raise SpecError(name, f"{name} {v} is invalid — use a finite value in -10..10 (the 4-step LoRAs use 1)")
    if o.interpolate not in INTERPOLATE:
        raise SpecError(
            "interpolate", f"interpolate {o.interpolate!r} is invalid — choose one of {', '.join(INTERPOLATE)}"
        )
    if o.interpolate != "off" and (o.fps % RENDER_FPS or not 2 <= o.fps // RENDER_FPS <= 16):
        near = min(max(RENDER_FPS * round(o.fps / RENDER_FPS), 2 * RENDER_FPS), 16 * RENDER_FPS)
        raise SpecError(
            "fps", f"fps {o.fps} with interpolation: the output rate must be {RENDER_FPS} x N (N = 2..16) — try {near}"
        )
    if o.interpolate != "off" and r.frames < 2:
        raise SpecError("frames", f"frames {r.frames} cannot be interpolated: interpolation needs at least 2 frames "
                                  "— use frames 5 or more, or no interpolation")  # fmt: skip
    if r.fit not in ("crop", "pad"):
        raise SpecError("fit", f"fit {r.fit!r} is invalid — choose crop or pad")
    if k.memory not in MEMORY_MODES:
        raise SpecError("memory", f"memory {k.memory!r} is invalid — choose one of {', '.join(MEMORY_MODES)}")
    if k.reserve_vram is not None:
        check_reserve(k.reserve_vram)
    return req
