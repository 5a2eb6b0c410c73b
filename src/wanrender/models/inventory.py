"""What a models folder holds, and what a render would still need (``wanrender models check``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wanrender.errors import ModelFileError, WanrenderError
from wanrender.models.formats import WEIGHT_SUFFIXES, CheckpointInfo, find_weights, inspect_checkpoint

# Precision preference when a folder holds several copies of one component.
_PREFERENCE = ("fp8_scaled", "bf16", "fp16", "fp8_e4m3fn", "fp32", "")
_MAX_DEPTH = 4


@dataclass(frozen=True)
class ModelFiles:
    """The files one render loads: both experts, the VAE, the text encoder and its
    tokenizer (often the text encoder file itself), and the optional 4-step LoRAs."""

    high: Path
    low: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    lora_high: Path | None = None
    lora_low: Path | None = None

    def as_dict(self) -> dict[str, Path | None]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Entry:
    path: Path
    info: CheckpointInfo | None
    error: str | None = None


@dataclass(frozen=True)
class ModelSet:
    """The files a two-expert I2V render uses. ``tokenizer`` may be the text encoder file itself."""

    high: Path | None = None
    low: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    lora_high: Path | None = None
    lora_low: Path | None = None
    entries: tuple[Entry, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def missing(self) -> list[str]:
        need = {
            "high": "the high-noise I2V expert (e.g. wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors)",
            "low": "the low-noise I2V expert (e.g. wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors)",
            "vae": "the Wan 2.1 VAE (wan_2.1_vae.safetensors)",
            "text_encoder": "the UMT5-XXL text encoder (umt5_xxl_fp8_e4m3fn_scaled.safetensors)",
            "tokenizer": "the umt5 tokenizer (spiece.model, or a text encoder file that carries it)",
        }
        return [text for name, text in need.items() if getattr(self, name) is None]

    def require_complete(self, where: Path) -> None:
        missing = self.missing()
        if missing:
            raise WanrenderError(
                f"{where}: missing {'; '.join(missing)} — run 'wanrender models fetch --dir {where}' "
                "or pass the files with --high/--low/--vae/--text-encoder"
            )


def _candidates(root: Path) -> list[Path]:
    """Weights files, shard indexes and single-model folders below ``root``."""
    out: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return
        if folder != root and (
            any(c.name.endswith(".safetensors.index.json") for c in children)
            or ((folder / "config.json").is_file() and find_weights(folder) is not None)
            or ((folder / "spiece.model").is_file() and find_weights(folder) is None)
        ):
            out.append(folder)
            return
        for c in children:
            if c.is_dir() and depth < _MAX_DEPTH and not c.name.startswith("."):
                walk(c, depth + 1)
            elif c.is_file() and (c.name.endswith(WEIGHT_SUFFIXES) or c.name == "spiece.model"):
                out.append(c)
            elif c.is_file() and c.name.endswith(".safetensors.index.json"):
                out.append(c)

    walk(root, 0)
    return out


def scan(root: str | os.PathLike) -> ModelSet:
    """Inspect everything below ``root`` and pick one file per role."""
    root = Path(root)
    if not root.is_dir():
        raise WanrenderError(f"{root}: not a folder — pass the folder that holds the model files")
    entries: list[Entry] = []
    for path in _candidates(root):
        try:
            entries.append(Entry(path, inspect_checkpoint(path)))
        except ModelFileError as e:
            entries.append(Entry(path, None, f"{e.problem} — {e.fix}"))
        except OSError as e:
            entries.append(Entry(path, None, f"cannot read it ({e.strerror}) — check its permissions"))
    return choose(entries)


def _rank(info: CheckpointInfo) -> int:
    return _PREFERENCE.index(info.precision) if info.precision in _PREFERENCE else len(_PREFERENCE)


def choose(entries: list[Entry]) -> ModelSet:
    picks: dict[str, list[CheckpointInfo]] = {}
    notes: list[str] = []
    for e in entries:
        info = e.info
        if info is None:
            continue
        if info.role == "dit":
            if info.variant != "i2v":
                notes.append(f"{e.path.name}: {info.notes[0] if info.notes else info.variant} (not used)")
                continue
            if info.expert is None:
                notes.append(f"{e.path.name}: an I2V expert, but its name says neither high_noise nor low_noise")
                continue
            picks.setdefault(info.expert, []).append(info)
        elif info.role == "lora":
            if info.expert:
                picks.setdefault(f"lora_{info.expert}", []).append(info)
        elif info.role == "vae":
            if info.variant != "wan2.1":
                notes.append(f"{e.path.name}: {info.notes[0] if info.notes else info.variant} (not used)")
                continue
            picks.setdefault("vae", []).append(info)
        elif info.role == "text_encoder":
            if info.variant == "t5":
                notes.append(f"{e.path.name}: {info.notes[0]} (not used)")
                continue
            picks.setdefault("text_encoder", []).append(info)
        elif info.role == "tokenizer":
            picks.setdefault("tokenizer", []).append(info)
    chosen: dict[str, Path | None] = {}
    for role, infos in picks.items():
        infos.sort(key=lambda i: (_rank(i), str(i.path)))
        chosen[role] = infos[0].path
        if len(infos) > 1:
            others = ", ".join(i.path.name for i in infos[1:])
            notes.append(f"{role}: using {infos[0].path.name} ({infos[0].precision}); also found {others}")
    tokenizer = chosen.get("tokenizer")
    if tokenizer is None and "text_encoder" in picks:
        te = picks["text_encoder"][0]
        if te.has_tokenizer:
            tokenizer = te.path
    return ModelSet(
        high=chosen.get("high"),
        low=chosen.get("low"),
        vae=chosen.get("vae"),
        text_encoder=chosen.get("text_encoder"),
        tokenizer=tokenizer,
        lora_high=chosen.get("lora_high"),
        lora_low=chosen.get("lora_low"),
        entries=tuple(entries),
        notes=tuple(notes),
    )


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def resolve_files(
    models_dir: Path | None,
    high: Path | None = None,
    low: Path | None = None,
    vae: Path | None = None,
    text_encoder: Path | None = None,
    tokenizer: Path | None = None,
    lora_high: Path | None = None,
    lora_low: Path | None = None,
) -> ModelFiles:
    """Explicit files win; the rest is found in ``models_dir``."""
    found = scan(models_dir) if models_dir is not None else ModelSet()
    picked = ModelSet(
        high=high or found.high, low=low or found.low, vae=vae or found.vae,
        text_encoder=text_encoder or found.text_encoder,
        tokenizer=tokenizer or found.tokenizer or (text_encoder if text_encoder else None),
        lora_high=lora_high or found.lora_high, lora_low=lora_low or found.lora_low,
    )  # fmt: skip
    if picked.missing():
        if models_dir is None:
            raise WanrenderError(
                f"missing {'; '.join(picked.missing())} — pass --models DIR (after 'wanrender models fetch --dir DIR') "
                "or the files with --high/--low/--vae/--text-encoder"
            )
        picked.require_complete(models_dir)
    return ModelFiles(
        high=picked.high,
        low=picked.low,
        vae=picked.vae,
        text_encoder=picked.text_encoder,  # type: ignore[arg-type]
        tokenizer=picked.tokenizer,
        lora_high=picked.lora_high,
        lora_low=picked.lora_low,  # type: ignore[arg-type]
    )
