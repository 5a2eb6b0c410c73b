"""Start-image intake and request validation: every bad input gets one clear line."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanrender.errors import WanrenderError
from wanrender.media.image import fit_image, load_image
from wanrender.request import from_preset


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_rgb_png_reads_exactly(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (40, 60, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-7)


def test_16bit_png_is_scaled_by_its_range(tmp_path: Path) -> None:
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")  # uint16 -> a 16-bit grayscale PNG
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (64, 64, 3)
    assert out.max() == pytest.approx(1.0, abs=1e-4) and out.min() == 0.0


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (48, 64, 3)
    assert out[..., 0].mean() > 0.9 and out[..., 1].mean() < 0.1


def test_alpha_composited_over_white_with_warning(tmp_path: Path, caplog) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:16, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING):
        out = load_image(tmp_path / "a.png")
    assert "transparency" in caplog.text
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[-1, 0], [1, 1, 1])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "image not found"),
        (lambda p: p.write_text("hello, not an image"), "not an image file"),
        (lambda p: Image.new("RGB", (1, 1)).save(p, "PNG"), "only 1x1"),
        (lambda p: _png_header_only(p, 20000, 20000), "too large|MP"),
    ],
)
def test_bad_images(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "img.png"
    make(p)
    with pytest.raises(WanrenderError, match=message) as e:
        load_image(p)
    assert "\n" not in str(e.value) and " — " in str(e.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(WanrenderError, match="damaged|cannot read"):
        load_image(tmp_path / "cut.jpg")


def test_fit_crop_matches_comfy_center_crop() -> None:
    rgb = np.random.default_rng(1).random((100, 200, 3)).astype(np.float32)
    out = fit_image(rgb, 64, 64, "crop")
    # ComfyUI: crop x = round((200 - 200*(1/2))/2) = 50 columns each side, then bilinear.
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None][..., :, 50:150]
    want = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear")[0]
    torch.testing.assert_close(out, want)
    padded = fit_image(rgb, 64, 64, "pad")
    assert padded.shape == (3, 64, 64) and padded[:, 0].abs().max() == 0  # letterbox rows


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"frames": 80}, "try 81"),
        ({"frames": 0}, "try 1"),
        ({"width": 830}, "try 832"),
        ({"height": 20}, "try 64"),
        ({"steps": 4, "switch": 5}, "try 4"),
        ({"steps": 0}, "1..200"),
        ({"cfg": 0.0}, "guidance"),
        ({"sampler": "heun"}, "euler, dpmpp_2m"),
        ({"fps": 0}, "1..240"),
    ],
)
def test_invalid_requests_name_the_nearest_valid_value(overrides, message: str) -> None:
    with pytest.raises(WanrenderError, match=message):
        from_preset("turbo", Path("x.png"), "a bear", **overrides)


def test_empty_prompt_and_presets() -> None:
    with pytest.raises(WanrenderError, match="prompt is empty"):
        from_preset("turbo", Path("x.png"), "   ")
    r = from_preset("quality", Path("x.png"), "a bear", steps=40)
    assert (r.sampling.steps, r.sampling.switch, r.sampling.cfg) == (40, 20, 3.5)  # the preset's switch ratio is kept
    from wanrender.request import DEFAULT_NEGATIVE, negative_prompt

    assert negative_prompt(r) == DEFAULT_NEGATIVE  # the official default negative prompt
    t = from_preset("turbo", Path("x.png"), "a bear")
    s, v = t.sampling, t.render
    assert (s.steps, s.switch, s.cfg, s.shift_high, s.sampler, v.frames, v.width, v.height) == (
        4,
        2,
        1.0,
        5.0,
        "euler",
        81,
        832,
        1216,
    )
    with pytest.raises(WanrenderError, match="unknown preset"):
        from_preset("fast", Path("x.png"), "a bear")


def test_long_prompt_truncated_with_warning(tmp_path: Path, caplog) -> None:
    from helpers_models import randomize_
    from helpers_text import make_tiny_spm

    from wanrender.models.text_encoder import TextEncoderConfig, Tokenizer, UMT5Encoder, encode_text

    tok = Tokenizer.from_file(make_tiny_spm(tmp_path))
    enc = randomize_(UMT5Encoder(TextEncoderConfig.preset("demo")), seed=0, std=0.1)
    with caplog.at_level(logging.WARNING):
        out = encode_text(enc, tok, ["snow " * 700], text_len=512)
    assert out.shape[1] == 512
    assert "truncated" in caplog.text


def test_boundary_rule_sets_the_switch() -> None:
    r = from_preset("quality", Path("x.png"), "a bear", steps=40, boundary=0.9)
    from wanrender.pipeline.schedules import simple_sigmas

    sig = simple_sigmas(40, 5.0)
    switch = r.sampling.switch
    assert all(float(s) >= 0.9 for s in sig[:switch]) and float(sig[switch]) < 0.9
    assert from_preset("turbo", Path("x.png"), "a bear", boundary=0.9).sampling.switch == 2
    with pytest.raises(WanrenderError, match="give only one"):
        from_preset("turbo", Path("x.png"), "a bear", boundary=0.9, switch=2)
    with pytest.raises(WanrenderError, match="boundary 1.5 is invalid"):
        from_preset("turbo", Path("x.png"), "a bear", boundary=1.5)
