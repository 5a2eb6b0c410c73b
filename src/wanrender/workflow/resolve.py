"""Where the files a workflow names are: model names against ``--models DIR`` or a
ComfyUI root (its models/ folders and its extra_model_paths.yaml), the image against
an input folder. A name that is not found lists the nearest names that are."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from wanrender.errors import WanrenderError, shown
from wanrender.workflow.evaluate import Val

# ComfyUI's folder names per category (the first is the current one, the others legacy).
FOLDERS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "loras": ("loras",),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
}
_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}
ROLES = {"high": "diffusion_models", "low": "diffusion_models", "lora_high": "loras", "lora_low": "loras",
         "text_encoder": "text_encoders", "vae": "vae"}  # fmt: skip
ROLE_TEXT = {"high": "high-noise expert", "low": "low-noise expert", "lora_high": "high-noise LoRA",
             "lora_low": "low-noise LoRA", "text_encoder": "text encoder", "vae": "VAE"}  # fmt: skip
_WEIGHTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def search_dirs(models: Path | None, comfy_root: Path | None) -> dict[str, list[Path]]:
    """Folders to look in, per category, in ComfyUI's order."""
    dirs: dict[str, list[Path]] = {c: [] for c in FOLDERS}
    if comfy_root is not None:
        if not comfy_root.is_dir():
            raise WanrenderError(f"--comfy-root {shown(comfy_root)}: not a folder — pass the folder ComfyUI runs "
                                 "from (with models/ and input/)")  # fmt: skip
        for cat, names in FOLDERS.items():
            dirs[cat] += [comfy_root / "models" / n for n in names]
        for cat, paths in extra_model_paths(comfy_root / "extra_model_paths.yaml").items():
            dirs[cat] += paths
    if models is not None:
        if not models.is_dir():
            raise WanrenderError(f"--models {shown(models)}: not a folder — pass the folder that holds the model files")
        for cat, names in FOLDERS.items():
            dirs[cat] += [models] + [models / n for n in names]
    return dirs


def extra_model_paths(path: Path) -> dict[str, list[Path]]:
    """ComfyUI's extra_model_paths.yaml: sections with a base_path (relative to the file)
    and, per category, one or more folders (one a line) relative to it."""
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise WanrenderError(
            f"{shown(path)}: cannot read it ({' '.join(str(e).split())[:120]}) — fix the YAML"
        ) from None
    out: dict[str, list[Path]] = {}
    for section in data.values() if isinstance(data, dict) else ():
        if not isinstance(section, dict):
            continue
        base = section.get("base_path")
        base_dir = path.parent
        if base:
            base_dir = Path(os.path.expandvars(os.path.expanduser(str(base))))
            if not base_dir.is_absolute():
                base_dir = path.parent / base_dir
        for key, value in section.items():
            cat = _LEGACY.get(str(key), str(key))
            if cat not in FOLDERS or value is None:
                continue
            for line in str(value).splitlines():
                line = line.strip()
                if line:
                    out.setdefault(cat, []).append(base_dir / os.path.expanduser(line))
    return out


def _clean(name: str) -> str:
    return str(name).replace("\\", "/").strip()


def find_model(role: str, name: Val, dirs: dict[str, list[Path]], hint: str) -> Path:
    want = _clean(name.value)
    folders = dirs[ROLES[role]]
    for d in folders:
        for cand in (d / want, d / Path(want).name):
            if cand.is_file():
                return cand
    known = sorted({n for d in folders for n in _listing(d)})
    raise WanrenderError(_missing(f"{ROLE_TEXT[role]} {shown(want)!r} ({name.src})", want, known,
                                  folders, hint))  # fmt: skip


def find_image(name: Val, input_dir: Path) -> Path:
    want = _clean(name.value)
    for suffix in (" [input]", " [output]", " [temp]"):  # ComfyUI's annotated names
        want = want.removesuffix(suffix)
    cand = input_dir / want
    if cand.is_file():
        return cand
    known = sorted(str(p.relative_to(input_dir)) for p in _walk(input_dir, 2)) if input_dir.is_dir() else []
    raise WanrenderError(_missing(f"image {shown(want)!r} ({name.src})", want, known, [input_dir],
                                  "pass IMAGE, or the folder with --input-dir"))  # fmt: skip


def _missing(what: str, want: str, known: list[str], folders: list[Path], hint: str) -> str:
    near = difflib.get_close_matches(want, known, n=3, cutoff=0.5) or difflib.get_close_matches(
        Path(want).name, [Path(k).name for k in known], n=3, cutoff=0.5
    )
    looked = ", ".join(shown(f) for f in dict.fromkeys(folders) if f.is_dir()) or "no existing folder"
    near_text = f"; near matches: {', '.join(near)}" if near else ""
    return f"{what} is not in {looked}{near_text} — {hint}"


def _listing(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in _walk(folder, 3) if p.name.endswith(_WEIGHTS)]


def _walk(folder: Path, depth: int) -> list[Path]:
    out: list[Path] = []
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return out
    for c in children:
        if c.is_dir() and depth > 0 and not c.name.startswith("."):
            out += _walk(c, depth - 1)
        elif c.is_file():
            out.append(c)
    return out
