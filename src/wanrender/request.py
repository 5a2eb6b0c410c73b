"""What the user asks for (``RenderRequest``), its presets, and validation at the edge.

Every error names the nearest valid value so the user can fix the flag at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.pipeline.sampling import SAMPLERS

# The official Wan 2.2 negative prompt (used when cfg != 1 and none is given).
DEFAULT_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
MAX_FRAMES = 321
RENDER_FPS = 16  # Wan renders 16 frames per second; interpolation multiplies it
INTERPOLATE = ("off", "rife", "dis")
MIN_SIDE, MAX_SIDE = 64, 2048
MEMORY_MODES = ("auto", "resident", "swap", "stream")


@dataclass(frozen=True)
class Preset:
    steps: int
    switch: int
    cfg: float
    shift_high: float
    shift_low: float
    sampler: str
    lora_strength: float  # strength of the 4-step LoRAs (0: none)
    frames: int = 81
    width: int = 832
    height: int = 1216
    description: str = ""


PRESETS: dict[str, Preset] = {
    "turbo": Preset(4, 2, 1.0, 5.0, 5.0, "euler", 1.0, description="the production workflow: 4 steps with the 4-step LoRAs"),
    "quality": Preset(20, 10, 3.5, 5.0, 5.0, "euler", 0.0, description="20 steps, CFG 3.5 with a negative prompt, no LoRA"),
    "demo": Preset(4, 2, 1.0, 5.0, 5.0, "euler", 1.0, frames=17, width=320, height=192,
                   description="tiny random-weight models, for trying the pipeline without downloads"),
}


@dataclass(frozen=True)
class RenderRequest:
    image: Path
    prompt: str
    negative: str | None = None
    preset: str = "turbo"
    frames: int = 81
    width: int = 832
    height: int = 1216
    steps: int = 4
    switch: int = 2
    cfg: float = 1.0
    shift_high: float = 5.0
    shift_low: float = 5.0
    sampler: str = "euler"
    seed: int = 0
    lora_strength_high: float = 1.0
    lora_strength_low: float = 1.0
    fit: str = "crop"
    interpolate: str = "off"
    fps: int = 16  # output frame rate: 16, or 16 x N with --interpolate
    crf: int = 18
    save_frames: bool = False
    precision: str = "auto"
    attention: str = "auto"
    compile: str = "off"
    memory: str = "auto"  # auto | resident | swap | stream (runtime/planner.py)
    reserve_vram: float | None = None  # GiB kept free on the GPU (None: the planner's default)
    out: Path | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["image"] = str(self.image)
        d["out"] = str(self.out) if self.out else None
        return d

    @property
    def interp_multiplier(self) -> int:
        return 1 if self.interpolate == "off" else self.fps // RENDER_FPS

    @property
    def negative_prompt(self) -> str:
        return DEFAULT_NEGATIVE if self.negative is None else self.negative


def from_preset(name: str, image: Path, prompt: str, **overrides: object) -> RenderRequest:
    """A request from a preset; ``overrides`` set to None keep the preset's value."""
    if name not in PRESETS:
        raise WanrenderError(f"unknown preset {name!r} — choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    base = RenderRequest(
        image=image, prompt=prompt, preset=name, frames=p.frames, width=p.width, height=p.height,
        steps=p.steps, switch=p.switch, cfg=p.cfg, shift_high=p.shift_high, shift_low=p.shift_low,
        sampler=p.sampler, lora_strength_high=p.lora_strength, lora_strength_low=p.lora_strength,
    )  # fmt: skip
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("interpolate", "off") != "off" and "fps" not in given:
        given["fps"] = 2 * RENDER_FPS
    boundary = given.pop("boundary", None)
    if boundary is not None:
        # The official Wan 2.2 rule instead of a step number: steps whose timestep is
        # >= boundary x 1000 on the high expert's schedule go to the high expert.
        if "switch" in given:
            raise WanrenderError("--switch and --boundary both set the expert switch — give only one")
        if not 0.0 < float(boundary) < 1.0:
            raise WanrenderError(f"--boundary {boundary} is invalid — use a value in (0, 1); Wan 2.2 I2V uses 0.9")
        from wanrender.pipeline.schedules import boundary_switch_step, simple_sigmas

        steps = int(given.get("steps", p.steps))
        shift = float(given.get("shift_high", p.shift_high))
        given["switch"] = boundary_switch_step(simple_sigmas(max(1, steps), shift), float(boundary))
    if "steps" in given and "switch" not in given:
        given["switch"] = max(0, round(int(given["steps"]) * p.switch / p.steps))  # keep the preset's ratio
    return validate(replace(base, **given))


