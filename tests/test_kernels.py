"""Attention registry, fp8 linear reference, the render plan (CPU); kernels vs references (GPU)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers_models import TINY_DIT, dynamo_after, tiny_dit

from wanrender.errors import WanrenderError
from wanrender.kernels import attention as attn
from wanrender.kernels.attention_sage8 import make_realistic_qkv
from wanrender.kernels.linear import enable_fp8, fp8_linear_reference, quantize_rows, weight_rowwise
from wanrender.models.common import Linear
from wanrender.runtime.plan import make_plan

CPU = attn.Target("cpu", None, torch.float32, 128)
H100 = attn.Target("cuda", (9, 0), torch.bfloat16, 128)
A100 = attn.Target("cuda", (8, 0), torch.bfloat16, 128)


def test_auto_on_cpu_is_sdpa_and_says_why_others_cannot_run() -> None:
    choice = attn.select("auto", CPU)
    assert choice.backend.name == "sdpa"
    assert attn.reasons("sdpa-cudnn", CPU) == ["needs a CUDA GPU", "needs bf16/fp16 (got torch.float32)"]
    assert "compute capability >= 9.0" in attn.reasons("sdpa-cudnn", A100)[0]
    assert attn.select("auto", H100).backend.name == "sdpa-cudnn"
    assert attn.select("auto", A100).backend.name == "sdpa-flash"
    # The fp8 path prefers the 8-bit kernel where it can run (not on a CPU).
    assert attn.select("auto", CPU, eight_bit=True).backend.name == "sdpa"


def test_explicit_choice_that_cannot_run_fails_with_reasons() -> None:
    with pytest.raises(WanrenderError, match="'sdpa-cudnn' cannot run here: needs a CUDA GPU"):
        attn.select("sdpa-cudnn", CPU)
    with pytest.raises(WanrenderError, match="attention 'xformers' is unknown"):
        attn.select("xformers", CPU)
    if attn.reasons("flash-attn", H100):
        assert any("not installed" in r for r in attn.reasons("flash-attn", H100))


def test_sdpa_equals_reference_on_cpu() -> None:
    q, k, v = make_realistic_qkv(1, 300, 4, 64, dtype=torch.float32, v_mean=0.5)
    got = attn.select("sdpa", CPU).fn(q, k, v)
    torch.testing.assert_close(got, attn.reference_attention(q, k, v), rtol=1e-4, atol=1e-5)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_reference_error() -> None:
    g = torch.Generator().manual_seed(0)
    layer = Linear(512, 384)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(384, 512, generator=g) * 0.02)
        layer.bias.copy_(torch.randn(384, generator=g) * 0.01)
    x = torch.randn(3, 50, 512, generator=g)
    x[..., :8] *= 10  # activation outlier channels
    exact = layer(x)
    err = _rel(fp8_linear_reference(layer, x), exact)
    # e4m3 keeps 3 mantissa bits: ~2.4% RMS rounding per operand, so with both
    # operands quantised ~sqrt(2) x 2.4% on the product. Measured 3.48% here.
    assert err <= 0.04, err
    wq, sw = weight_rowwise(layer)
    assert wq.dtype == torch.float8_e4m3fn and sw.shape == (1, 384)
    xq, sx = quantize_rows(x.reshape(-1, 512))
    assert sx.shape == (150, 1) and xq.abs().float().max() <= 448


def test_enable_fp8_keeps_memory_and_skips_excluded_layers() -> None:
    m = tiny_dit(TINY_DIT)
    names = enable_fp8(m, exclude=("text_embedding", "time_", "head."))
    assert "blocks.0.self_attn.q" in names and "head.head" not in names
    q = m.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (TINY_DIT.dim, 1)
    # On the CPU, run the fp8 layers through the reference (same quantisation as
    # _scaled_mm): the model still agrees closely with its bf16/fp32 self.
    ref = tiny_dit(TINY_DIT)
    for mod in m.modules():
        if isinstance(mod, Linear) and mod.kernel is not None:
            mod.kernel = fp8_linear_reference
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, TINY_DIT.text_dim, generator=g)
    t = torch.tensor([600.0])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(m(x, t, ctx, cond).flatten(), ref(x, t, ctx, cond).flatten(), 0)
    assert cos > 0.99


def test_plan_resolves_auto_and_refuses_impossible_knobs() -> None:
    plan, choice = make_plan("cpu")
    assert (plan.precision, plan.attention, plan.compile) == ("bf16", "sdpa", "off")
    assert any("fp8 matmuls need a CUDA GPU" in n for n in plan.notes)
    with pytest.raises(WanrenderError, match="precision fp8 cannot run here"):
        make_plan("cpu", precision="fp8")
    with pytest.raises(WanrenderError, match="compile 'fast' is invalid"):
        make_plan("cpu", compile="fast")


@pytest.mark.slow
def test_regional_compile_matches_eager_on_cpu() -> None:
    from wanrender.runtime.plan import compile_blocks

    m = tiny_dit(TINY_DIT)
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, TINY_DIT.text_dim, generator=g)
    t = torch.tensor([600.0])
    with torch.no_grad():
        want = m(x, t, ctx, cond)
        compile_blocks(m, "default")
        got = m(x, t, ctx, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 77, 1000])
def test_fp8_rowwise_kernel_matches_reference(rows: int) -> None:
    from wanrender.kernels.linear import fp8_rowwise

    g = torch.Generator(device="cuda").manual_seed(0)
    layer = Linear(1024, 2048).cuda()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(2048, 1024, generator=g, device="cuda") * 0.02)
        layer.bias.copy_(torch.randn(2048, generator=g, device="cuda") * 0.01)
    x = torch.randn(2, rows, 1024, generator=g, device="cuda", dtype=torch.bfloat16)
    want = fp8_linear_reference(layer, x)
    got = fp8_rowwise(layer, x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 2048)
    assert _rel(got, want) < 1e-2  # same quantisation; only bf16 output rounding differs
    assert _rel(got, layer(x)) < 0.04


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa", "sdpa-cudnn", "sdpa-flash", "sage8", "flash-attn", "sage"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_backends_match_reference(name: str, dtype: torch.dtype) -> None:
    target = attn.Target.of("cuda", dtype, 128)
    if attn.reasons(name, target):
        pytest.skip("; ".join(attn.reasons(name, target)))
    q, k, v = make_realistic_qkv(
        2, 1037, 4, 128, device="cuda", dtype=dtype, v_mean=0.5
    )  # sage8: ~1.6% (CPU reference)
    got = attn.select(name, target).fn(q, k, v)
    want = attn.reference_attention(q.float(), k.float(), v.float())
    tol = 0.03 if name.startswith("sage") else 0.01
    assert _rel(got, want) <= tol


def test_fp8_path_on_hopper_ranks_the_8bit_kernel_first(monkeypatch) -> None:
    # The registry's measured order: sage8 leads the fp8 path on sm90; when it cannot
    # run (no Triton here), auto falls through to cuDNN and records why.
    assert attn.PRIORITY["sm90-8bit"][0] == "sage8"
    ok = attn.Backend("sage8", "stand-in", lambda: lambda q, k, v: q, lambda t: [])
    monkeypatch.setitem(attn.REGISTRY, "sage8", ok)
    assert attn.select("auto", H100, eight_bit=True).backend.name == "sage8"
    assert attn.select("auto", H100).backend.name == "sdpa-cudnn"  # the bf16 path stays exact
    no = attn.Backend("sage8", "stand-in", lambda: None, lambda t: ["Triton is not installed"])
    monkeypatch.setitem(attn.REGISTRY, "sage8", no)
    choice = attn.select("auto", H100, eight_bit=True)
    assert choice.backend.name == "sdpa-cudnn" and choice.rejected["sage8"] == ["Triton is not installed"]
    assert attn.select("auto", A100, eight_bit=True).backend.name != "sage8"  # sm80: no 8-bit order measured


def test_rope_real_arithmetic_matches_the_complex_product(monkeypatch) -> None:
    # The compiled block rotates in real arithmetic (Inductor generates no complex
    # code); it must give the eager complex product's numbers.
    from wanrender.models import dit

    rope = dit.rope_tables(TINY_DIT, (3, 4, 5), torch.device("cpu"))
    assert rope.dtype == torch.float32 and rope.shape[-1] == 2
    x = torch.randn(2, 60, TINY_DIT.num_heads, TINY_DIT.head_dim, generator=torch.Generator().manual_seed(1))
    eager = dit.apply_rope(x, rope)
    torch.testing.assert_close(dit.rope_real(x, rope), eager, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(dit.apply_rope(x, rope), eager, rtol=1e-6, atol=1e-6)
    # A rotation keeps each pair's length.
    torch.testing.assert_close(eager.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_compiled_block_graph_has_no_complex_tensors() -> None:
    # Inductor cannot generate code for complex ops (on CUDA it falls back to eager and
    # the qk norm + RoPE do not fuse): the graph the block compiles to must be real.
    m = tiny_dit(TINY_DIT)
    dtypes: set = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            val = node.meta.get("example_value", node.meta.get("val"))
            if isinstance(val, torch.Tensor):
                dtypes.add(val.dtype)
        return gm.forward

    torch._dynamo.reset()
    for block in m.blocks:
        block.compile(backend=backend, dynamic=False)
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, TINY_DIT.text_dim, generator=g)
    with torch.no_grad():
        m(x, torch.tensor([500.0]), ctx, cond)
    torch._dynamo.reset()
    assert dtypes and not any(d.is_complex for d in dtypes), dtypes


def test_bench_dit_bf16_variants_parse_and_compile_toggles() -> None:
    from typer.testing import CliRunner

    from wanrender.bench import dit as bd
    from wanrender.cli import app

    assert bd.parse_variants("auto:off, sage8:default,sdpa-cudnn") == [
        ("auto", "off"), ("sage8", "default"), ("sdpa-cudnn", "off")]  # fmt: skip
    for bad in ("sage8:fast", ":default", " , "):
        with pytest.raises(WanrenderError, match="--bf16-variants"):
            bd.parse_variants(bad)
    res = CliRunner().invoke(app, ["bench", "dit", "--bf16-variants", "sage8:sometimes"])
    assert res.exit_code == 2 and "ATTENTION:COMPILE" in res.output  # before the no-GPU error
    import torch._dynamo

    from wanrender.runtime.plan import compile_blocks, compiled_scope

    m = tiny_dit(TINY_DIT)
    torch._dynamo.config.recompile_limit = 8
    compile_blocks(m, "default")  # lazy: nothing compiles until a call
    assert torch._dynamo.config.recompile_limit == 8  # compiling changes no process-wide setting
    with compiled_scope():
        assert torch._dynamo.config.recompile_limit >= 64  # shapes x backends x precisions share one cache
    assert torch._dynamo.config.recompile_limit == 8
    assert all(b._compiled_call_impl is not None for b in m.blocks)
    compile_blocks(m, "off")
    assert all(b._compiled_call_impl is None for b in m.blocks)


def _fake_sage8(monkeypatch) -> list[dict]:
    # sage8 made runnable on the CPU: the capability check passes and the kernel is a
    # stand-in that records the options it was called with.
    from wanrender.kernels import attention_sage8 as sa

    seen: list[dict] = []

    def kernel(q, k, v, **opts):
        seen.append(opts)
        return attn.reference_attention(q, k, v)

    kernel.__signature__ = inspect.signature(sa.sage8_attention)  # the options it takes
    monkeypatch.setattr(sa, "can_run", lambda *a, **kw: [])
    monkeypatch.setattr(sa, "sage8_attention", kernel)
    return seen


def test_kernel_options_travel_with_the_choice(monkeypatch) -> None:
    seen = _fake_sage8(monkeypatch)
    tuned = attn.select("sage8", H100, options={"num_stages": 2, "block_n": 64})
    plain = attn.select("sage8", H100)
    assert tuned.options == (("block_n", 64), ("num_stages", 2)) and plain.options == ()
    assert "block_n=64" in tuned.describe()
    q = torch.randn(1, 16, 2, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    tuned.fn(q, q, q)
    plain.fn(q, q, q)
    tuned.fn(q, q, q)
    assert seen == [{"block_n": 64, "num_stages": 2}, {}, {"block_n": 64, "num_stages": 2}]
    # auto hands the options to the winner when it takes them, drops them otherwise
    assert attn.select("auto", H100, eight_bit=True, options={"block_n": 64}).options == (("block_n", 64),)
    assert attn.select("auto", H100, options={"block_n": 64}).options == ()


def test_kernel_options_are_checked() -> None:
    with pytest.raises(WanrenderError, match="unknown sage8 option 'blockn' — known: block_m, block_n"):
        attn.freeze_options("sage8", {"blockn": 64})
    with pytest.raises(WanrenderError, match="'sdpa' takes no kernel options"):
        attn.select("sdpa", CPU, options={"block_n": 64})
    with pytest.raises(WanrenderError, match="option 'block_n' = \\[64\\] is invalid"):
        attn.freeze_options("sage8", {"block_n": [64]})
    assert attn.freeze_options("sage8", {"use_tma": None, "pv_fp8": False}) == (("pv_fp8", False), ("use_tma", None))


def test_sage8_op_stays_opaque_to_compile_and_keeps_its_options(monkeypatch) -> None:
    seen = _fake_sage8(monkeypatch)
    choice = attn.select("sage8", H100, options={"block_n": 64})
    q = torch.randn(1, 16, 2, 64, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(choice.fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, q, q), attn.reference_attention(q, q, q))
    assert seen and all(s == {"block_n": 64} for s in seen)  # the real kernel ran, with its options


@pytest.mark.parametrize("backend", ["sage8", "cudnn-fp8"])
def test_eager_8bit_attention_does_not_import_dynamo(backend: str) -> None:
    """A process that never compiles calls the kernels themselves: the custom op's first
    call imported Dynamo and Inductor (1.2 s here, about 4 s on a fresh GPU install) inside
    the first step. The kernels are stand-ins here (no GPU); the dispatch is the real one."""
    code = (
        "import torch\n"
        "from wanrender.kernels import attention as attn, attention_sage8 as sa, attention_cudnn as ac\n"
        "seen = []\n"
        "sa.can_run = ac.can_run = lambda *a, **kw: []\n"
        "sa.sage8_attention = lambda q, k, v, **o: seen.append('sage8') or attn.reference_attention(q, k, v)\n"
        "ac.core = lambda q, k, v, *rest: seen.append('cudnn-fp8') or attn.reference_attention(q, k, v)\n"
        f"choice = attn.select({backend!r}, attn.Target('cuda', (9, 0), torch.bfloat16, 128))\n"
        "q = torch.randn(1, 16, 2, 128)\n"
        "out = choice.fn(q, q, q)\n"
        "assert torch.allclose(out, attn.reference_attention(q, q, q)), 'wrong output'\n"
        "print(seen)"
    )
    assert dynamo_after(code) == f"['{backend}'] clean"
