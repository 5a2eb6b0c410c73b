"""Typed specs that cross every layer: what to render, how to sample, how to run,
where to write; the stage names; the one unit rule; the one token count.

The lowest layer: it imports nothing of wanrender but ``errors``. Errors raised here
name the spec's field (``frames``, ``vram``), never a command-line flag: the CLI maps
fields to its flags (``SpecError.field``).

Unit rule, everywhere (flags, matrices, docs): GB = 10^9 bytes, GiB = 2^30 bytes
(likewise kB/MB/TB and KiB/MiB/TiB). A "24 GB" card reported by nvidia-smi as
24564 MiB has 23.99 GiB: write 24GiB for it, or its exact MiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from wanrender.errors import WanrenderError

GIB = 1 << 30


class SpecError(WanrenderError):
    """Bad input for one field of a spec; ``field`` lets a front end name its own flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Stage(str, Enum):
    """The stages of a render, in order; their values are the keys of timings and progress events."""

    LOAD_MODELS = "load_models"
    TEXT_ENCODE = "text_encode"
    VAE_ENCODE = "vae_encode"
    EXPERT_INSTALL = "expert_install"
    PASS1_HIGH = "pass1_high"
    PASS2_LOW = "pass2_low"
    SAMPLING = "sampling"  # pass 1 + pass 2 (+ installs), a sum: not added to totals
    VAE_DECODE = "vae_decode"
    INTERPOLATE = "interpolate"
    VIDEO_ENCODE = "video_encode"
    MEMORY = "memory"  # an event, not a timed stage: a step-down after an out-of-memory error

    def __str__(self) -> str:  # f-strings and logs show the value, as the JSON does
        return self.value


# --- units ----------------------------------------------------------------------------

_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
UNIT_RULE = "GB = 10^9 bytes, GiB = 2^30 bytes"


def parse_bytes(text: str | int | float, what: str = "size", bare: str = "b") -> int:
    """'32GB' (10^9), '31.5GiB' (2^30), '800MiB' -> bytes. A number without a unit is
    in ``bare`` units (bytes unless the field says otherwise, e.g. GiB for VRAM)."""
    if isinstance(text, bool):
        raise SpecError(what, f"{what} {text!r} is invalid — use a number with a unit, e.g. 24GiB ({UNIT_RULE})")
    if isinstance(text, (int, float)):
        value, unit = float(text), bare.lower()
        if not math.isfinite(value) or value < 0:  # YAML and Python callers can pass nan, inf, -1
            raise SpecError(what, f"{what} {text!r} is invalid — use a size of 0 or more, e.g. 24GiB ({UNIT_RULE})")
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or (m.group(2) or bare).lower() not in _BYTES:
            raise SpecError(what, f"{what} {text!r} is invalid — use a number with a unit, e.g. 24GiB ({UNIT_RULE})")
        value, unit = float(m.group(1)), (m.group(2) or bare).lower()
    return int(value * _BYTES[unit])


def parse_gib(text: str | int | float, what: str = "vram", limit_gib: float = 4096) -> float:
    """A memory size in GiB (a bare number is GiB), checked to be within (0, limit]."""
    gib = parse_bytes(text, what, bare="gib") / GIB
    if not 0 < gib <= limit_gib:
        raise SpecError(what, f"{what} {text!r} is out of range — use a size such as 24GiB ({UNIT_RULE})")
    return gib


RESERVE_LIMIT_GIB = 1024


