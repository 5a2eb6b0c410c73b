"""The planner's multi-GPU predictions (sequence parallel, the expert pipeline), `plan
--gpus`, and the bench lab's `gpus` key: shapes of the numbers, not their values
(nothing has been measured on several GPUs yet)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from wanrender.bench.matrix import Case, expand
from wanrender.bench.tune import runnable
from wanrender.errors import WanrenderError
from wanrender.runtime import gpus as gpu_specs
from wanrender.runtime import multigpu
from wanrender.runtime.memory import Weights, Workload
from wanrender.runtime.planner import Context, decide, expert_pipeline
from wanrender.spec import SpecError

SRC = Path(__file__).resolve().parents[1] / "src"
WORK = Workload(81, 832, 1216)


def _ctx(gpu: str = "h200", gpus: int = 1, link: str = "nvlink") -> Context:
    return Context(gpu_specs.named(gpu), Weights.standard(lora=True), "fp8", "default", 0.5, None, gpus, link)


def test_more_gpus_are_faster_and_never_need_more_memory_per_gpu() -> None:
    chosen = [decide(_ctx(gpus=n), WORK).chosen for n in (1, 2, 4, 8)]
    steps = [c.step_seconds for c in chosen]
    sampling = [c.stage_bytes["sampling"] for c in chosen]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 4
    assert sampling == sorted(sampling, reverse=True) and sampling[-1] < sampling[0]
    # weights are replicated: the stages without DiT activations do not change
    assert len({c.stage_bytes["text_encode"] for c in chosen}) == 1
    for n, c in zip((2, 4, 8), chosen[1:]):
        assert c.plan.experts == "resident" and c.plan.chunks == 1
        # DiT time / N plus a positive all-to-all: below / N of one GPU's never, above it always
        a2a = multigpu.all_to_all_seconds(WORK, n, "nvlink")
        assert a2a > 0 and c.step_seconds == pytest.approx(chosen[0].step_seconds / n + a2a)
        assert any("sequence parallel" in note and "assumed" in note for note in c.notes)
    # a slower link costs more
    pcie = decide(_ctx(gpus=4, link="pcie"), WORK).chosen
    assert pcie.step_seconds > chosen[2].step_seconds


def test_the_split_decode_shrinks_with_the_gpus_but_never_below_its_share() -> None:
    fractions = [multigpu.decode_fraction(WORK, n) for n in (1, 2, 4, 8)]
    assert fractions[0] == 1.0 and fractions == sorted(fractions, reverse=True)
    for n, f in zip((2, 4, 8), fractions[1:]):
        assert 1 / n < f < 1.0  # margins and the whole-frame middle block cost something
    tiny = Workload(81, 64, 16)  # 2 latent rows: no band for a third GPU
    assert multigpu.decode_fraction(tiny, 4) == 1.0
    assert multigpu.decode_gather_seconds(WORK, 4, "pcie") > multigpu.decode_gather_seconds(WORK, 4, "nvlink") > 0
    one, four = (decide(_ctx(gpus=n), WORK).chosen for n in (1, 4))
    assert four.stage_seconds["vae_decode"] == pytest.approx(
        one.stage_seconds["vae_decode"] * fractions[2] + multigpu.decode_gather_seconds(WORK, 4, "nvlink")
    )
    assert any("VAE decode split by rows" in note for note in four.notes)


def test_divisibility_and_memory_mode_errors() -> None:
    with pytest.raises(WanrenderError, match=r"^3 GPUs cannot share the DiT's 40 attention heads evenly — use 2, 4, 5"):
        multigpu.check_heads(3, multigpu.WAN_HEADS)
    for n in (1, 2, 4, 5, 8):
        multigpu.check_heads(n, multigpu.WAN_HEADS)
    with pytest.raises(SpecError, match="^memory 'swap' cannot be used with 2 GPUs"):
        decide(_ctx(gpus=2), WORK, "swap")
    assert multigpu.all_to_all_bytes(WORK, 1) == 0


def test_expert_pipeline_prediction() -> None:
    h200 = expert_pipeline(_ctx(), WORK)
    assert h200.fits and h200.text_encoder == "resident"
    single = h200.single
    # each GPU holds one expert: less than one GPU holding both
    assert max(h200.peak_bytes.values()) < single.peak_bytes
    # a job's work is split, not lost: the two sides add up to one GPU's resident render
    assert sum(h200.seconds.values()) == pytest.approx(single.seconds, rel=1e-6)
    assert h200.single_videos_per_hour < h200.videos_per_hour < 2 * h200.single_videos_per_hour
    # a 24 GB card cannot hold both experts: the pipeline fits by releasing the text encoder
    small = expert_pipeline(_ctx("rtx4090"), Workload(81, 832, 480))
    assert small.fits and small.text_encoder == "release"
    assert small.single.plan.experts != "resident"


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "wanrender.cli", "plan", "--gpu", "h200", "--profile", "off", *args],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_plan_command_with_gpus() -> None:
    p = _plan_cli("--gpus", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("GPU: 2 x H200")
    assert "2 GPUs (figures per GPU):" in p.stdout and "Expert pipeline (--pipeline experts, 2 GPUs)" in p.stdout
    bad = _plan_cli("--gpus", "3")
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr
    assert bad.stderr.strip() == (
        "error: 3 GPUs cannot share the DiT's 40 attention heads evenly — use 2, 4, 5, 8, 10 (a divisor of 40)"
    )


def test_matrix_and_tune_know_gpus() -> None:
    m = expand({"defaults": {"frames": 5}, "axes": {"gpus": [1, 2]}})
    assert [c.gpus for c in m.cases] == [1, 2] and m.labels == ("gpus=1", "gpus=2")
    assert m.cases[0].case_hash == Case(frames=5).case_hash  # one-GPU cases keep their keys
    assert m.cases[1].case_hash != m.cases[0].case_hash
    with pytest.raises(WanrenderError, match="4 GPUs cannot share the DiT's 2 attention heads"):
        expand({"cases": [{"gpus": 4}]})  # the demo models have 2 heads
    with pytest.raises(WanrenderError, match="memory_plan 'stream' cannot be used with 2 GPUs"):
        expand({"cases": [{"gpus": 2, "memory_plan": "stream"}]})
    with pytest.raises(WanrenderError, match="gpus must be at least 1"):
        expand({"cases": [{"gpus": 0}]})
    knobs = {"attention": "sdpa", "precision": "bf16", "compile": "off", "memory_plan": "swap"}
    assert runnable("cpu", knobs) is None
    assert "cannot be used with 2 GPUs" in runnable("cpu", knobs, 2)
    assert runnable("cpu", replace_knobs(knobs, memory_plan="auto"), 2) is None


def replace_knobs(knobs: dict, **kw: str) -> dict:
    return {**knobs, **kw}


def test_context_default_is_one_gpu() -> None:
    ctx = _ctx()
    assert ctx.gpus == 1 and replace(ctx, gpus=2).gpus == 2
