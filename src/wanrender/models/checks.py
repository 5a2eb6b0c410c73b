"""A render's model files checked before any weights are read: each file's role from
its header (a DiT given as the VAE, a VAE as an expert...), the tokenizer loaded
(it is small), the two experts told apart by name or metadata. A file in the wrong
place then fails in a second with one line, not after minutes of loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import ModelFileError, WanrenderError, check_utf8
from wanrender.models.formats import CheckpointInfo, inspect_checkpoint
from wanrender.models.inventory import ModelFiles


@dataclass(frozen=True)
class Slot:
    """Where a file is given: the flag, the role the file must have, what it is called."""

    flag: str
    role: str
    what: str
    example: str


SLOTS = {
    "high": Slot("--high", "dit", "the high-noise I2V expert", "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"),
    "low": Slot("--low", "dit", "the low-noise I2V expert", "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"),
    "vae": Slot("--vae", "vae", "the Wan 2.1 VAE", "wan_2.1_vae.safetensors"),
    "text_encoder": Slot("--text-encoder", "text_encoder", "the UMT5-XXL text encoder",
                         "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "lora_high": Slot("--lora-high", "lora", "the high-noise 4-step LoRA", "a LoRA file (…high_noise….safetensors)"),
    "lora_low": Slot("--lora-low", "lora", "the low-noise 4-step LoRA", "a LoRA file (…low_noise….safetensors)"),
}  # fmt: skip
ROLE_NAMES = {"dit": "a Wan DiT expert", "vae": "a VAE", "text_encoder": "a text encoder", "lora": "a LoRA",
              "tokenizer": "a tokenizer", "clip_vision": "a CLIP vision encoder"}  # fmt: skip
_NOISE = re.compile(r"(high|low)[ _.\-]?noise", re.IGNORECASE)


def check_model_files(files: ModelFiles) -> list[str]:
    """Raise a ``WanrenderError`` naming the flag for the first file that cannot serve
    where it was given; return warnings (the experts could not be told apart)."""
    infos: dict[str, CheckpointInfo] = {}
    for key, slot in SLOTS.items():
        path = getattr(files, key)
        if path is None:
            continue
        check_utf8(str(path), f"{slot.flag} path")  # recorded in the sidecar, which is UTF-8
        infos[key] = _check_slot(Path(path), slot)
    if files.tokenizer is not None:
        check_utf8(str(files.tokenizer), "--tokenizer path")
        check_tokenizer(Path(files.tokenizer))
    warnings = _check_experts(files, infos, "high", "low", "experts", "--high/--low")
    if files.lora_high is not None and files.lora_low is not None:
        _check_experts(files, infos, "lora_high", "lora_low", "LoRAs", "--lora-high/--lora-low")
    return warnings


def _check_slot(path: Path, slot: Slot) -> CheckpointInfo:
    if not path.exists():
        raise ModelFileError(path, f"file not found (given as {slot.flag})", "check the path")
    try:
        info = inspect_checkpoint(path)
    except ModelFileError as e:
        raise ModelFileError(e.path, f"{e.problem} (given as {slot.flag})", e.fix) from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # a header no reader understands
        raise ModelFileError(path, f"not a readable model file ({type(e).__name__}: {e}; given as {slot.flag})",
                             f"pass {slot.what} ({slot.example})") from None  # fmt: skip
    if info.role != slot.role:
        found = ROLE_NAMES.get(info.role, "not a recognised Wan model file")
        if info.role == "dit" and info.expert:
            found += f" ({info.expert}-noise)"
        raise ModelFileError(
            path, f"given as {slot.what} ({slot.flag}), but this is {found}",
            f"pass {slot.what} ({slot.example}) to {slot.flag}; 'wanrender models check DIR' shows each file's role",
        )  # fmt: skip
    if slot.role == "dit" and info.variant != "i2v":
        raise ModelFileError(path, info.notes[0] if info.notes else f"not an image-to-video expert ({info.variant})",
                             f"pass {slot.what} ({slot.example}) to {slot.flag}")  # fmt: skip
    if slot.role == "vae" and info.variant != "wan2.1":
        raise ModelFileError(path, info.notes[0] if info.notes else f"unsupported VAE ({info.variant})",
                             f"pass {slot.example} to {slot.flag}")  # fmt: skip
    if slot.role == "text_encoder" and info.variant == "t5":
        raise ModelFileError(path, info.notes[0], f"pass {slot.example} to {slot.flag}")
    return info


def check_tokenizer(path: Path) -> None:
    """Load the tokenizer now: it is small, and a junk file would otherwise fail after
    the experts were loaded."""
    from wanrender.models.loading import load_tokenizer

    try:
        load_tokenizer(path)
    except ModelFileError as e:
        raise ModelFileError(e.path, f"{e.problem} (given as the tokenizer)", e.fix) from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFileError(
            path, f"not a readable tokenizer ({type(e).__name__}: {e})",
            "pass the umt5-xxl spiece.model, its folder, or a text encoder file that carries it, to --tokenizer",
        ) from None  # fmt: skip


def expert_hint(path: Path, info: CheckpointInfo | None) -> str | None:
    """high/low as the file tells it: its name (or its folder's), else its metadata."""
    if info is not None and info.expert:
        return info.expert
    if path.is_dir():
        return None
    try:
        from wanrender.models.safetensors_io import open_checkpoint

        meta = getattr(open_checkpoint(path), "metadata", None) or {}
    except (OSError, ValueError, WanrenderError):
        return None
    found = {m.group(1).lower() for v in meta.values() if isinstance(v, str) for m in _NOISE.finditer(v)}
    return found.pop() if len(found) == 1 else None


def _check_experts(files: ModelFiles, infos: dict, hi: str, lo: str, what: str, flags: str) -> list[str]:
    """Refuse swapped or doubled experts; warn when nothing tells them apart (the
    weights of the two experts have the same shapes and no statistic here tells them apart)."""
    high, low = Path(getattr(files, hi)), Path(getattr(files, lo))
    if high.exists() and low.exists() and high.samefile(low):
        raise WanrenderError(f"{SLOTS[hi].flag} and {SLOTS[lo].flag} are the same file ({high.name}) — "
                             f"pass the high-noise and the low-noise {what} ({flags})")  # fmt: skip
    h, lw = expert_hint(high, infos.get(hi)), expert_hint(low, infos.get(lo))
    if h == "low" and lw == "high":
        raise WanrenderError(f"the {what} are swapped: {high.name} (given as {SLOTS[hi].flag}) is the low-noise one "
                             f"and {low.name} the high-noise one — swap {flags}")  # fmt: skip
    for key, hint, want in ((hi, h, "high"), (lo, lw, "low")):
        if hint is not None and hint != want:
            path = high if key == hi else low
            raise WanrenderError(f"{path.name} is named as the {hint}-noise {what[:-1]} but is given as "
                                 f"{SLOTS[key].flag} — pass the {want}-noise file there ({flags})")  # fmt: skip
    unknown = [SLOTS[k].flag for k, hint in ((hi, h), (lo, lw)) if hint is None]
    if unknown:
        return [f"cannot tell which {what[:-1]} {' and '.join(unknown)} is (no high_noise/low_noise in the file "
                f"name or metadata) — make sure {flags} are not swapped"]  # fmt: skip
    return []
