"""The workflow reader on ComfyUI's own Wan 2.2 templates, the files its users start
from (the `comfyui-workflow-templates` package that ComfyUI 0.3.64 installs; read from
the installed package, never copied here): the 14B i2v template's active 4-step group
beside its bypassed 20-step fp8 group, and the other Wan 2.2 families refused by name.
The CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_workflow import cli, one_line_error

templates = pytest.importorskip("comfyui_workflow_templates")
DIR = Path(templates.__file__).parent / "templates"


def test_the_wan22_14b_i2v_template_reads_as_its_active_4_step_group() -> None:
    res = cli("workflow", "show", str(DIR / "video_wan2_2_14B_i2v.json"), "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    r = got["request"]
    assert (r["frames"], r["width"], r["height"], r["steps"], r["switch"], r["cfg"], r["sampler"]) == (
        81, 640, 640, 4, 2, 1.0, "euler")  # fmt: skip
    assert r["seed"] == 138073435077572  # stored with control "randomize": the stored value, with a note
    assert r["shift_high"] == pytest.approx(5.0) and r["shift_low"] == pytest.approx(5.0)
    assert r["lora_strength_high"] == pytest.approx(1.0) and r["lora_strength_low"] == pytest.approx(1.0)
    assert got["sources"]["frames"] == "#98 WanImageToVideo.length"
    text = json.dumps(got)
    assert "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors" in text
    assert "randomize" in text
    # the template's 20-step fp8_scaled group is bypassed: none of its nodes count
    shown = cli("workflow", "show", str(DIR / "video_wan2_2_14B_i2v.json"))
    assert "bypassed (group 'fp8_scaled')" in shown.stdout and "#58 KSamplerAdvanced: bypassed" in shown.stdout


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("video_wan2_2_5B_ti2v.json", ["Wan 2.2 5B (TI2V) model", "Wan22ImageToVideoLatent"]),
        ("video_wan2_2_14B_t2v.json", ["text-to-video"]),
        ("video_wan2_2_14B_flf2v.json", ["first-last-frame", "WanFirstLastFrameToVideo"]),
        ("video_wan2_2_14B_s2v.json", ["LoadAudio is on the active path"]),
    ],
)
def test_other_wan22_templates_are_refused_by_name(name: str, words: list[str]) -> None:
    line = one_line_error(cli("workflow", "show", str(DIR / name)))
    assert all(w in line for w in words), line
