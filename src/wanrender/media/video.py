"""Video files in and out through PyAV (libav* linked in the wheel; no ffmpeg binary).

Frames are always ``uint8`` RGB arrays of shape ``[H, W, 3]``. Writing is
atomic: the MP4 is built under a temporary name in the destination folder and
renamed over the target only once the muxer has closed cleanly, so a crash or
a bad frame halfway never leaves a playable-looking but truncated file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from wanrender.errors import WanrenderError
from wanrender.media.atomic import atomic_path
from wanrender.spec import X264_PRESET

# Pixel formats whose chroma planes are halved in both directions; H.264 then
# needs even width and height.
_SUBSAMPLED = {"yuv420p", "nv12", "yuvj420p"}
_PIX_FMTS = {"yuv420p", "yuv444p", "yuvj420p"}


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about the first video stream."""

    width: int
    height: int
    fps: float
    frames: int  # 0 when the container does not record a count
    codec: str


def _fps_fraction(fps: float) -> Fraction:
    if not isinstance(fps, (int, float, Fraction)) or not np.isfinite(float(fps)) or fps <= 0:
        raise WanrenderError(f"fps must be a positive number, got {fps!r} — pass e.g. fps=16")
    # NTSC-style rates (29.97) survive as 30000/1001 instead of a huge denominator.
    return Fraction(fps).limit_denominator(1001)


def _check_frame(frame: Any, index: int, shape: tuple[int, ...] | None) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise WanrenderError(
            f"frame {index} is a {type(frame).__name__}, not a numpy array — pass uint8 [H,W,3] RGB arrays"
        )
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise WanrenderError(
            f"frame {index} has dtype {frame.dtype} and shape {frame.shape} — frames must be uint8 [H,W,3] RGB"
        )
    if shape is not None and frame.shape != shape:
        raise WanrenderError(
            f"frame {index} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is {shape[1]}x{shape[0]}"
            " — all frames of a video must have one size"
        )
    return np.ascontiguousarray(frame)


def _iter_input_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise WanrenderError(
                f"frames array has shape {frames.shape} — expected [T,H,W,3] (or pass an iterable of [H,W,3] frames)"
            )
        return iter(frames)
    if isinstance(frames, (str, bytes, os.PathLike)) or not isinstance(frames, Iterable):
        raise WanrenderError(
            f"frames is a {type(frames).__name__} — pass a uint8 [T,H,W,3] array or an iterable of [H,W,3] frames"
        )
    return iter(frames)


def write_video(
    frames: np.ndarray | Iterable[np.ndarray],
    path: str | os.PathLike[str],
    fps: float = 16,
    crf: int = 18,
    pix_fmt: str = "yuv420p",
    preset: str = X264_PRESET,
    *,
    lookahead: int | None = None,
    shown_as: str | os.PathLike[str] | None = None,
) -> int:
    """Encode RGB frames to an H.264 MP4 at ``path``; returns the number of frames.

    ``frames`` may be a ``[T,H,W,3]`` array or any iterable (a generator streams:
    only one frame is held at a time). Nothing appears at ``path`` unless every
    frame was encoded and the file was closed; missing folders are created.
    ``lookahead``: x264's rc-lookahead in frames (the preset's own when None; medium's is
    40). Frames wait that long in the encoder, so it is what a streamed encode still owes
    when the last frame arrives.
    ``shown_as``: the name errors give (the final name when ``path`` is a temporary one).
    """
    import av

    out = Path(path)
    rate = _fps_fraction(fps)
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise WanrenderError(f"crf must be an integer in 0..51, got {crf!r} — 18 is visually lossless")
    if pix_fmt not in _PIX_FMTS:
        raise WanrenderError(f"pix_fmt {pix_fmt!r} is not supported — use one of {sorted(_PIX_FMTS)}")
    if out.is_dir():
        raise WanrenderError(f"{out}: is a folder — give a file name ending in .mp4")

    it = _iter_input_frames(frames)
    count = 0
    with atomic_path(out) as tmp:
        container = None
        try:
            shape: tuple[int, ...] | None = None
            stream = None
            for raw in it:
                frame = _check_frame(raw, count, shape)
                if stream is None:
                    shape = frame.shape
                    h, w = shape[0], shape[1]
                    if pix_fmt in _SUBSAMPLED and (h % 2 or w % 2):
                        raise WanrenderError(
                            f"frames are {w}x{h}; H.264 {pix_fmt} needs even width and height"
                            " — crop or pad by one pixel, or use pix_fmt='yuv444p'"
                        )
                    # +faststart moves the index to the front so browsers can play while downloading.
                    container = av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
                    stream = container.add_stream("libx264", rate=rate)
                    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
                    stream.options = {"crf": str(crf), "preset": preset}
                    if lookahead is not None:
                        stream.options = {**stream.options, "rc-lookahead": str(lookahead)}
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vf.pts = count
                vf.time_base = 1 / rate
                for packet in stream.encode(vf):
                    container.mux(packet)
                count += 1
            if stream is None or container is None:
                raise WanrenderError(f"{shown_as or out}: no frames to write — the frame source was empty")
            for packet in stream.encode(None):
                container.mux(packet)
            # Closing writes the index; only a closed file may take the final name.
            container.close()
            container = None
        except av.FFmpegError as err:
            why = getattr(err, "strerror", None) or err
            raise WanrenderError(
                f"{shown_as or out}: encoding failed ({why}) — check disk space and the frame size"
            ) from err
        finally:
            if container is not None:
                try:
                    container.close()
                except Exception:  # noqa: BLE001 - the original error matters more than a close failure
                    pass
    return count


