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

from wanrender.errors import WanrenderError, shown

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
    x264_preset: str | None = None,
) -> dict[str, Any]:
    """Interpolate a video file to ``multiplier`` x its frame rate, streaming.

    Frames are decoded, interpolated and encoded as they go (memory does not
    grow with length); the output appears atomically at ``out_path``.
    ``progress(done, total)`` counts input frames (total may be None).
    ``scene_cut`` overrides the cut threshold (see ``flow.scene_cut_score``);
    pass a value above 1 to disable cut detection. ``x264_preset``: None for
    ``spec.X264_PRESET``. Returns timings and counts.
    """
    from wanrender.interp import flow
    from wanrender.media.video import audio_codec, iter_video, probe_video
    from wanrender.spec import X264_PRESET, check_encoding

    t_start = time.perf_counter()
    preset = X264_PRESET if x264_preset is None else x264_preset
    check_encoding(crf, preset)
    multiplier = flow.check_multiplier(multiplier)
    if method not in METHODS:
        raise WanrenderError(f"unknown interpolation method {method!r} — use one of {', '.join(METHODS)}")
    out = Path(out_path)
    check_paths(in_path, out)
    info = probe_video(in_path)
    # H.264 (yuv420p) needs even sides: pad odd ones by repeating the last row/column,
    # decided now rather than failing at the encoder after the work.
    pad_h, pad_w = info.height % 2, info.width % 2
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
    if pad_h or pad_w:
        import numpy as np

        out_frames = (np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") for f in out_frames)
    codec = audio_codec(in_path)
    written, audio = _write(out_frames, out, Path(in_path) if codec else None, fps * multiplier, crf, preset)
    t_end = time.perf_counter()
    new_frames = written - stats.frames_in
    return {
        "method": method,
        "device": str(getattr(interp, "device", "cpu")),
        "dtype": getattr(interp, "dtype_name", None),
        "multiplier": multiplier,
        "crf": crf,
        "x264_preset": preset,
        "width": info.width,
        "height": info.height,
        "fps_in": fps,
        "fps_out": fps * multiplier,
        "frames_in": stats.frames_in,
        "frames_out": written,
        "scene_cuts": list(stats.scene_cuts),
        "padded_to": [info.width + pad_w, info.height + pad_h] if pad_h or pad_w else None,
        "audio": None if codec is None else (f"copied ({codec})" if audio is None else f"dropped: {audio}"),
        "seconds_load": t_loaded - t_start,
        "seconds_model": stats.seconds_model,
        "seconds_total": t_end - t_start,
        # Throughput of the method alone, in generated frames per second.
        "new_frames_per_second": new_frames / stats.seconds_model if stats.seconds_model > 0 else None,
    }


def _video_only(out: Path) -> Path:
    return out.with_name(f".{out.name}.video")


def check_paths(src: str | os.PathLike[str], out: Path) -> None:
    """Refuse, before the work, an output that is the input itself (also through a
    link or another spelling of the path) or that could not be written."""
    from wanrender.media.atomic import check_target, temp_sibling

    src = Path(src)
    if out.suffix.lower() != ".mp4":
        raise WanrenderError(f"{shown(out)}: the video is written as MP4 — use a name ending in .mp4")
    video = _video_only(out)
    check_target(out, (temp_sibling(out).name, video.name, temp_sibling(video).name))
    if src.exists() and out.exists() and os.path.samefile(src, out):
        raise WanrenderError(f"{shown(out)} is the input video — write to another file (it would be overwritten)")


def _write(frames: Any, out: Path, audio_from: Path | None, fps: float, crf: int,
           preset: str) -> tuple[int, str | None]:  # fmt: skip
    """Encode ``frames`` to ``out`` with ``audio_from``'s audio track copied; returns
    (frames written, why the audio was dropped or None)."""
    from wanrender.media.video import mux_audio, write_video

    if audio_from is None:
        return write_video(frames, out, fps=fps, crf=crf, preset=preset), None
    video = _video_only(out)
    try:
        written = write_video(frames, video, fps=fps, crf=crf, preset=preset, shown_as=out)
        try:
            mux_audio(video, audio_from, out)
            return written, None
        except WanrenderError as e:  # e.g. a codec MP4 cannot hold: keep the video, say so
            os.replace(video, out)
            return written, str(e).split(": ", 1)[-1]
    finally:
        video.unlink(missing_ok=True)
