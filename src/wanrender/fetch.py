"""``wanrender models fetch``: download the standard file set, only when asked.

Downloads go through ``huggingface_hub`` (resumable; interrupted files continue),
then each file's SHA-256 is checked against the hub's LFS checksum. A file that
fails the check is deleted, never left under its final name.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.paths import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str  # path inside the repository
    dest: str  # name under the target folder
    approx_gb: float
    role: str


COMFY_22 = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
COMFY_21 = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"

STANDARD_SET: tuple[RemoteFile, ...] = (
    RemoteFile(COMFY_22, "split_files/diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
               "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", 14.3, "high-noise expert"),
    RemoteFile(COMFY_22, "split_files/diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
               "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", 14.3, "low-noise expert"),
    RemoteFile(COMFY_22, "split_files/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
               "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors", 0.6, "4-step LoRA (high)"),
    RemoteFile(COMFY_22, "split_files/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
               "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", 0.6, "4-step LoRA (low)"),
    RemoteFile(COMFY_21, "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
               "umt5_xxl_fp8_e4m3fn_scaled.safetensors", 6.7, "text encoder"),
    RemoteFile(COMFY_21, "split_files/vae/wan_2.1_vae.safetensors", "wan_2.1_vae.safetensors", 0.25, "VAE"),
    RemoteFile("google/umt5-xxl", "spiece.model", "umt5-xxl-tokenizer/spiece.model", 0.005, "tokenizer"),
)  # fmt: skip

Downloader = Callable[[RemoteFile, Path], tuple[Path, str | None]]


def _hf_download(f: RemoteFile, cache: Path) -> tuple[Path, str | None]:
    """Download into the hub's local-dir cache (resumable); return (path, expected sha256)."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError:
        raise WanrenderError("downloading needs huggingface_hub — run: pip install huggingface_hub") from None
    try:
        meta = get_hf_file_metadata(hf_hub_url(f.repo, f.path))
        expected = (meta.etag or "").strip('"') if meta.etag and len(meta.etag.strip('"')) == 64 else None
        local = hf_hub_download(f.repo, f.path, local_dir=str(cache))
    except Exception as e:  # network, auth, missing file: one line for the user
        raise WanrenderError(
            f"download of {f.repo}/{f.path} failed ({type(e).__name__}: {e}) — check the network and retry; finished files are kept"
        ) from None
    return Path(local), expected


def fetch(
    dest: Path,
    files: tuple[RemoteFile, ...] = STANDARD_SET,
    downloader: Downloader = _hf_download,
    progress: Callable[[RemoteFile, str], None] | None = None,
) -> list[Path]:
    """Download ``files`` into ``dest``; files already there with the right checksum are kept."""
    dest.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(dest).free / 1e9
    need = sum(f.approx_gb for f in files if not (dest / f.dest).exists())
    if need > free_gb:
        raise WanrenderError(
            f"{dest}: about {need:.0f} GB to download but only {free_gb:.0f} GB free — free space or choose another --dir"
        )
    cache = dest / ".download"
    out = []
    for f in files:
        final = dest / f.dest
        if progress:
            progress(f, "start")
        local, expected = downloader(f, cache)
        if expected is not None:
            got = sha256_file(local)
            if got != expected:
                local.unlink(missing_ok=True)
                raise WanrenderError(
                    f"{f.dest}: checksum mismatch (got {got[:12]}…, expected {expected[:12]}…) — the download was damaged; run the command again"
                )
        final.parent.mkdir(parents=True, exist_ok=True)
        if local.resolve() != final.resolve():
            os.replace(local, final)
        out.append(final)
        if progress:
            progress(f, "verified" if expected else "done (no checksum published)")
    shutil.rmtree(cache, ignore_errors=True)
    return out
