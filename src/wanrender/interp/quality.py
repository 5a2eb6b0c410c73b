"""``wanrender bench interp``: how well each method rebuilds frames it never saw.

Test clips are made from scikit-image's bundled photographs (real texture,
no download) moved by known camera or object motion. Every other frame is
dropped, each method rebuilds it from its two neighbours at t = 0.5, and the
rebuilt frame is scored against the dropped one with PSNR and SSIM. A user
video can be scored the same way; its own frames are the ground truth.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wanrender.errors import WanrenderError

DEFAULT_SIZE = (416, 240)  # half of Wan's 832x480, same aspect
SEQUENCE_FRAMES = 9  # frames 1, 3, 5, 7 are dropped and rebuilt
MAX_VIDEO_FRAMES = 33
_MARGIN = 1.8


@dataclass(frozen=True)
class Motion:
    """Affine motion per frame k: translate (dx, dy) px, zoom (1 + zoom)^k, rotate deg, about the centre."""

    dx: float = 0.0
    dy: float = 0.0
    zoom: float = 0.0
    deg: float = 0.0

    def matrix(self, k: float, out: tuple[int, int], canvas: tuple[int, int], ss: int) -> np.ndarray:
        """2x3 map from a canvas (centred on the output window) to the output, at frame k."""
        import cv2

        (w, h), (cw, ch) = out, canvas
        m = cv2.getRotationMatrix2D((cw / 2.0, ch / 2.0), self.deg * k, (1.0 + self.zoom) ** k)
        m[0, 2] += self.dx * k * ss - (cw - w) / 2.0
        m[1, 2] += self.dy * k * ss - (ch - h) / 2.0
        return m


@dataclass(frozen=True)
class SequenceSpec:
    name: str
    photo: str  # skimage.data function name
    motion: Motion
    # Optional foreground layer: (photo, disc radius px, motion) moving over the background.
    layer: tuple[str, int, Motion] | None = None


SEQUENCES: tuple[SequenceSpec, ...] = (
    SequenceSpec("pan-small", "astronaut", Motion(dx=1.5, dy=0.5)),
    SequenceSpec("pan-large", "coffee", Motion(dx=-10.0, dy=2.0)),
    SequenceSpec("zoom", "chelsea", Motion(zoom=0.02)),
    SequenceSpec("rotate", "rocket", Motion(deg=1.5)),
    SequenceSpec("parallax", "coffee", Motion(dx=-2.0), layer=("astronaut", 56, Motion(dx=7.0, dy=1.0))),
    SequenceSpec("mixed-large", "immunohistochemistry", Motion(dx=6.0, dy=-4.0, zoom=0.015, deg=1.0)),
)


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _cover(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize and centre-crop ``img`` to exactly w x h."""
    import cv2

    s = max(w / img.shape[1], h / img.shape[0])
    big = cv2.resize(img, (math.ceil(img.shape[1] * s), math.ceil(img.shape[0] * s)), interpolation=cv2.INTER_CUBIC)
    y0, x0 = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    return np.ascontiguousarray(big[y0 : y0 + h, x0 : x0 + w])