def _open_input(path: str | os.PathLike[str]) -> tuple[Any, Any, Path]:
    import av

    src = Path(path)
    if not src.exists():
        raise WanrenderError(f"{src}: no such file — check the path")
    if not src.is_file():
        raise WanrenderError(f"{src}: is not a file — give the path of a video file")
    try:
        container = av.open(str(src), mode="r")
    except av.FFmpegError as err:
        raise WanrenderError(
            f"{src}: not a readable video ({err.strerror or err})"
            " — the file is corrupt or not a video; re-export it as MP4"
        ) from err
    if not container.streams.video:
        container.close()
        raise WanrenderError(f"{src}: has no video stream — give a video file (MP4, MKV, MOV, ...)")
    return container, container.streams.video[0], src


def _stream_fps(stream: Any, src: Path) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    raise WanrenderError(f"{src}: the container records no frame rate — re-mux it with an explicit fps")


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Header facts without decoding (frame count may be 0 when not recorded)."""
    container, stream, src = _open_input(path)
    try:
        ctx = stream.codec_context
        return VideoInfo(
            width=int(ctx.width),
            height=int(ctx.height),
            fps=_stream_fps(stream, src),
            frames=int(stream.frames or 0),
            codec=str(ctx.name),
        )
    finally:
        container.close()


# MP4 edit lists can legitimately hide a frame or two that the header counts.
_TRUNCATION_SLACK = 2


def _decode(container: Any, stream: Any, src: Path) -> Iterator[np.ndarray]:
    import av

    shape: tuple[int, ...] | None = None
    index = 0
    expected = int(stream.frames or 0)
    try:
        for frame in container.decode(stream):
            arr = frame.to_ndarray(format="rgb24")
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise WanrenderError(
                    f"{src}: frame {index} is {arr.shape[1]}x{arr.shape[0]} but frame 0 is {shape[1]}x{shape[0]}"
                    " — re-encode the video at one size"
                )
            yield arr
            index += 1
        # A cut-short file decodes without any error, just fewer frames: compare
        # with the count the container header recorded, when it has one.
        if expected and index > 0 and index < expected - _TRUNCATION_SLACK:
            raise WanrenderError(
                f"{src}: only {index} of the {expected} frames the header lists could be decoded"
                " — the file is truncated; copy or render it again"
            )
    except av.FFmpegError as err:
        raise WanrenderError(
            f"{src}: video data is corrupt near frame {index} ({err.strerror or err}) — re-export the video"
        ) from err
    finally:
        container.close()


def iter_video(path: str | os.PathLike[str]) -> tuple[float, Iterator[np.ndarray]]:
    """Open ``path`` and return ``(fps, frames)`` where frames decode lazily.

    The first frame is decoded before returning so that an unreadable or empty
    file fails here, not in the middle of the caller's pipeline.
    """
    container, stream, src = _open_input(path)
    fps = _stream_fps(stream, src)
    # Frame-level threads speed decoding up; output order is unchanged.
    stream.thread_type = "AUTO"
    frames = _decode(container, stream, src)
    try:
        first = next(frames)
    except StopIteration:
        raise WanrenderError(f"{src}: contains no video frames — re-export the video") from None

    def chained() -> Iterator[np.ndarray]:
        yield first
        yield from frames

    return fps, chained()


def read_video(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode a whole video into memory: ``(frames uint8 [T,H,W,3], fps)``."""
    fps, frames = iter_video(path)
    return np.stack(list(frames)), fps


def audio_codec(path: str | os.PathLike[str]) -> str | None:
    """The codec of the first audio stream, or None when there is none."""
    import av

    try:
        with av.open(str(path), mode="r") as container:
            return str(container.streams.audio[0].codec_context.name) if container.streams.audio else None
    except av.FFmpegError:
        return None


