"""`workflow export`, `workflow show` with model folders, and `generate --workflow`,
run as a user runs them (the CLI as a subprocess)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers_workflow import UI, cli, one_line_error, template

from wanrender.request import from_preset, negative_prompt

pytestmark = pytest.mark.filterwarnings("ignore")


def _fields(req) -> dict:
    d = {}
    for part in (req.render, req.sampling):
        d.update(asdict(part))
    d["negative"] = negative_prompt(req)
    d.update(fps=req.output.fps, interpolate=req.output.interpolate)
    d.pop("image"), d.pop("fit")
    return d


@pytest.mark.parametrize("fmt", ["api", "ui"])
def test_export_then_show_gives_back_the_request(fmt: str, tmp_path: Path) -> None:
    args = ["--prompt", "a heron takes off", "--preset", "quality", "--frames", "49", "--size", "640x480",
            "--seed", "11", "--shift", "5,6", "--steps", "12", "--switch", "5", "--interpolate", "rife",
            "--lora-strength", "0.5,0.75"]  # fmt: skip
    out = tmp_path / "wf.json"
    res = cli("workflow", "export", str(tmp_path / "heron.png"), *args, "-o", str(out), "--format", fmt)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    types = [n["class_type"] for n in data.values()] if fmt == "api" else [n["type"] for n in data["nodes"]]
    assert types.count("UNETLoader") == 2 and types.count("KSamplerAdvanced") == 2 and "RIFE VFI" in types
    shown = cli("workflow", "show", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    got = json.loads(shown.stdout)
    want = from_preset("quality", tmp_path / "heron.png", "a heron takes off", frames=49, width=640, height=480,
                       seed=11, shift_high=5.0, shift_low=6.0, steps=12, switch=5, interpolate="rife",
                       lora_strength_high=0.5, lora_strength_low=0.75)  # fmt: skip
    assert got["request"] == _fields(want)
    assert got["image"]["name"] == "heron.png" and got["ignored"] == []
    # The file is never replaced without --overwrite.
    before = out.read_bytes()
    line = one_line_error(cli("workflow", "export", str(tmp_path / "x.png"), "-p", "x", "-o", str(out)))
    assert "exists — pass --overwrite" in line and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wf.json"]


def _models(folder: Path, names: list[str]) -> Path:
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b"x")
    return folder


def test_model_files_resolve_and_a_missing_one_lists_near_matches(tmp_path: Path) -> None:
    w = UI()
    template(w, names={"high": "wan/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"}, loras=False)
    wf = w.write(tmp_path / "wf.json")
    # A ComfyUI root: experts under models/diffusion_models/wan/, the rest found through extra_model_paths.yaml.
    root = tmp_path / "ComfyUI"
    _models(root / "models" / "diffusion_models", ["wan/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                                                   "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"])  # fmt: skip
    shared = _models(tmp_path / "shared", ["te/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "v/wan_2.1_vae.safetensors"])
    (root / "extra_model_paths.yaml").write_text(
        f"mine:\n  base_path: {shared}\n  text_encoders: te\n  vae: |\n    nothing\n    v\n"
    )
    res = cli("workflow", "show", str(wf), "--comfy-root", str(root), "--json")
    assert res.returncode == 0, res.stderr
    files = json.loads(res.stdout)["files"]
    assert files["high"]["path"] == str(
        root / "models/diffusion_models/wan/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    )
    assert files["vae"]["path"] == str(shared / "v" / "wan_2.1_vae.safetensors")
    # --models DIR with a file whose name differs a little.
    flat = _models(tmp_path / "flat", ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                                       "wan2.2_i2v_low_noise_14B_fp16.safetensors", "wan_2.1_vae.safetensors",
                                       "umt5_xxl_fp8_e4m3fn_scaled.safetensors"])  # fmt: skip
    line = one_line_error(cli("workflow", "show", str(wf), "--models", str(flat)))
    assert "low-noise expert 'wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors'" in line
    assert "near matches: " in line and "wan2.2_i2v_low_noise_14B_fp16.safetensors" in line.split("near matches: ")[1]


@pytest.fixture(scope="module")
def demo(demo_set):
    return demo_set


def test_generate_workflow_renders_with_the_command_line_over_it(demo, tmp_path: Path) -> None:
    home, files, image = demo
    w = UI()
    names = {"high": files.high.name, "low": files.low.name, "lora_high": files.lora_high.name,
             "lora_low": files.lora_low.name, "te": files.text_encoder.name, "vae": files.vae.name}  # fmt: skip
    template(w, frames=5, size=(80, 64), image=image.name, names=names, steps=3, switch=1, seed=3,
             control="randomize")  # fmt: skip
    wf = w.write(tmp_path / "wf.json")
    out = tmp_path / "v.mp4"
    env = {"WANRENDER_HOME": str(home)}
    res = cli("generate", "--workflow", str(wf), "--models", str(files.high.parent), "--input-dir",
              str(image.parent), "--seed", "5", "--out", str(out), "--device", "cpu", "--profile", "off", env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "control is 'randomize'" in res.stderr
    side = json.loads(out.with_suffix(".json").read_text())["request"]
    assert side["seed"] == 5  # the command line wins
    assert (side["steps"], side["switch"], side["frames"], side["width"], side["height"]) == (3, 1, 5, 80, 64)
    assert side["crf"] == 18 and side["preset"] == "workflow" and side["image"] == str(image)
    assert side["extra"]["workflow"]["file"] == str(wf)


def test_generate_workflow_errors_come_before_any_model_loads(demo, tmp_path: Path) -> None:
    home, files, image = demo
    w = UI()
    template(w, frames=5, size=(80, 64), image="missing.png")
    wf = w.write(tmp_path / "wf.json")
    env = {"WANRENDER_HOME": str(home)}
    shutil.copy(image, tmp_path / "missin.png")
    line = one_line_error(cli("generate", "--workflow", str(wf), "--input-dir", str(tmp_path), "--device", "cpu",
                              env=env))  # fmt: skip
    assert "image 'missing.png'" in line and "near matches: missin.png" in line
    line = one_line_error(cli("generate", "--workflow", str(wf), "--preset", "quality", "--device", "cpu", env=env))
    assert "--preset and --workflow" in line
    line = one_line_error(cli("generate", "--workflow", str(wf), "--frames", "6", "--device", "cpu", env=env))
    assert line.startswith("error: --frames 6 is invalid")  # a flag's value keeps the flag's wording
    line = one_line_error(cli("generate", "--workflow", str(tmp_path / "nope.json"), "--device", "cpu", env=env))
    assert "no such workflow file" in line
    line = one_line_error(cli("generate", str(image), "--device", "cpu", env=env))
    assert "missing --prompt" in line