def render_sequence(
    spec: SequenceSpec, size: tuple[int, int] = DEFAULT_SIZE, frames: int = SEQUENCE_FRAMES
) -> np.ndarray:
    """uint8 [frames, H, W, 3]: the photo under ``spec.motion`` at k = 0..frames-1."""
    import cv2

    ss = 2  # render at 2x and area-downsample: sharp, alias-free frames
    w, h = size
    out_ss = (w * ss, h * ss)
    # The background canvas is larger than the frame so that the motions above
    # (at most ~20% of the width over a clip) never reveal its edge.
    canvas = (round(w * ss * _MARGIN), round(h * ss * _MARGIN))
    bg = _cover(_photo(spec.photo), *canvas)
    layer = None
    if spec.layer is not None:
        name, radius, _ = spec.layer
        r = radius * ss
        patch = _cover(_photo(name), 2 * r, 2 * r)
        yy, xx = np.mgrid[: 2 * r, : 2 * r]
        disc = (((yy - r + 0.5) ** 2 + (xx - r + 0.5) ** 2) <= r * r).astype(np.float32)
        # The layer lives on a frame-sized canvas, left of centre, before its own motion.
        fg_canvas = np.zeros((out_ss[1], out_ss[0], 3), np.uint8)
        alpha = np.zeros(out_ss[::-1], np.float32)
        cy, cx = out_ss[1] // 2 - r, out_ss[0] // 2 - r - out_ss[0] // 5
        fg_canvas[cy : cy + 2 * r, cx : cx + 2 * r] = patch
        alpha[cy : cy + 2 * r, cx : cx + 2 * r] = disc
        layer = (fg_canvas, alpha)
    out = np.empty((frames, h, w, 3), np.uint8)
    for k in range(frames):
        m = spec.motion.matrix(k, out_ss, canvas, ss)
        img = cv2.warpAffine(bg, m, out_ss, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        if layer is not None and spec.layer is not None:
            lm = spec.layer[2].matrix(k, out_ss, out_ss, ss)
            fg = cv2.warpAffine(layer[0], lm, out_ss, flags=cv2.INTER_CUBIC)
            a = cv2.warpAffine(layer[1], lm, out_ss, flags=cv2.INTER_LINEAR)[..., None]
            img = (fg.astype(np.float32) * a + img.astype(np.float32) * (1.0 - a) + 0.5).astype(np.uint8)
        out[k] = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return out


def score(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, SSIM) of uint8 RGB frames; PSNR is capped at 100 dB for identical frames."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    mse = float(np.mean((pred.astype(np.float64) - truth.astype(np.float64)) ** 2))
    psnr = 100.0 if mse == 0 else float(peak_signal_noise_ratio(truth, pred, data_range=255))
    ssim = float(structural_similarity(truth, pred, channel_axis=2, data_range=255))
    return psnr, ssim


def rebuild_scores(interp: Any, clip: np.ndarray) -> tuple[float, float, int, float]:
    """Drop odd frames of ``clip``, rebuild each from its neighbours; mean (PSNR, SSIM), count, seconds."""
    psnrs, ssims = [], []
    seconds = 0.0
    for k in range(1, clip.shape[0] - 1, 2):
        t0 = time.perf_counter()
        mid = interp.interpolate_pairs(clip[k - 1][None], clip[k + 1][None], [0.5])[0, 0]
        seconds += time.perf_counter() - t0
        p, s = score(mid, clip[k])
        psnrs.append(p)
        ssims.append(s)
    if not psnrs:
        raise WanrenderError(f"a clip of {clip.shape[0]} frames has no frame to rebuild — give at least 3 frames")
    return float(np.mean(psnrs)), float(np.mean(ssims)), len(psnrs), seconds


def _video_clip(path: str | os.PathLike[str], max_frames: int) -> np.ndarray:
    from wanrender.media.video import iter_video

    _, frames = iter_video(path)
    clip = []
    for frame in frames:
        clip.append(frame)
        if len(clip) >= max_frames:
            break
    if len(clip) < 3:
        raise WanrenderError(f"{path}: has {len(clip)} frame(s); scoring needs at least 3 — give a longer clip")
    return np.stack(clip)


def default_methods() -> list[str]:
    """Every method that can run here: ``rife`` only when its weights are cached."""
    from wanrender.interp.weights import rife_dir

    methods = ["repeat", "blend", "dis"]
    if (rife_dir() / "flownet.pkl").is_file():
        methods.append("rife")
    return methods


def run_quality_bench(
    methods: Sequence[str] | None = None,
    video: str | os.PathLike[str] | None = None,
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
    sequences: Sequence[str] | None = None,
    device: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    max_video_frames: int = MAX_VIDEO_FRAMES,
    progress: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Score ``methods`` (default: all that can run) on the synthetic clips or on ``video``.

    Returns rows ``{method, sequence, psnr, ssim, frames, seconds, fps}``: one
    per method and clip, then one ``sequence="mean"`` row per method (means of
    the clip rows). ``progress(method, sequence)`` is called before each clip.
    """
    from wanrender.interp import METHODS, make_interpolator

    chosen = list(methods) if methods is not None else default_methods()
    for m in chosen:
        if m not in METHODS:
            raise WanrenderError(f"unknown interpolation method {m!r} — use one of {', '.join(METHODS)}")
    if not chosen:
        raise WanrenderError("no methods to score — name at least one of " + ", ".join(METHODS))
    clips: list[tuple[str, np.ndarray]]
    if video is not None:
        clips = [(os.path.basename(os.fspath(video)), _video_clip(video, max_video_frames))]
    else:
        specs = {s.name: s for s in SEQUENCES}
        names = list(sequences) if sequences is not None else list(specs)
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise WanrenderError(f"unknown test sequence(s) {unknown} — choose from {', '.join(specs)}")
        clips = [(n, render_sequence(specs[n], size)) for n in names]

    rows: list[dict[str, Any]] = []
    for method in chosen:
        interp = make_interpolator(method, device=device, weights=weights, dtype=dtype)
        mine = []
        total_s = 0.0  # unrounded, so fast methods do not sum to zero
        for name, clip in clips:
            if progress is not None:
                progress(method, name)
            psnr, ssim, n, secs = rebuild_scores(interp, clip)
            total_s += secs
            mine.append(
                {
                    "method": method,
                    "sequence": name,
                    "psnr": round(psnr, 2),
                    "ssim": round(ssim, 4),
                    "frames": n,
                    "seconds": round(secs, 3),
                    "fps": round(n / secs, 2) if secs > 0 else None,
                }
            )
        total_n = sum(r["frames"] for r in mine)
        rows.extend(mine)
        rows.append(
            {
                "method": method,
                "sequence": "mean",
                "psnr": round(float(np.mean([r["psnr"] for r in mine])), 2),
                "ssim": round(float(np.mean([r["ssim"] for r in mine])), 4),
                "frames": total_n,
                "seconds": round(total_s, 3),
                "fps": round(total_n / total_s, 2) if total_s > 0 else None,
            }
        )
    return rows
