"""Start-image intake: validate, decode safely, and fit to the render size.

Checks happen before any pixel is decoded: a 20000x20000 image is refused from its
header. Decoding handles what phones and editors produce: EXIF rotation, CMYK
JPEGs, 16-bit PNGs, palettes and alpha (composited over white, with a warning).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanrender.errors import WanrenderError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # ~8000x8000: far above any render size, far below a decompression bomb
MIN_SIDE = 16
FIT_MODES = ("crop", "pad")


def _err(path: Path, problem: str, fix: str) -> WanrenderError:
    return WanrenderError(f"{path}: {problem} — {fix}")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as float32 RGB [H, W, 3] in [0, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise _err(p, "image not found", "check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
    except UnidentifiedImageError:
        raise _err(p, "not an image file (or a format Pillow cannot read)", "pass a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _err(p, "image is too large to decode safely", f"resize it below {MAX_PIXELS // 1_000_000} MP") from None
    except OSError as e:
        raise _err(p, f"cannot read the image ({e})", "re-export or re-download it") from None
    with img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise _err(p, f"image is {w}x{h} ({w * h / 1e6:.0f} MP)", f"resize it below {MAX_PIXELS // 1_000_000} MP")
        if min(w, h) < MIN_SIDE:
            raise _err(
                p,
                f"image is only {w}x{h}",
                f"use an image at least {MIN_SIDE}x{MIN_SIDE} (ideally near the render size)",
            )
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = _to_rgb_float(img, p)
        except OSError as e:
            raise _err(p, f"image data is damaged ({e})", "re-export or re-download it") from None
    return arr


def _to_rgb_float(img, p: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grayscale: scale by the real range, not by 8 bits.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a / top, 0, 1).astype(np.float32)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        g = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        a = np.asarray(rgba, dtype=np.float32) / 255.0
        if (a[..., 3] < 1).any():
            log.warning("%s has transparency: composited over white", p.name)
        rgb = a[..., :3] * a[..., 3:4] + (1 - a[..., 3:4])
        return rgb.astype(np.float32)
    if mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, L, 1: Pillow's conversions are colour-correct enough here
    return np.asarray(img, dtype=np.float32) / 255.0


def fit_image(rgb: np.ndarray, width: int, height: int, mode: str = "crop") -> torch.Tensor:
    """Fit [H, W, 3] to [3, height, width].

    ``crop`` matches ComfyUI's ``common_upscale(..., "bilinear", "center")`` used by
    WanImageToVideo: centre-crop to the target aspect, then bilinear resize (no
    antialias, as ComfyUI). ``pad`` fits the whole image inside and pads with black.
    """
    if mode not in FIT_MODES:
        raise WanrenderError(f"unknown fit mode {mode!r} — choose one of {', '.join(FIT_MODES)}")
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    h0, w0 = x.shape[-2:]
    if mode == "crop":
        old, new = w0 / h0, width / height
        cx = cy = 0
        if old > new:
            cx = round((w0 - w0 * (new / old)) / 2)
        elif old < new:
            cy = round((h0 - h0 * (old / new)) / 2)
        x = x[..., cy : h0 - cy, cx : w0 - cx]
        return F.interpolate(x, size=(height, width), mode="bilinear").clamp(0, 1)[0]
    scale = min(width / w0, height / h0)
    nw, nh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True).clamp(0, 1)
    out = torch.zeros(1, 3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[..., top : top + nh, left : left + nw] = x
    return out[0]
