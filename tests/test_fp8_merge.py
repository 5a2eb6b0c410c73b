"""The fused fp8 LoRA merge (kernels/fp8_merge.py) gives quantize_fp8's bytes.

On the CPU: its arithmetic (``merge_reference``: neighbours from fp32 bits, the byte
assembled by hand) against ``quantize_fp8`` (fp8 casts, the bit neighbours of the
rounded value), on weights like a LoRA merge's and on the edge values of e4m3fn; and the
self-check that falls back. On a GPU (marked): the Triton kernels against both, and a
whole LoRA applied with and without them."""

from __future__ import annotations

import zlib

import pytest
import torch

from wanrender.kernels import fp8_merge as fm
from wanrender.models.common import quantize_fp8

FP8 = torch.float8_e4m3fn


def _weights(shape=(96, 80), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    q, s = quantize_fp8(w, FP8)
    delta = torch.randn(shape, generator=g) * 0.002  # a LoRA's delta: a fraction of an fp8 step and more
    return q.to(device), s.to(device), delta.to(device)


def _edge_values() -> torch.Tensor:
    """Every e4m3fn value, the midpoints and near-misses between neighbours, zeros of both
    signs, and tiny values that round to zero: x / scale covers them all when the largest
    magnitude is exactly 448 (scale 1)."""
    every = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    every = every[torch.isfinite(every)]
    pos = every[every >= 0].unique().sort().values
    mids = (pos[1:] + pos[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2),
                      torch.nextafter(pos, torch.zeros_like(pos)), torch.nextafter(pos, pos + 1)])  # fmt: skip
    tiny = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 2.0**-10, -(2.0**-10), 2.0**-6, 2.0**-6 - 2.0**-12])
    x = torch.cat([every, -every, near, -near, tiny]).clamp(-448, 448)
    return torch.cat([x, torch.tensor([448.0])])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_arithmetic_gives_quantize_fp8s_bytes(seed: int) -> None:
    w8, s, delta = _weights(seed=seed)
    key = zlib.crc32(f"blocks.{seed}.ffn.0.weight".encode())
    q_ref, s_ref = quantize_fp8(w8.float() * s + delta, FP8, seed=key)
    q, s_new = fm.merge_reference(w8, s, delta, key)
    assert torch.equal(s_new, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # No scale (a plain fp8 weight): the same.
    q_ref, _ = quantize_fp8(w8.float() + delta, FP8, seed=key)
    assert torch.equal(fm.merge_reference(w8, None, delta, key)[0].view(torch.uint8), q_ref.view(torch.uint8))


def test_the_edge_values_of_e4m3_round_the_same() -> None:
    x = _edge_values()
    zero8 = torch.zeros(x.shape, dtype=FP8)
    for key in (3, 0xDEADBEEF, 2**32 - 1):  # seeds whose product with the hash key overflows int64
        q_ref, s_ref = quantize_fp8(x, FP8, seed=key)
        q, s = fm.merge_reference(zero8, None, x, key)
        assert float(s) == float(s_ref) == 1.0
        bad = (q.view(torch.uint8) != q_ref.view(torch.uint8)).nonzero().flatten()
        assert bad.numel() == 0, [(x[i].item(), q_ref.view(torch.uint8)[i].item(), q.view(torch.uint8)[i].item())
                                  for i in bad[:5]]  # fmt: skip
        assert (q_ref.view(torch.uint8) == 0x80).any()  # negative values rounded to zero are covered: -0


def test_the_hash_key_keeps_the_seeds_low_bits() -> None:
    from wanrender.models.common import uniform_hash

    for seed in (0, 1, 2**31 + 5, 2**32 - 1):
        idx = torch.arange(10, dtype=torch.int64)
        x = idx ^ fm.hash_key(seed)
        for mul in fm.HASH_MULS:
            x = ((x ^ (x >> 16)) * mul) & fm.MASK32
        x = x ^ (x >> 16)
        assert torch.equal((x >> 8).float() * 2.0**-24, uniform_hash(seed, 0, 10, "cpu"))


def test_the_guard_falls_back_to_the_plain_merge(monkeypatch, caplog) -> None:
    w8, s, delta = _weights()
    q_ref, s_ref = quantize_fp8(w8.float() * s + delta, FP8, seed=5)
    # A kernel that cannot build: the plain path, said once.
    monkeypatch.setattr(fm, "merge_fp8", lambda *a: (_ for _ in ()).throw(RuntimeError("no GPU compiler")))
    merge = fm.Fp8Merge()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            q, s_new = merge(w8, s, delta, 5)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s_new, s_ref)
    assert merge.broken == "RuntimeError: no GPU compiler" and caplog.text.count("unavailable") == 1
    # A kernel whose bytes differ: caught on the first tensor, the plain result returned.
    off = lambda w, sc, d, seed: (fm.merge_reference(w, sc, d, seed + 1)[0], fm.merge_reference(w, sc, d, seed)[1])  # noqa: E731
    monkeypatch.setattr(fm, "merge_fp8", off)
    merge = fm.Fp8Merge()
    q, _ = merge(w8, s, delta, 5)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and "differ" in merge.broken
    # The same arithmetic as the kernel's: passes the check and is used from then on.
    monkeypatch.setattr(fm, "merge_fp8", fm.merge_reference)
    merge = fm.Fp8Merge()
    assert torch.equal(merge(w8, s, delta, 5)[0].view(torch.uint8), q_ref.view(torch.uint8))
    assert merge.checked and merge.broken is None
    # NaN in a merged weight: that tensor the plain way (NaNs stay NaNs), the kernel kept.
    calls = []

    def not_finite(*a):
        calls.append(1)
        if len(calls) == 1:
            raise fm.NotFinite("NaN")
        return fm.merge_reference(*a)

    monkeypatch.setattr(fm, "merge_fp8", not_finite)
    merge = fm.Fp8Merge()
    bad = delta.clone()
    bad[0, 0] = float("nan")
    q, s_nan = merge(w8, s, bad, 5)
    assert torch.isnan(s_nan) and merge.broken is None
    assert torch.equal(merge(w8, s, delta, 5)[0].view(torch.uint8), q_ref.view(torch.uint8)) and len(calls) == 2
    # Per-channel scales: the plain merge, whose dequantisation broadcasts them.
    rows = torch.rand(w8.shape[0], 1) + 0.5
    monkeypatch.setattr(fm, "merge_fp8", lambda *a: pytest.fail("the kernel reads one scale"))
    q_ref, _ = quantize_fp8(w8.float() * rows + delta, FP8, seed=5)
    assert torch.equal(merge(w8, rows, delta, 5)[0].view(torch.uint8), q_ref.view(torch.uint8))


