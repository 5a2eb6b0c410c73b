"""A render's outputs — the video (interpolated if asked), optional PNG frames, the JSON
sidecar — written all or nothing.

Each file is made under a temporary name first. Only when all of them exist are they
put in place: files already at those names are first moved aside, the new ones renamed
in, and the old ones deleted last; a failure at any point puts the old ones back. So an
error or Ctrl-C leaves either the complete new set or every earlier file untouched,
and a frames folder that wanrender did not write is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wanrender.errors import WanrenderError, check_utf8, shown
from wanrender.media.atomic import check_target, temp_sibling
from wanrender.spec import RenderRequest, Stage

FRAMES_MARKER = ".wanrender-frames"
Progress = Callable[[str, int | None, int | None, str], None]


def default_out(req: RenderRequest) -> Path:
    """outputs/<image>_<preset>_s<seed>_<time>.mp4; a second render within the same
    second gets a numbered name instead of replacing the first."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{req.render.image.stem}_{req.preset}_s{req.render.seed}_{stamp}"
    out = Path("outputs") / f"{base}.mp4"
    n = 2
    while existing_outputs(out, req.output.save_frames):
        out = Path("outputs") / f"{base}-{n}.mp4"
        n += 1
    return out


def frames_folder(out: Path) -> Path:
    return out.with_name(f"{out.stem}_frames")


def sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def _partial(p: Path) -> Path:
    return p.with_name(f".{p.name}.partial")


def video_partial(out: Path) -> Path:
    """Where the video is encoded before the outputs are committed (a streaming encoder
    writes it while the frames are still being decoded)."""
    return _partial(out)


def _previous(p: Path) -> Path:
    return p.with_name(f".{p.name}.previous")


def _finals(out: Path, save_frames: bool) -> dict[str, Path]:
    final = {"video": out, "sidecar": sidecar_path(out)}
    if save_frames:
        final["frames"] = frames_folder(out)
    return final


def existing_outputs(out: Path, save_frames: bool) -> list[Path]:
    """The files (and frames folder) a render to ``out`` would replace."""
    return [p for p in _finals(out, save_frames).values() if p.exists() or p.is_symlink()]


def check_out(req: RenderRequest) -> None:
    """Refuse, before anything is rendered, outputs that could not be written, and
    files there that wanrender did not write (a sidecar name taken by another JSON)."""
    out = req.output.out
    if out is None:
        raise WanrenderError("the request has no output path — set output.out (the runner fills a default)")
    check_utf8(str(out), "the output name")
    if out.suffix.lower() != ".mp4":
        raise WanrenderError(f"{shown(out)}: the video is written as MP4 — use a name ending in .mp4")
    final = _finals(out, req.output.save_frames)
    derived = [n for p in final.values() for n in (p.name, _previous(p).name, temp_sibling(_partial(p)).name)]
    check_target(out, derived)
    if final["sidecar"].is_dir():
        raise WanrenderError(
            f"{shown(final['sidecar'])}: is a folder — give another output name (the video and its .json sidecar)"
        )
    check_sidecar_is_ours(sidecar_path(out))
    if req.output.save_frames:
        check_frames_folder(out)