def check_reserve(gib: float | int | str, what: str = "reserve_vram", card_gib: float | None = None) -> float:
    """GPU memory to keep free, in GiB: a finite number in 0..1024, and less than the card
    (``card_gib``) when it is known — a negative reserve would plan past the card's end."""
    try:
        value = float(gib)
    except (TypeError, ValueError):
        value = math.nan
    shown = f"{value:g}" if isinstance(gib, (int, float)) and not isinstance(gib, bool) else repr(gib)
    if isinstance(gib, bool) or not math.isfinite(value) or not 0 <= value <= RESERVE_LIMIT_GIB:
        raise SpecError(
            what, f"{what} {shown} is invalid — use GiB to keep free (0 to {RESERVE_LIMIT_GIB}), e.g. 1 or 4"
        )
    if card_gib is not None and value >= card_gib:
        raise SpecError(
            what, f"{what} {value:g} leaves nothing of the card's {card_gib:.1f} GiB — use less, e.g. 1 or 4"
        )
    return value


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """'832x1216' -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise SpecError(what, f"{what} {text!r} is invalid — use WIDTHxHEIGHT, e.g. 832x1216")
    return int(m.group(1)), int(m.group(2))


# --- the DiT's token count, defined once ----------------------------------------------

TEMPORAL_STRIDE = 4  # VAE: 4 pixel frames per latent frame (after the first)
SPATIAL_STRIDE = 8  # VAE: 8x8 pixels per latent pixel
PATCH = 2  # DiT: 2x2 latent pixels per token


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL_STRIDE + 1


def tokens(frames: int, width: int, height: int) -> int:
    """L: DiT tokens of one sample (81 x 832x1216 -> 82,992)."""
    per_side = SPATIAL_STRIDE * PATCH
    return latent_frames(frames) * (height // per_side) * (width // per_side)


# Linear layers that stay on the bf16 path under fp8 (official names; the planner
# maps diffusers names onto them): small GEMMs (the text context has 512 rows; the
# embeddings and the head run once per step) or the layer that defines the output.
FP8_EXCLUDE = ("text_embedding", "time_embedding", "time_projection", "head.", "cross_attn.k", "cross_attn.v")


# --- the specs --------------------------------------------------------------------------

SAMPLERS = ("euler", "dpmpp_2m")
PRECISIONS = ("auto", "fp8", "bf16")
COMPILE_MODES = ("off", "default", "max-autotune")
MEMORY_MODES = ("auto", "resident", "swap", "stream")
INTERPOLATE = ("off", "rife", "dis")
RENDER_FPS = 16  # Wan renders 16 frames per second; interpolation multiplies it
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# The default x264 preset. Measured on an H200 host (16 cores, docs/benchmarks.md, seventh
# session), 81 frames at 832x1216, crf 18: a natural clip took 1.11 s / 0.82 MB / 40.8 dB
# PSNR with "medium" and 0.55 s / 0.63 MB / 39.8 dB with "veryfast"; streamed beside the
# VAE decode, medium left 1.7-1.9 s of encoding after the last frame (its 40-frame
# lookahead), veryfast 0.11-0.14 s. A render waits for that tail.
X264_PRESET = "veryfast"


def check_encoding(crf: int, x264_preset: str) -> None:
    """The MP4 encoder's settings, checked before any work (renders and ``interpolate``)."""
    if not 0 <= crf <= 51:
        raise SpecError("crf", f"crf {crf} is invalid — use 0..51 (lower is better quality; 18 is visually lossless)")
    if x264_preset not in X264_PRESETS:
        raise SpecError(
            "x264_preset", f"x264_preset {x264_preset!r} is invalid — choose one of {', '.join(X264_PRESETS)}"
        )


@dataclass(frozen=True)
class Sampling:
    """The two-expert sampling schedule (two KSamplerAdvanced nodes)."""

    steps: int = 4
    switch: int = 2  # the step where the low-noise expert takes over
    cfg: float = 1.0
    shift_high: float = 5.0
    shift_low: float = 5.0
    sampler: str = "euler"

    @property
    def batch(self) -> int:
        return 1 if self.cfg == 1.0 else 2  # cond + uncond in one forward


@dataclass(frozen=True)
class RenderSpec:
    """What to render: the picture, the words, the video's shape, the seed, the LoRA strengths."""

    image: Path
    prompt: str
    negative: str | None = None  # None: the official negative prompt when cfg != 1
    frames: int = 81
    width: int = 832
    height: int = 1216
    seed: int = 0
    fit: str = "crop"
    lora_strength_high: float = 1.0
    lora_strength_low: float = 1.0

    @property
    def tokens(self) -> int:
        return tokens(self.frames, self.width, self.height)

    def label(self) -> str:
        return f"{self.frames} frames at {self.width}x{self.height}"


@dataclass(frozen=True)
class RuntimeKnobs:
    """How to run it on this machine; ``auto`` values are resolved by runtime/plan.py."""

    precision: str = "auto"
    attention: str = "auto"
    compile: str = "off"
    memory: str = "auto"
    reserve_vram: float | None = None  # GiB kept free on the GPU (None: the planner's default)


@dataclass(frozen=True)
class OutputSpec:
    """Where and how the video is written."""

    out: Path | None = None  # None: a name under outputs/ from the image, preset, seed and time
    fps: int = RENDER_FPS  # 16, or 16 x N with interpolation
    crf: int = 18
    x264_preset: str = X264_PRESET  # speed against file size at the same crf
    interpolate: str = "off"
    save_frames: bool = False

    @property
    def multiplier(self) -> int:
        return 1 if self.interpolate == "off" else self.fps // RENDER_FPS


@dataclass(frozen=True)
class RenderRequest:
    """One render job: the four specs and the preset they came from."""

    render: RenderSpec
    sampling: Sampling = field(default_factory=Sampling)
    knobs: RuntimeKnobs = field(default_factory=RuntimeKnobs)
    output: OutputSpec = field(default_factory=OutputSpec)
    preset: str = "turbo"
    extra: dict = field(default_factory=dict, compare=False)  # provenance for the sidecar (e.g. the GPU profile used)

    def to_json(self) -> dict:
        """Flat, as the sidecar has always recorded it."""
        d: dict = {"preset": self.preset}
        for part in (self.render, self.sampling, self.knobs, self.output):
            d.update(asdict(part))
        d["image"] = str(self.render.image)
        d["out"] = str(self.output.out) if self.output.out else None
        d["extra"] = self.extra
        return d
