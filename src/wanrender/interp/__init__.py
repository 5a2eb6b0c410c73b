"""Frame interpolation: 16 fps Wan renders to 32 fps (or any xN).

Methods: ``rife`` (RIFE 4.25/4.26, needs ``wanrender models fetch rife``),
``dis`` (OpenCV optical flow, no weights), ``blend`` and ``repeat`` (baselines).
Heavy modules (torch, cv2) load only when a function here is called.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from wanrender.errors import WanrenderError

METHODS = ("rife", "dis", "blend", "repeat")

__all__ = ["METHODS", "interpolate_video", "make_interpolator"]


def make_interpolator(
    method: str = "rife",
    *,
    device: str | None = None,
    weights: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    dtype: str | None = None,
    scale: float = 1.0,
    batch_pairs: int | None = None,
) -> Any:
    """An object with ``interpolate_pairs``/``interpolate_pair`` for ``method``."""
    from wanrender.interp import flow

    if method == "rife":
        from wanrender.interp.rife import RifeInterpolator

        return RifeInterpolator(weights=weights, device=device, dtype=dtype, scale=scale, batch_pairs=batch_pairs)
    if method == "dis":
        return flow.DisInterpolator()
    if method == "blend":
        return flow.BlendInterpolator()
    if method == "repeat":
        return flow.RepeatInterpolator()
    raise WanrenderError(f"unknown interpolation method {method!r} — use one of {', '.join(METHODS)}")


def interpolate_video(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    multiplier: int = 2,
    method: str = "rife",
    device: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    scale: float = 1.0,
    batch_pairs: int | None = None,
    scene_cut: float | None = None,
    keep_duration: bool = False,
    crf: int = 18,
) -> dict[str, Any]:
    """Interpolate a video file to ``multiplier`` x its frame rate, streaming.

    Frames are decoded, interpolated and encoded as they go (memory does not
    grow with length); the output appears atomically at ``out_path``.
    ``progress(done, total)`` counts input frames (total may be None).
    ``scene_cut`` overrides the cut threshold (see ``flow.scene_cut_score``);
    pass a value above 1 to disable cut detection. Returns timings and counts.
    """
    from wanrender.interp import flow
    from wanrender.media.video import iter_video, probe_video, write_video

    t_start = time.perf_counter()
    multiplier = flow.check_multiplier(multiplier)
    if method not in METHODS:
        raise WanrenderError(f"unknown interpolation method {method!r} — use one of {', '.join(METHODS)}")
    info = probe_video(in_path)
    interp = make_interpolator(
        method, device=device, weights=weights, dtype=dtype, scale=scale, batch_pairs=batch_pairs
    )
    t_loaded = time.perf_counter()
    fps, frames = iter_video(in_path)
    stats = flow.InterpStats()
    threshold = flow.DEFAULT_SCENE_CUT if scene_cut is None else float(scene_cut)
    out_frames = flow.interpolate_frames(
        frames,
        interp,
        multiplier,
        scene_cut=threshold if threshold <= 1.0 else None,
        keep_duration=keep_duration,
        stats=stats,
        progress=progress,
        total_frames=info.frames or None,
    )
    written = write_video(out_frames, Path(out_path), fps=fps * multiplier, crf=crf)
    t_end = time.perf_counter()
    new_frames = written - stats.frames_in
    return {
        "method": method,
        "device": str(getattr(interp, "device", "cpu")),
        "dtype": getattr(interp, "dtype_name", None),
        "multiplier": multiplier,
        "width": info.width,
        "height": info.height,
        "fps_in": fps,
        "fps_out": fps * multiplier,
        "frames_in": stats.frames_in,
        "frames_out": written,
        "scene_cuts": list(stats.scene_cuts),
        "seconds_load": t_loaded - t_start,
        "seconds_model": stats.seconds_model,
        "seconds_total": t_end - t_start,
        # Throughput of the method alone, in generated frames per second.
        "new_frames_per_second": new_frames / stats.seconds_model if stats.seconds_model > 0 else None,
    }