def check_sidecar_is_ours(path: Path) -> None:
    """A JSON file at the sidecar's name that is not a wanrender sidecar (``settings.json``
    next to ``-o settings.mp4``) is the user's: never replace it."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = json.loads(path.read_bytes()[: 64 << 20])
        ours = isinstance(data, dict) and "wanrender" in (data.get("versions") or {})
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise WanrenderError(
            f"{shown(path)} exists and is not a wanrender sidecar — the video's sidecar would replace it; "
            "move it or choose another output name"
        )


def check_frames_folder(out: Path) -> None:
    """Refuse before rendering to replace a folder wanrender did not write."""
    folder = frames_folder(out)
    if folder.exists() and not (folder / FRAMES_MARKER).exists():
        raise WanrenderError(
            f"{shown(folder)} exists and was not written by wanrender — move it or choose another output name"
        )


def _write_frames(frames: np.ndarray, tmp: Path) -> None:
    from PIL import Image

    tmp.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp / f"frame_{i:05d}.png")
    (tmp / FRAMES_MARKER).write_text("PNG frames of a wanrender video; replaced by the next render to this name\n")


def interpolate(req: RenderRequest, frames: np.ndarray, device, timings: dict, meta: dict,
                progress: Progress | None) -> np.ndarray:  # fmt: skip
    """16 fps frames -> the output rate with the chosen method (RIFE on the render's device)."""
    o = req.output
    if o.interpolate == "off":
        return frames
    from wanrender.interp import make_interpolator
    from wanrender.interp.flow import interpolate_frames

    if progress:
        progress(Stage.INTERPOLATE.value, None, None, "start")
    t0 = time.perf_counter()
    interp = make_interpolator(o.interpolate, device=str(device) if o.interpolate == "rife" else None)
    out = np.stack(list(interpolate_frames(iter(frames), interp, o.multiplier)))
    timings[Stage.INTERPOLATE.value] = time.perf_counter() - t0
    meta["interpolation"] = {"method": o.interpolate, "multiplier": o.multiplier,
                             "frames_in": int(frames.shape[0]), "frames_out": int(out.shape[0])}  # fmt: skip
    if progress:
        progress(Stage.INTERPOLATE.value, None, None, f"{timings[Stage.INTERPOLATE.value]:.2f}s")
    return out


def write_outputs(req: RenderRequest, frames: np.ndarray, rendered: np.ndarray, timings: dict[str, float],
                  sidecar: Callable[[], dict], progress: Progress | None = None,
                  stream=None) -> tuple[Path, Path]:  # fmt: skip
    """Encode ``frames`` (interpolated, if asked) to ``req.output.out``, the ``rendered``
    frames as PNGs if asked, then the sidecar (``sidecar()`` is called last, so it sees
    the encode's timing); returns (video, sidecar). ``stream``: a media.video.StreamingWriter
    that has been encoding the frames into the video's temporary file during the decode;
    then only its end is waited for (``video_encode`` is that wait)."""
    from wanrender.media.sidecar import write_sidecar
    from wanrender.media.video import write_video

    out = req.output.out
    assert out is not None
    final = _finals(out, req.output.save_frames)
    tmp = {k: _partial(p) for k, p in final.items()}
    try:
        for k, p in tmp.items():
            if not (stream is not None and k == "video"):
                _remove(p)
        if progress:
            progress(Stage.VIDEO_ENCODE.value, None, None, "start")
        t0 = time.perf_counter()
        if stream is not None:
            stream.close()
        else:
            write_video(frames, tmp["video"], fps=req.output.fps, crf=req.output.crf, preset=req.output.x264_preset,
                        shown_as=out)  # fmt: skip
        timings[Stage.VIDEO_ENCODE.value] = time.perf_counter() - t0
        if progress:
            progress(Stage.VIDEO_ENCODE.value, None, None, f"{timings[Stage.VIDEO_ENCODE.value]:.2f}s")
        if "frames" in tmp:
            _write_frames(rendered, tmp["frames"])
        write_sidecar(tmp["sidecar"], sidecar())
        # Still ours: checked before rendering, checked again before replacing.
        check_sidecar_is_ours(final["sidecar"])
        if "frames" in final and final["frames"].exists():
            check_frames_folder(out)
        _commit(tmp, final)
    finally:
        if stream is not None:
            stream.abort()  # a failure before its end: no encoder left running
        for p in tmp.values():
            _remove(p)
    return final["video"], final["sidecar"]


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _commit(tmp: dict[str, Path], final: dict[str, Path]) -> None:
    """Rename every ``tmp`` onto its ``final`` name as one step: earlier files there are
    moved aside first and put back if any rename fails, deleted once all succeeded."""
    aside = {k: _previous(p) for k, p in final.items()}
    moved: list[str] = []
    placed: list[str] = []
    try:
        for k, p in final.items():
            _remove(aside[k])
            if p.exists() or p.is_symlink():
                os.replace(p, aside[k])
                moved.append(k)
        for k in final:
            os.replace(tmp[k], final[k])
            placed.append(k)
    except BaseException:
        for k in placed:
            _remove(final[k])
        for k in moved:
            os.replace(aside[k], final[k])
        raise
    for k in moved:
        _remove(aside[k])
