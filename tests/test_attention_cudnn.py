"""``cudnn-fp8``: the scheme's emulation on CPU, the registry's reasons, the CLI's refusal;
the cuDNN kernel against its twin on a GPU.

CPU numbers (emulation of cuDNN's fp8 SDPA plus our pre/post-pass, rel L2 against fp32
attention, bf16 inputs; docs/benchmarks.md has the full table): DiT-like inputs
(``make_realistic_qkv``, V with a channel mean) improve with length, 2.27% at 1,024
tokens, 1.44% at 4,096, 1.28% at 16,384 (one head); i.i.d. normal Q, K, V stay at
5.7%: each of the five fp8 roundings (Q, K, V, P, O) alone costs 2.1-2.8% there, and
on Hopper O must be fp8, so no single-pass fp8 SDPA reaches 1% on i.i.d. inputs.

GPU (``@pytest.mark.gpu``, skipped with the reasons where the kernel cannot run): the
cuDNN graph against the twin on the same quantised inputs, the graph cache, and the
op inside ``torch.compile``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wanrender.kernels import attention as attn
from wanrender.kernels import attention_cudnn as ac
from wanrender.kernels import cudnn_fp8_math as fm
from wanrender.kernels.sage8_math import exact_attention, make_realistic_qkv, rel_l2
from wanrender.spec import SpecError

SRC = str(Path(__file__).resolve().parents[1] / "src")
CPU = attn.Target("cpu", None, torch.bfloat16, 128)
H100 = attn.Target("cuda", (9, 0), torch.bfloat16, 128)


def _iid(length: int, heads: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, length, heads, 128, generator=g).to(torch.bfloat16) for _ in range(3))


# ------------------------------------------------------------------------ the scheme (CPU)


def test_smoothing_and_rotation_are_exact_without_rounding() -> None:
    # K and V with large channel means: exact in fp32 when nothing is rounded.
    q, k, v = make_realistic_qkv(1, 300, 2, 64, dtype=torch.float32, v_mean=3.0)
    for scheme in (fm.Fp8Scheme(quantised=()), fm.Fp8Scheme(quantised=(), v_scale="channel")):
        got = fm.cudnn_fp8_reference(q, k, v, scheme)
        torch.testing.assert_close(got, attn.reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    r = fm.hadamard(64)
    torch.testing.assert_close(r @ r.T, torch.eye(64), rtol=0, atol=1e-6)


def test_dit_like_accuracy_and_what_the_rotation_buys() -> None:
    # The error falls with the sequence length (docs/benchmarks.md: 2.3% at 1,024 tokens,
    # 1.4% at 4,096); the 1% target is for production lengths, measured on the GPU.
    q, k, v = make_realistic_qkv(1, 2048, 2, 128, seed=0, v_mean=0.5)
    ref = exact_attention(q, k, v)
    err = rel_l2(fm.cudnn_fp8_reference(q, k, v).float(), ref)
    assert err <= 0.022, err  # measured 1.96%
    # Without the Q/K rotation the Q/K rounding dominates (measured 3.07%).
    plain = rel_l2(fm.cudnn_fp8_reference(q, k, v, fm.Fp8Scheme(rotate=False)).float(), ref)
    assert plain > 1.4 * err, (plain, err)


def test_iid_error_is_the_fp8_floor_of_each_rounding() -> None:
    q, k, v = _iid(1024, 2)
    ref = exact_attention(q, k, v)
    err = rel_l2(fm.cudnn_fp8_reference(q, k, v).float(), ref)
    assert 0.045 < err < 0.065, err  # measured 5.7%
    for name in fm.QUANTISED:  # each rounding alone, measured 2.1-2.8%
        alone = rel_l2(fm.cudnn_fp8_reference(q, k, v, fm.Fp8Scheme(quantised=(name,))).float(), ref)
        assert 0.018 < alone < 0.032, (name, alone)


def test_o_scale_bounds_the_output_and_the_core_stays_finite() -> None:
    q, k, v = make_realistic_qkv(2, 77, 3, 64, seed=3, v_mean=2.0)
    prep = fm.prepare(q, k, v)
    assert prep.q8.dtype == fm.FP8 and prep.q8.is_contiguous() and prep.descale_q.numel() == 1
    o = fm.sdpa_fp8_emulated(prep, quantise_o=False)
    assert float(o.abs().max()) <= fm.FP8_MAX * (1 + 1e-6)  # |O| <= amax(V): scale_o cannot overflow
    out = fm.finish(fm.sdpa_fp8_emulated(prep), prep, q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()


def test_scheme_rejects_unknown_settings() -> None:
    with pytest.raises(ValueError, match="v_scale"):
        fm.Fp8Scheme(v_scale="block")
    with pytest.raises(ValueError, match="unknown quantised"):
        fm.Fp8Scheme(quantised=("s",))
    with pytest.raises(ValueError, match="power of two"):
        fm.hadamard(96)


# ------------------------------------------------------------------------ registry (CPU)


def test_cpu_choice_fails_with_reasons_and_auto_never_picks_it() -> None:
    with pytest.raises(SpecError, match="'cudnn-fp8' cannot run here: needs a CUDA GPU"):
        attn.select("cudnn-fp8", CPU)
    for eight_bit in (False, True):
        assert attn.select("auto", CPU, eight_bit=eight_bit).backend.name == "sdpa"
        choice = attn.select("auto", H100, eight_bit=eight_bit)
        assert choice.backend.name != "cudnn-fp8" and "cudnn-fp8" not in choice.rejected
    # Not in any measured order until a whole forward with it is measured on an H200.
    assert all("cudnn-fp8" not in order for order in attn.PRIORITY.values())
    old = attn.reasons("cudnn-fp8", attn.Target("cuda", (8, 0), torch.float32, 96))
    text = " | ".join(old)
    assert "compute capability >= 9.0" in text and "bf16/fp16" in text and "head dim 96" in text


def test_check_names_the_missing_package(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cudnn" else real(name, *a))
    why = attn.reasons("cudnn-fp8", H100)
    assert "package 'nvidia-cudnn-frontend' is not installed (pip install 'wanrender[cudnn]')" in why


def test_import_and_check_load_no_frontend() -> None:
    code = (
        "import sys, torch; import wanrender.kernels.attention as a, wanrender.kernels.attention_cudnn as m; "
        "a.reasons('cudnn-fp8', a.Target('cuda', (9, 0), torch.bfloat16, 128)); m.can_run('cpu'); "
        "assert 'cudnn' not in sys.modules, 'the frontend was imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]


def test_cli_refuses_cudnn_fp8_on_cpu_before_loading(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANRENDER_HOME", str(tmp_path / "home"))
    from wanrender.demo import demo_image, ensure_demo_models

    files, image = ensure_demo_models(), demo_image()
    out = tmp_path / "out.mp4"
    args = ["generate", str(image), "--prompt", "a pan", "--preset", "demo", "--frames", "5", "--size", "80x64",
            "--high", str(files.high), "--low", str(files.low), "--vae", str(files.vae),
            "--text-encoder", str(files.text_encoder), "--lora-high", str(files.lora_high),
            "--lora-low", str(files.lora_low), "--attention", "cudnn-fp8", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-m", "wanrender.cli", *args], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'cudnn-fp8' cannot run here: needs a CUDA GPU" in lines[0], text
    assert not out.exists() and not out.with_suffix(".json").exists()


# ------------------------------------------------------------------------------ GPU


def _gpu_ready() -> None:
    why = ac.can_run("cuda", None, torch.bfloat16, 128)
    if why:
        pytest.skip("; ".join(why))


@pytest.mark.gpu
@pytest.mark.parametrize("b,length,h,d,v_mean", [(1, 4097, 2, 128, 0.5), (2, 1000, 3, 64, 0.0), (1, 77, 2, 128, 2.0)])
def test_kernel_matches_its_twin_and_fp32(b, length, h, d, v_mean) -> None:
    _gpu_ready()
    q, k, v = make_realistic_qkv(b, length, h, d, seed=length, device="cuda", v_mean=v_mean)
    entry = ac.graph_for(b, length, h, d, q.device)
    assert not isinstance(entry, str), entry
    prep = fm.prepare(q, k, v)
    got = fm.finish(ac.sdpa_fp8(prep, entry), prep, torch.float32)
    twin = fm.finish(fm.sdpa_fp8_emulated(prep), prep, torch.float32)
    exact = exact_attention(q, k, v)
    # Same quantised inputs; the kernel may round P against its running max rather than
    # the row max, and sums in another order: bounded by P's and O's rounding (~1-3%).
    assert rel_l2(got, twin) < 0.03, rel_l2(got, twin)
    assert rel_l2(got, exact) <= rel_l2(twin, exact) + 0.005
    full = attn.select("cudnn-fp8", attn.Target.of("cuda", torch.bfloat16, d)).fn(q, k, v)
    assert full.shape == q.shape and full.dtype == q.dtype and full.is_contiguous()
    assert rel_l2(full.float(), twin) < 0.035


@pytest.mark.gpu
def test_graph_cache_is_reused_per_shape() -> None:
    _gpu_ready()
    fn = attn.select("cudnn-fp8", attn.Target.of("cuda", torch.bfloat16, 128)).fn
    q, k, v = make_realistic_qkv(1, 555, 2, 128, device="cuda")
    fn(q, k, v)
    n = ac.graph_cache_size()
    fn(q, k, v)
    fn(*(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)))  # a strided view: same graph
    assert ac.graph_cache_size() == n
    fn(*make_realistic_qkv(1, 556, 2, 128, device="cuda"))
    assert ac.graph_cache_size() == n + 1


@pytest.mark.gpu
def test_works_inside_torch_compile() -> None:
    _gpu_ready()
    fn = attn.select("cudnn-fp8", attn.Target.of("cuda", torch.bfloat16, 128)).fn

    def block(x: torch.Tensor) -> torch.Tensor:
        return fn(x * 1.5, x, x + 0.25) * 2

    x = make_realistic_qkv(1, 1024, 2, 128, device="cuda")[0]
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: the pre-pass traces, the kernel is one op
    # The pre-pass is fused by Inductor there, so its fp32 means and rotation round
    # differently and some values land on the other side of an fp8 rounding boundary:
    # measured 0.45% apart on an H200, below the scheme's own error (0.3-1.4% against
    # fp32 on DiT-like inputs). Both must stay as close to the exact attention.
    out_c, out_e = compiled(x).float(), block(x).float()
    assert rel_l2(out_c, out_e) < 0.01
    exact = attn.reference_attention(x * 1.5, x, x + 0.25).float() * 2
    assert abs(rel_l2(out_c, exact) - rel_l2(out_e, exact)) < 0.005
