"""`models: random` (full-size random weights for GPU sweeps without checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wanrender.bench.matrix import expand
from wanrender.errors import WanrenderError


def test_random_models_expand_and_refuse_cleanly_without_a_gpu(tmp_path: Path) -> None:
    from wanrender.bench.child import run_case

    m = expand({"name": "r", "defaults": {"models": "random", "preset": "turbo", "frames": 17,
                                          "resolution": "832x480", "device": "cpu"}})  # fmt: skip
    case = m.cases[0]
    assert case.models == "random" and case.models_path is None
    with pytest.raises(WanrenderError, match="needs a CUDA GPU"):
        run_case(case, tmp_path)


@pytest.mark.gpu
def test_random_engine_renders_on_gpu(tmp_path: Path) -> None:
    import torch

    from wanrender.bench.synthetic import random_engine
    from wanrender.demo import demo_image
    from wanrender.request import from_preset
    from wanrender.runner import Runner
    from wanrender.runtime.memory import Weights

    engine = random_engine("cuda")
    req = from_preset("turbo", demo_image(), "slow pan", frames=5, width=832, height=480, precision="bf16",
                      lora_strength_high=0, lora_strength_low=0, out=tmp_path / "r.mp4")  # fmt: skip
    res = Runner("cuda", engine=engine, weights=Weights.standard(lora=False)).render(req)
    assert res.video.is_file() and torch.isfinite(res.latent).all()


@pytest.mark.parametrize("mode", ["swap", "stream"])
def test_random_engine_memory_plans_match_resident(tmp_path: Path, mode: str) -> None:
    # The placement logic of random engines (what a capped GPU sweep runs) on the CPU:
    # experts kept on the host and installed per pass give the resident result.
    import torch

    from wanrender.bench.synthetic import TINY, random_engine
    from wanrender.demo import demo_image
    from wanrender.request import from_preset
    from wanrender.runner import Runner
    from wanrender.runtime.planner import cpu_plan

    latents = []
    for memory in ("resident", mode):
        engine = random_engine("cpu", cpu_plan(memory), presets=TINY)
        req = from_preset("demo", demo_image(), "slow pan", frames=5, width=80, height=64, seed=3, memory=memory,
                          lora_strength_high=0, lora_strength_low=0, out=tmp_path / f"{mode}.mp4")  # fmt: skip
        res = Runner("cpu", engine=engine).render(req)
        assert engine.memory.plan == cpu_plan(memory)
        latents.append(res.latent)
        if memory != "resident":
            assert res.meta["memory"]["expert_installs"] >= 2  # high, then low
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)


def test_gpu_random_matrix_spans_backends_precisions_and_caps() -> None:
    from wanrender.bench.matrix import load

    m = load(Path(__file__).resolve().parents[1] / "benchmarks" / "matrices" / "gpu-random.yaml")
    assert len(m.cases) >= 12 and all(c.models == "random" for c in m.cases)
    assert {c.attention for c in m.cases} >= {"sdpa-cudnn", "sdpa-flash", "sage8"}
    assert {c.precision for c in m.cases} == {"bf16", "fp8"}
    caps = {c.vram_cap_bytes for c in m.cases}
    assert {int(31.4 * 2**30), int(23.6 * 2**30), None} <= caps
    assert {c.frames for c in m.cases if c.vram_cap_bytes} >= {81, 161}


def test_only_selects_cases_by_label_and_refuses_no_match() -> None:
    from wanrender.bench.matrix import load

    m = load(Path(__file__).resolve().parents[1] / "benchmarks" / "matrices" / "gpu-random.yaml")
    sub = m.only("81f-*, sage8-fp8")
    assert sub.labels == ("81f-uncapped", "81f-rtx5090", "81f-rtx4090", "sage8-fp8")
    assert m.only(None) is m
    with pytest.raises(WanrenderError, match="matches no case"):
        m.only("nope*")


def test_tune_accepts_random_models_only_on_a_gpu(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wanrender.cli import app

    res = CliRunner().invoke(app, ["tune", "--models", "random", "--device", "cpu", "--work", str(tmp_path / "w")])
    assert res.exit_code != 0 and "needs a CUDA GPU" in res.output


def test_child_processes_find_this_wanrender_from_any_folder(monkeypatch) -> None:
    import os

    import wanrender
    from wanrender.bench.runner import _child_env

    monkeypatch.setenv("PYTHONPATH", "src")  # relative: wrong from the case's own folder
    env = _child_env()
    root = str(Path(wanrender.__file__).resolve().parents[1])
    parts = env["PYTHONPATH"].split(os.pathsep)
    if root.endswith("site-packages"):  # installed: nothing to add
        assert parts == ["src"]
    else:
        assert parts[0] == root and all(os.path.isabs(p) for p in parts)
