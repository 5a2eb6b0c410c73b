"""PyAV video IO: round trips, atomic writes, and one clear error per bad input."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from wanrender.errors import WanrenderError
from wanrender.media import iter_video, probe_video, read_video, write_video


def _clip(t: int = 12, h: int = 64, w: int = 96) -> np.ndarray:
    """Smooth moving gradients: H.264 at crf 18 reproduces them within a few levels."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    frames = []
    for k in range(t):
        r = 128 + 100 * np.sin((xx + 3 * k) / 15.0)
        g = 128 + 100 * np.cos((yy - 2 * k) / 11.0)
        b = np.full_like(r, 40 + 10 * k)
        frames.append(np.stack([r, g, b], axis=2).clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def _one_clear_line(err: pytest.ExceptionInfo[WanrenderError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and " — " in msg, msg
    return msg


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_round_trip_array(tmp_path: Path) -> None:
    clip = _clip()
    out = tmp_path / "a.mp4"
    assert write_video(clip, out, fps=16) == len(clip)
    frames, fps = read_video(out)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert fps == pytest.approx(16.0)
    assert np.abs(frames.astype(int) - clip.astype(int)).mean() < 3.0
    info = probe_video(out)
    assert (info.width, info.height, info.frames, info.codec) == (96, 64, 12, "h264")
    assert _leftovers(tmp_path) == []


def test_round_trip_streaming_32fps(tmp_path: Path) -> None:
    clip = _clip(t=9, h=48, w=80)
    out = tmp_path / "b.mp4"
    assert write_video((f for f in clip), out, fps=32, crf=10) == 9
    fps, frames = iter_video(out)
    assert fps == pytest.approx(32.0)
    got = list(frames)
    assert len(got) == 9 and got[0].shape == (48, 80, 3)


def test_fractional_fps(tmp_path: Path) -> None:
    out = tmp_path / "ntsc.mp4"
    write_video(_clip(t=4), out, fps=float(Fraction(30000, 1001)))
    assert probe_video(out).fps == pytest.approx(29.97, abs=0.01)


def test_odd_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WanrenderError, match="even width and height") as err:
        write_video(_clip(t=3, h=63, w=96), tmp_path / "odd.mp4")
    _one_clear_line(err)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing_and_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"old")
    clip = _clip(t=6)

    def broken():
        yield from clip[:3]
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError):
        write_video(broken(), out)
    assert out.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []

    def bad_frame():
        yield from clip[:2]
        yield clip[2].astype(np.float32)

    with pytest.raises(WanrenderError, match="uint8") as err:
        write_video(bad_frame(), tmp_path / "new.mp4")
    _one_clear_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


@pytest.mark.parametrize(
    ("frames", "pattern"),
    [
        (np.zeros((0, 64, 64, 3), np.uint8), "no frames"),
        (np.zeros((64, 64, 3), np.uint8), r"\[T,H,W,3\]"),
        ([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8)], "one size"),
        ([np.zeros((64, 64), np.uint8)], "uint8"),
        ("frames.png", "iterable"),
    ],
)
def test_bad_frames(tmp_path: Path, frames: object, pattern: str) -> None:
    with pytest.raises(WanrenderError, match=pattern) as err:
        write_video(frames, tmp_path / "x.mp4")  # type: ignore[arg-type]
    _one_clear_line(err)
    assert list(tmp_path.iterdir()) == []


def test_bad_options(tmp_path: Path) -> None:
    for kwargs, pattern in (({"fps": 0}, "fps"), ({"crf": 99}, "crf"), ({"pix_fmt": "rgb24"}, "pix_fmt")):
        with pytest.raises(WanrenderError, match=pattern):
            write_video(_clip(t=2), tmp_path / "x.mp4", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(WanrenderError, match="is a folder"):
        write_video(_clip(t=2), tmp_path)
    assert write_video(_clip(t=2), tmp_path / "new" / "x.mp4") == 2  # folders are created


def test_not_a_video(tmp_path: Path) -> None:
    txt = tmp_path / "notes.mp4"
    txt.write_text("this is not a video\n" * 50)
    with pytest.raises(WanrenderError, match="not a readable video") as err:
        read_video(txt)
    _one_clear_line(err)
    with pytest.raises(WanrenderError, match="no such file"):
        read_video(tmp_path / "absent.mp4")
    with pytest.raises(WanrenderError, match="not a file"):
        read_video(tmp_path)


def test_corrupt_container(tmp_path: Path) -> None:
    good = tmp_path / "good.mp4"
    write_video(_clip(t=12), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(WanrenderError, match="truncated") as err:
        read_video(truncated)
    _one_clear_line(err)
    noisy = bytearray(data)
    rng = np.random.default_rng(0)
    mid = len(noisy) // 2
    noisy[mid : mid + 3000] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    garbled = tmp_path / "garbled.mp4"
    garbled.write_bytes(bytes(noisy))
    with pytest.raises(WanrenderError, match="corrupt|truncated") as err:
        read_video(garbled)
    _one_clear_line(err)
    header = tmp_path / "header.mp4"
    header.write_bytes(os.urandom(64) + data[64:])
    with pytest.raises(WanrenderError) as err:
        read_video(header)
    _one_clear_line(err)


def test_zero_frame_video(tmp_path: Path) -> None:
    import av

    # An MKV whose video track is declared but empty (only audio was muxed).
    path = tmp_path / "empty.mkv"
    with av.open(str(path), "w", format="matroska") as c:
        v = c.add_stream("libx264", rate=16)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.pts = 0
        for pkt in [*a.encode(frame), *a.encode(None)]:
            c.mux(pkt)
    with pytest.raises(WanrenderError, match="no video frames") as err:
        read_video(path)
    _one_clear_line(err)


def test_varying_frame_sizes_in_file(tmp_path: Path) -> None:
    import av

    # A raw H.264 stream whose second half changes resolution (new SPS).
    path = tmp_path / "vary.h264"
    with open(path, "wb") as fh:
        for h, w in ((64, 96), (48, 64)):
            cc = av.CodecContext.create("libx264", "w")
            cc.width, cc.height, cc.pix_fmt = w, h, "yuv420p"
            cc.time_base = Fraction(1, 16)
            for i in range(3):
                f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * i, np.uint8), format="rgb24")
                f = f.reformat(format="yuv420p")
                f.pts = i
                for pkt in cc.encode(f):
                    fh.write(bytes(pkt))
            for pkt in cc.encode(None):
                fh.write(bytes(pkt))
    with pytest.raises(WanrenderError, match="one size") as err:
        read_video(path)
    _one_clear_line(err)