def mux_audio(video: str | os.PathLike[str], audio_from: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write ``out``: the video stream of ``video`` and the first audio stream of
    ``audio_from``, both copied (no re-encoding). Atomic, like ``write_video``;
    raises ``WanrenderError`` when the audio cannot go into an MP4."""
    import heapq

    import av

    final = Path(out)
    with atomic_path(final) as tmp:
        with av.open(str(video), mode="r") as vin, av.open(str(audio_from), mode="r") as ain:
            try:
                container = av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
                try:
                    sources = ((vin, vin.streams.video[0]), (ain, ain.streams.audio[0]))
                    streams = [_timed_packets(c, s, container.add_stream_from_template(s), i)
                               for i, (c, s) in enumerate(sources)]  # fmt: skip
                    # Packets in time order across both streams, as a player reads them.
                    for _, _, packet, dst in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
                        packet.stream = dst
                        container.mux(packet)
                finally:
                    container.close()
            except av.FFmpegError as err:
                raise WanrenderError(f"{final}: the audio track could not be copied into MP4 ({err})") from err


def _timed_packets(container: Any, src: Any, dst: Any, order: int) -> Iterator[tuple[float, int, Any, Any]]:
    for packet in container.demux(src):
        if packet.dts is not None:  # the demuxer's empty flush packet
            yield float(packet.dts * packet.time_base), order, packet, dst


class StreamingWriter:
    """:func:`write_video` on a thread of its own, fed chunk by chunk while the frames
    are still being made (the VAE decodes on the GPU, x264 encodes on the CPU), so the
    video is on disk moments after the last frame instead of one full encode later.

    ``put`` hands frames over (never blocks); ``close`` waits for the file and returns
    the seconds it waited; ``abort`` stops and leaves no file. An encoder error
    surfaces at the next ``put`` or at ``close``.
    """

    _END, _ABORT = object(), object()

    def __init__(self, path: str | os.PathLike[str], fps: float = 16, crf: int = 18, *, preset: str = X264_PRESET,
                 lookahead: int | None = None, shown_as: str | os.PathLike[str] | None = None) -> None:  # fmt: skip
        import hashlib
        import queue
        import threading

        self.path = Path(path)
        self.frames = 0
        self.error: BaseException | None = None
        # The frames' SHA-256 as they arrive (the sidecar's frames_sha256): hashed here, on
        # the encoder's thread beside the encode (hashlib lets go of the GIL), not after it.
        self._sha256 = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: put never waits on a dead encoder
        self._stop = threading.Event()  # set by abort: the frames still queued are skipped, not encoded
        self._args = (fps, crf, preset, lookahead, shown_as)
        self._thread = threading.Thread(target=self._run, name="wanrender-encode", daemon=True)
        self._thread.start()

    def _source(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if item is self._ABORT or self._stop.is_set():
                raise _Aborted
            frames = np.ascontiguousarray(np.asarray(item))
            if frames.dtype == np.uint8 and frames.size:  # anything else the encoder refuses below
                self._sha256.update(memoryview(frames).cast("B"))
            yield from frames

    def _run(self) -> None:
        fps, crf, preset, lookahead, shown_as = self._args
        try:
            self.frames = write_video(self._source(), self.path, fps=fps, crf=crf, preset=preset, lookahead=lookahead,
                                      shown_as=shown_as)  # fmt: skip
        except BaseException as e:  # reported on the caller's thread
            self.error = e

    def put(self, frames: Any) -> None:
        """``frames``: an array [T, H, W, 3] (copied if strided), or an object that becomes one
        under ``np.asarray`` on the encoder's thread (frames still on their way from the GPU)."""
        if self.error is not None:
            raise self.error
        self._queue.put(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)

    def close(self) -> float:
        import time

        t0 = time.perf_counter()
        self._finish(self._END)
        if self.error is not None:
            raise self.error
        return time.perf_counter() - t0

    @property
    def frames_sha256(self) -> str:
        """SHA-256 of every frame handed over, in order, as uint8 bytes (after ``close``)."""
        return self._sha256.hexdigest()

    @property
    def running(self) -> bool:
        """Still encoding (or waiting for frames): neither closed nor aborted."""
        return self._thread.is_alive()

    def abort(self) -> None:
        """Stop and remove the file (nothing, once closed: the file is then the caller's).
        Waits only for the chunk being encoded: the rest of the backlog is dropped."""
        if self._thread.is_alive():
            self._stop.set()
            self._finish(self._ABORT)
            self.path.unlink(missing_ok=True)

    def _finish(self, marker: object) -> None:
        self._queue.put(marker)
        self._thread.join()


class _Aborted(Exception):
    pass
