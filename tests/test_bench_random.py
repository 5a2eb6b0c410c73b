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

    from wanrender.bench.synthetic import apply_knobs, random_engine
    from wanrender.generate import run_generate
    from wanrender.request import from_preset

    engine = random_engine("cuda")
    apply_knobs(engine, "bf16", "auto", "off")
    req = from_preset("turbo", Path(__file__), "slow pan", frames=5, width=832, height=480,
                      lora_strength_high=0, lora_strength_low=0, out=tmp_path / "r.mp4")  # fmt: skip
    from wanrender.demo import demo_image

    req = req.__class__(**{**req.__dict__, "image": demo_image()})
    res = run_generate(req, engine.files, "cuda", None, engine)
    assert res.video.is_file() and torch.isfinite(res.latent).all()