def _nearest_4k1(n: int) -> int:
    return max(1, min(MAX_FRAMES, 4 * round((n - 1) / 4) + 1))


def _nearest16(n: int) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, 16 * round(n / 16)))


def validate(r: RenderRequest) -> RenderRequest:
    if not r.prompt.strip():
        raise WanrenderError("the prompt is empty — describe the motion you want, e.g. --prompt 'slow dolly-in'")
    if r.frames < 1 or (r.frames - 1) % 4 or r.frames > MAX_FRAMES:
        raise WanrenderError(f"--frames {r.frames} is invalid: frames must be 4k+1, 1..{MAX_FRAMES} — try {_nearest_4k1(r.frames)}")
    for name, v in (("width", r.width), ("height", r.height)):
        if v % 16 or not MIN_SIDE <= v <= MAX_SIDE:
            raise WanrenderError(
                f"{name} {v} is invalid: sizes must be multiples of 16 in {MIN_SIDE}..{MAX_SIDE} — try {_nearest16(v)}"
            )
    if r.steps < 1 or r.steps > 200:
        raise WanrenderError(f"--steps {r.steps} is invalid — use 1..200 (turbo uses 4, quality 20)")
    if not 0 <= r.switch <= r.steps:
        raise WanrenderError(f"--switch {r.switch} is invalid: it must be within 0..{r.steps} — try {min(max(r.switch, 0), r.steps)}")
    if not 0.0 < r.cfg <= 30.0:
        raise WanrenderError(f"--cfg {r.cfg} is invalid — use a value in (0, 30]; 1 disables guidance")
    for name, v in (("shift (high)", r.shift_high), ("shift (low)", r.shift_low)):
        if not 0.0 < v <= 100.0:
            raise WanrenderError(f"{name} {v} is invalid — use a value in (0, 100]; Wan uses 5")
    if r.sampler not in SAMPLERS:
        raise WanrenderError(f"unknown sampler {r.sampler!r} — choose one of {', '.join(SAMPLERS)}")
    if not 0 <= r.seed < 2**63:
        raise WanrenderError(f"--seed {r.seed} is invalid — use 0..2^63-1")
    if not 1 <= r.fps <= 240:
        raise WanrenderError(f"--fps {r.fps} is invalid — use 1..240 (Wan renders at 16)")
    if not 0 <= r.crf <= 51:
        raise WanrenderError(f"--crf {r.crf} is invalid — use 0..51 (lower is better quality; 18 is visually lossless)")
    for name, v in (("--lora-strength (high)", r.lora_strength_high), ("--lora-strength (low)", r.lora_strength_low)):
        if not -10.0 <= v <= 10.0:  # also rejects nan and inf
            raise WanrenderError(f"{name} {v} is invalid — use a finite value in -10..10 (the 4-step LoRAs use 1)")
    if r.interpolate not in INTERPOLATE:
        raise WanrenderError(f"--interpolate {r.interpolate!r} is invalid — choose one of {', '.join(INTERPOLATE)}")
    if r.interpolate != "off" and (r.fps % RENDER_FPS or not 2 <= r.fps // RENDER_FPS <= 16):
        near = min(max(RENDER_FPS * round(r.fps / RENDER_FPS), 2 * RENDER_FPS), 16 * RENDER_FPS)
        raise WanrenderError(
            f"--fps {r.fps} with --interpolate: the output rate must be {RENDER_FPS} x N (N = 2..16) — try {near}"
        )
    if r.fit not in ("crop", "pad"):
        raise WanrenderError(f"--fit {r.fit!r} is invalid — choose crop or pad")
    if r.memory not in MEMORY_MODES:
        raise WanrenderError(f"--memory {r.memory!r} is invalid — choose one of {', '.join(MEMORY_MODES)}")
    if r.reserve_vram is not None and not 0 <= r.reserve_vram <= 1024:
        raise WanrenderError(f"--reserve-vram {r.reserve_vram:g} is invalid — use GiB to keep free, e.g. 1 or 4")
    return r
