"""`generate` end to end on the demo models (real loaders, real pipeline, MP4 out)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wanrender.cli import app
from wanrender.errors import WanrenderError
from wanrender.request import from_preset


@pytest.fixture(scope="module")
def demo_files(demo_set):
    return demo_set[1], demo_set[2]


@pytest.fixture(scope="module")
def engine(demo_files):
    """One long-lived runner for the module: its engine is loaded by the first render."""
    from wanrender.runner import Runner

    return Runner("cpu")


def _req(image: Path, out: Path, **kw):
    return from_preset("demo", image, "slow dolly-in", frames=5, width=80, height=64, out=out, **kw)


def test_generate_writes_playable_mp4_and_complete_sidecar(demo_files, engine, tmp_path: Path) -> None:
    from wanrender.media.video import read_video

    files, image = demo_files
    events = []
    res = engine.render(_req(image, tmp_path / "v.mp4"), files, lambda *e: events.append(e))
    frames, fps = read_video(res.video)
    assert frames.shape == (5, 64, 80, 3) and fps == 16
    side = json.loads(res.sidecar.read_text())
    for key in ("request", "plan", "models", "seed", "timings_s", "versions", "seconds_per_step"):
        assert side[key] is not None, key
    assert len(side["step_s"]) == 4 and side["process_s"] is None  # a long-lived runner: no process age
    # the streamed encoder's hash of the frames is the hash of the frames the render returned
    from wanrender.runner import frames_sha256

    assert side["frames_sha256"] == frames_sha256(res.frames)
    # last step to the files: the decode and the encoder's end at least, within the render
    assert side["timings_s"]["vae_decode"] <= side["tail_s"] <= side["render_s"]
    assert set(side["timings_s"]) >= {
        "text_encode",
        "vae_encode",
        "pass1_high",
        "pass2_low",
        "vae_decode",
        "video_encode",
    }
    assert all(len(f["sha256"]) == 64 for m in side["models"].values() for f in m["files"])
    assert side["plan"]["lora"]["high"].startswith("demo_4step_lora_high")
    assert {k: side["plan"]["runtime"][k] for k in ("precision", "attention", "compile")} == {
        "precision": "bf16",
        "attention": "sdpa",
        "compile": "off",
    }
    assert [e[0] for e in events if e[1] is not None][-1] == "pass2_low"


def test_the_x264_preset_reaches_the_encoder(demo_files, engine, tmp_path: Path) -> None:
    """x264 writes its settings into the stream (an SEI message): the default preset's
    10-frame lookahead, medium's 40 when asked, and the sidecar records which."""
    import re

    files, image = demo_files
    for preset, lookahead in ((None, 10), ("medium", 40)):
        kw = {} if preset is None else {"x264_preset": preset}
        res = engine.render(_req(image, tmp_path / f"{preset}.mp4", **kw), files)
        settings = re.search(rb"rc_lookahead=(\d+)", res.video.read_bytes())
        assert settings is not None and int(settings.group(1)) == lookahead
        assert json.loads(res.sidecar.read_text())["request"]["x264_preset"] == (preset or "veryfast")


def test_same_seed_same_frames_other_seed_differs(demo_files, engine, tmp_path: Path) -> None:
    files, image = demo_files
    a = engine.render(_req(image, tmp_path / "a.mp4", seed=3), files)
    b = engine.render(_req(image, tmp_path / "b.mp4", seed=3), files)
    c = engine.render(_req(image, tmp_path / "c.mp4", seed=4), files)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_failing_stage_leaves_no_output(demo_files, engine, tmp_path: Path, monkeypatch) -> None:
    from wanrender.pipeline import i2v

    files, image = demo_files

    def boom(*a, **k):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(i2v, "decode", boom)
    with pytest.raises(RuntimeError):
        engine.render(_req(image, tmp_path / "x.mp4"), files)
    assert list(tmp_path.iterdir()) == []