def test_no_fused_merge_off_cuda() -> None:
    assert fm.fp8_merge_for(torch.device("cpu")) is None


def test_the_kernels_in_tritons_interpreter_give_the_same_bytes() -> None:
    """The Triton source itself, run by Triton's CPU interpreter (where Triton is
    installed; CI has none, the GPU machine and a developer's may)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    code = (
        "import sys, zlib, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_fp8_merge import _weights, _edge_values, FP8\n"
        "from wanrender.kernels import fp8_merge as fm\n"
        "from wanrender.models.common import quantize_fp8\n"
        "bad = 0\n"
        "for shape, seed in (((96, 80), 1), ((33, 77), 0)):\n"
        "    w8, s, d = _weights(shape, seed)\n"
        "    q_ref, s_ref = quantize_fp8(w8.float() * s + d, FP8, seed=seed)\n"
        "    q, s2 = fm.merge_fp8(w8, s, d, seed)\n"
        "    bad += int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()) + (not torch.equal(s2, s_ref))\n"
        "x = _edge_values(); z = torch.zeros(x.shape, dtype=FP8)\n"
        "q_ref, _ = quantize_fp8(x, FP8, seed=0xDEADBEEF)\n"
        "bad += int((fm.merge_fp8(z, None, x, 0xDEADBEEF)[0].view(torch.uint8) != q_ref.view(torch.uint8)).sum())\n"
        "d[0, 0] = float('nan')\n"
        "try:\n"
        "    fm.merge_fp8(w8, s, d, 1)\n"
        "    bad += 1\n"
        "except fm.NotFinite:\n"
        "    pass\n"
        "print('differences', bad)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.stdout.strip().splitlines()[-1:] == ["differences 0"], r.stdout + r.stderr[-3000:]


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the Triton kernels need a CUDA GPU")
def test_gpu_kernels_give_the_same_bytes() -> None:
    pytest.importorskip("triton")
    for shape, seed in (((5120, 5120), 1), ((13824, 5120), 2), ((333, 77), 3)):
        w8, s, delta = _weights(shape, seed, "cuda")
        key = zlib.crc32(f"t{seed}".encode())
        q_ref, s_ref = quantize_fp8(w8.float() * s + delta, FP8, seed=key)
        q, s_new = fm.merge_fp8(w8, s, delta, key)
        assert torch.equal(s_new, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    x = _edge_values().cuda()
    zero8 = torch.zeros(x.shape, dtype=FP8, device="cuda")
    q_ref, _ = quantize_fp8(x, FP8, seed=11)
    assert torch.equal(fm.merge_fp8(zero8, None, x, 11)[0].view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the Triton kernels need a CUDA GPU")
def test_gpu_lora_merged_fused_equals_plain() -> None:
    pytest.importorskip("triton")
    from helpers_models import tiny_dit

    from wanrender.models.lora import apply_lora, parse_lora

    def model():
        m = tiny_dit().cuda()
        for mod in m.modules():
            if type(mod).__name__ == "Linear" and mod.weight.dim() == 2:
                q, sc = quantize_fp8(mod.weight.detach().float(), FP8)
                mod.weight = torch.nn.Parameter(q, requires_grad=False)
                mod.weight_scale = sc
        return m

    a, b = model(), model()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, p in a.named_parameters():
        if name.endswith(".weight") and p.dim() == 2 and ".blocks." in f".{name}":
            stem = name[: -len(".weight")]
            sd[f"diffusion_model.{stem}.lora_down.weight"] = torch.randn(4, p.shape[1], generator=g) * 0.1
            sd[f"diffusion_model.{stem}.lora_up.weight"] = torch.randn(p.shape[0], 4, generator=g) * 0.1
    merge = fm.fp8_merge_for(torch.device("cuda"))
    apply_lora(a, parse_lora(sd, a), 1.0)
    apply_lora(b, parse_lora(sd, b), 1.0, fp8_merge=merge)
    assert merge.checked and merge.broken is None
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(
            pa.view(torch.uint8) if pa.dtype == FP8 else pa, pb.view(torch.uint8) if pb.dtype == FP8 else pb
        ), name
