"""Regressions for problems found in review."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from wanrender.errors import ModelFileError, WanrenderError
from wanrender.models.formats import expert_from_path
from wanrender.models.safetensors_io import SafetensorsFile
from wanrender.request import from_preset


def test_frames_folder_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    from wanrender.outputs import check_frames_folder, frames_folder

    out = tmp_path / "outputs.mp4"
    assert frames_folder(out) == tmp_path / "outputs_frames"
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "old_render.mp4").write_bytes(b"keep me")
    check_frames_folder(out)  # the renders folder is not the frames folder
    (tmp_path / "outputs_frames").mkdir()
    (tmp_path / "outputs_frames" / "mine.png").write_bytes(b"x")
    with pytest.raises(WanrenderError, match="was not written by wanrender"):
        check_frames_folder(out)
    assert (tmp_path / "outputs" / "old_render.mp4").read_bytes() == b"keep me"


def test_expert_comes_from_the_file_name_not_distant_folders(tmp_path: Path) -> None:
    f = tmp_path / "high_quality" / "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"")
    assert expert_from_path(f) == "low"
    g = tmp_path / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    g.parent.mkdir()
    g.write_text("{}")
    assert expert_from_path(g) == "high"


def test_header_byte_range_must_match_shape(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ModelFileError, match="byte range does not match its shape"):
        SafetensorsFile(p)


def test_lora_strength_validation_and_needs() -> None:
    with pytest.raises(WanrenderError, match="finite value"):
        from_preset("turbo", Path("x.png"), "a bear", lora_strength_high=float("nan"))
    from wanrender.engine import ModelFiles
    from wanrender.runner import check_lora_needs

    req = from_preset("quality", Path("x.png"), "a bear", lora_strength_high=1.0, lora_strength_low=0.0)
    files = ModelFiles(Path("h"), Path("l"), Path("v"), Path("t"), Path("t"))
    with pytest.raises(WanrenderError, match="no high-noise LoRA file was given"):
        check_lora_needs(req, files)


def test_missing_files_message_without_models_dir() -> None:
    from wanrender.models.inventory import resolve_files

    with pytest.raises(WanrenderError, match="pass --models DIR") as e:
        resolve_files(None, high=Path("h.safetensors"))
    assert "--dir --models" not in str(e.value)