def test_failing_sidecar_removes_video(demo_files, engine, tmp_path: Path, monkeypatch) -> None:
    from wanrender.media import sidecar
    from wanrender.request import with_fields

    files, image = demo_files
    # Files from an earlier render to the same name: a failed render must not lose them.
    (tmp_path / "y.mp4").write_bytes(b"earlier video")
    (tmp_path / "y.json").write_text('{"versions": {"wanrender": "0.1"}}')  # a sidecar: a render may replace it
    monkeypatch.setattr(sidecar, "write_sidecar", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        engine.render(with_fields(_req(image, tmp_path / "y.mp4"), save_frames=True), files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.json", "y.mp4"]
    assert (tmp_path / "y.mp4").read_bytes() == b"earlier video"


def test_turbo_without_loras_is_refused(demo_files, tmp_path: Path) -> None:
    from wanrender.runner import Runner

    files, image = demo_files
    req = from_preset("turbo", image, "a bear", out=tmp_path / "t.mp4")
    with pytest.raises(WanrenderError, match="4-step LoRAs"):
        Runner("cpu").render(req, replace(files, lora_high=None))


def test_cli_generate_and_errors(demo_files, tmp_path: Path) -> None:
    files, image = demo_files
    runner = CliRunner()
    args = ["generate", str(image), "--prompt", "a slow pan", "--preset", "demo", "--frames", "5",
            "--size", "80x64", "--high", str(files.high), "--low", str(files.low), "--vae", str(files.vae),
            "--text-encoder", str(files.text_encoder), "--lora-high", str(files.lora_high),
            "--lora-low", str(files.lora_low), "--out", str(tmp_path / "cli.mp4"), "--device", "cpu"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli.mp4").is_file() and (tmp_path / "cli.json").is_file()
    # a one-video process records its age at the load's start and at the sidecar (Linux /proc)
    proc = json.loads((tmp_path / "cli.json").read_text())["process_s"]
    assert 0 < proc["at_load"] <= proc["at_sidecar"]
    res = runner.invoke(app, args[:-4] + ["--frames", "6"] + args[-4:])
    assert res.exit_code == 2 and "try 5" in res.output
    res = runner.invoke(app, args + ["--x264-preset", "quick"])
    assert res.exit_code == 2 and "--x264-preset" in res.output and "veryfast" in res.output
    res = runner.invoke(app, args + ["--attention", "sdpa-cudnn"])
    assert res.exit_code == 2 and "'sdpa-cudnn' cannot run here: needs a CUDA GPU" in res.output
    res = runner.invoke(app, ["generate", str(image), "--prompt", "x", "--models", str(tmp_path)])
    assert res.exit_code == 2 and "missing the high-noise I2V expert" in res.output


def test_generate_with_dis_interpolation(demo_files, engine, tmp_path: Path) -> None:
    from wanrender.media.video import read_video

    files, image = demo_files
    req = _req(image, tmp_path / "i.mp4", interpolate="dis")
    assert (req.output.fps, req.output.multiplier) == (32, 2)
    res = engine.render(req, files)
    frames, fps = read_video(res.video)
    assert frames.shape[0] == 9 and fps == 32  # (5 - 1) * 2 + 1
    side = json.loads(res.sidecar.read_text())
    assert side["interpolation"] == {"method": "dis", "multiplier": 2, "frames_in": 5, "frames_out": 9}
    assert "interpolate" in side["timings_s"]


def test_interpolation_fps_validation() -> None:
    with pytest.raises(WanrenderError, match="try 32"):
        from_preset("turbo", Path("x.png"), "a bear", interpolate="rife", fps=40)
    with pytest.raises(WanrenderError, match="interpolate 'film'"):
        from_preset("turbo", Path("x.png"), "a bear", interpolate="film")


def test_cli_interpolate_and_bench(tmp_path: Path) -> None:
    from wanrender.media.video import read_video, write_video

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    clip = np.stack([np.roll(base, 2 * i, axis=1) for i in range(5)])
    write_video(clip, tmp_path / "in.mp4", fps=16)
    runner = CliRunner()
    res = runner.invoke(app, ["interpolate", str(tmp_path / "in.mp4"), "-x", "2", "--method", "dis",
                              "-o", str(tmp_path / "out.mp4")])  # fmt: skip
    assert res.exit_code == 0, res.output
    frames, fps = read_video(tmp_path / "out.mp4")
    assert frames.shape[0] == 9 and fps == 32
    res = runner.invoke(app, ["interpolate", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o.mp4")])
    assert res.exit_code == 2 and "error:" in res.output
    # The encoder's settings: used (x264 writes its options into the stream), and refused
    # by their flag's name before any work.
    res = runner.invoke(app, ["interpolate", str(tmp_path / "in.mp4"), "--method", "blend", "--x264-preset", "medium",
                              "--crf", "23", "-o", str(tmp_path / "medium.mp4")])  # fmt: skip
    assert res.exit_code == 0, res.output
    head = (tmp_path / "medium.mp4").read_bytes()
    assert b"rc_lookahead=40" in head and b"crf=23.0" in head
    assert b"rc_lookahead=10" in (tmp_path / "out.mp4").read_bytes()  # the default, veryfast
    for bad, says in ((["--x264-preset", "quick"], "--x264-preset 'quick' is invalid"), (["--crf", "60"], "--crf 60")):
        res = runner.invoke(app, ["interpolate", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "bad.mp4"), *bad])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "bad.mp4").exists()
    res = runner.invoke(app, ["bench", "interp", "--methods", "blend,repeat"])
    assert res.exit_code == 0, res.output
    assert "blend" in res.output and "PSNR" in res.output


def test_a_failed_commit_puts_every_earlier_file_back(demo_files, engine, tmp_path: Path, monkeypatch) -> None:
    """The rename step itself fails (disk error, Ctrl-C) after the video is in place:
    the earlier video, sidecar and frames folder come back; nothing temporary stays."""
    import os

    from wanrender import outputs
    from wanrender.request import with_fields

    files, image = demo_files
    req = with_fields(_req(image, tmp_path / "z.mp4"), save_frames=True)
    first = engine.render(req, files)
    before = {p.name: p.read_bytes() for p in (first.video, first.sidecar)}
    frames_before = sorted(p.name for p in outputs.frames_folder(first.video).iterdir())
    real = os.replace

    def flaky(src, dst):
        if str(src).endswith(".z.json.partial"):  # the new sidecar's rename fails; putting old files back works
            raise OSError("disk error while renaming")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", flaky)
    with pytest.raises(OSError, match="disk error"):
        engine.render(with_fields(req, seed=5), files)
    monkeypatch.setattr(outputs.os, "replace", real)
    assert {p.name: p.read_bytes() for p in (first.video, first.sidecar)} == before
    assert sorted(p.name for p in outputs.frames_folder(first.video).iterdir()) == frames_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.json", "z.mp4", "z_frames"]


def test_outputs_that_cannot_be_written_are_refused_before_rendering(demo_files, tmp_path: Path, monkeypatch) -> None:
    from wanrender.engine import Engine
    from wanrender.runner import Runner

    files, image = demo_files
    monkeypatch.setattr(Engine, "load", classmethod(lambda *a, **k: pytest.fail("loaded before refusing")))
    (tmp_path / "w.json").mkdir()  # the sidecar's name is a folder
    with pytest.raises(WanrenderError, match="w.json: is a folder"):
        Runner("cpu").render(_req(image, tmp_path / "w.mp4"), files)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(WanrenderError, match="cannot create the output folder"):
        Runner("cpu").render(_req(image, tmp_path / "file" / "x.mp4"), files)
