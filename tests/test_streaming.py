"""Weights that move: streamed, swapped and chunked DiT runs equal resident ones,
on the tiny model on the CPU (the CUDA path runs the same code with streams)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers_models import TINY_DIT, tiny_dit

from wanrender.models.common import Linear, RuntimeAdapter, quantize_fp8
from wanrender.runtime.streaming import BlockStreamer, Placement

CFG = replace(TINY_DIT, num_layers=5)


def inputs(batch: int = 2, device: str = "cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 3, 8, 12, generator=g)
    cond = torch.randn(batch, 20, 3, 8, 12, generator=g)
    ctx = torch.randn(batch, 7, CFG.text_dim, generator=g)
    return [t.to(device) for t in (x, torch.full((batch,), 900.0), ctx, cond)]


def fp8_model(seed: int = 0) -> torch.nn.Module:
    """Tiny DiT with fp8 weights as the users' files hold them: per-tensor scales, some
    per-channel, and run-time LoRA adapters on a few layers."""
    m = tiny_dit(CFG, seed)
    g = torch.Generator().manual_seed(seed + 7)
    for i, (name, mod) in enumerate(m.named_modules()):
        if isinstance(mod, Linear) and name.startswith("blocks."):
            q, s = quantize_fp8(mod.weight.data)
            mod._parameters["weight"] = torch.nn.Parameter(q, requires_grad=False)
            mod.weight_scale = s if i % 2 else s.expand(mod.out_features, 1).clone()
            if i % 3 == 0:
                down = torch.randn(4, mod.in_features, generator=g) * 0.1
                mod.adapters = (RuntimeAdapter(down, torch.randn(mod.out_features, 4, generator=g) * 0.1, 0.5),)
    return m


@pytest.mark.parametrize("resident,chunks", [(0, 1), (1, 1), (3, 1), (5, 1), (2, 3), (0, 16)])
@pytest.mark.parametrize("make", [tiny_dit, fp8_model], ids=["fp32", "fp8+lora"])
@torch.no_grad()
def test_streamed_equals_resident(make, resident: int, chunks: int) -> None:
    m = make(CFG) if make is tiny_dit else make()
    args = inputs()
    ref = m(*args)
    host = {k: v for k, v in m.state_dict().items()}
    s = BlockStreamer(m, "cpu", resident, chunks=chunks)
    assert (m.block_source is None) == (resident == CFG.num_layers and chunks == 1)
    for _ in range(2):  # slots are reused across forwards
        out = m(*args)
        if chunks == 1:
            assert torch.equal(out, ref)  # the same weights, the same kernels: bit for bit
        else:  # GEMMs over fewer rows may sum in another order
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert s.copies == 2 * (CFG.num_layers - resident) and len(s.slots) == (2 if resident < CFG.num_layers else 0)
    s.uninstall()
    assert m.block_source is None
    # The module is back on its own host tensors: same objects, nothing copied back.
    assert all(m.state_dict()[k].data_ptr() == v.data_ptr() for k, v in host.items())
    assert torch.equal(m(*args), ref)


@pytest.mark.parametrize("chunks", [1, 2, 5, 64, 1000])
@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_chunked_block_equals_block(chunks: int, batch: int) -> None:
    from wanrender.models.dit import rope_tables, sdpa_attention

    m = fp8_model()
    block = m.blocks[1]
    g = torch.Generator().manual_seed(3)
    L = 3 * 4 * 6
    x = torch.randn(batch, L, CFG.dim, generator=g)
    e = torch.randn(batch, 6, CFG.dim, generator=g) * 0.1
    ctx = torch.randn(batch, 7, CFG.dim, generator=g)
    rope = rope_tables(CFG, (3, 4, 6), x.device)
    ref = block(x, e, ctx, rope, sdpa_attention, torch.float32)
    out = block(x.clone(), e, ctx, rope, sdpa_attention, torch.float32, chunks=chunks)
    if chunks == 1:
        assert torch.equal(out, ref)  # the default: the same code path
    else:  # GEMMs over fewer rows may sum in another order
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_placement_moves_and_restores_the_same_tensors() -> None:
    m = fp8_model()
    before = {id(t) for t in m.parameters()}
    p = Placement(m.blocks[0], "meta")  # any other device: the copy is new, the original kept
    assert all(t.device.type == "meta" for t in m.blocks[0].parameters())
    adapters = [a for mod in m.blocks[0].modules() if isinstance(mod, Linear) for a in mod.adapters]
    assert adapters and all(a.down.device.type == "meta" for a in adapters)
    assert p.nbytes == sum(t.numel() * t.element_size() for t in fp8_model().blocks[0].state_dict().values())
    p.restore()
    assert {id(t) for t in m.parameters()} == before
    assert all(
        a.down.device.type == "cpu" for mod in m.blocks[0].modules() if isinstance(mod, Linear) for a in mod.adapters
    )


# ----------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANRENDER_HOME", str(tmp_path_factory.mktemp("home")))
    from wanrender.demo import demo_image, ensure_demo_models

    yield ensure_demo_models(), demo_image()
    mp.undo()


def _req(image, out, memory: str, **kw):
    from wanrender.request import from_preset

    return from_preset("demo", image, "slow dolly-in", frames=5, width=80, height=64, out=out, memory=memory, **kw)


def test_swap_and_stream_render_what_resident_renders(demo, tmp_path) -> None:
    from wanrender.runner import Runner

    files, image = demo
    res = {
        m: Runner("cpu").render(_req(image, tmp_path / f"{m}.mp4", m), files) for m in ("resident", "swap", "stream")
    }
    # Swap and stream both keep the LoRA unmerged (stream on the CPU also chunks, which
    # may reorder GEMM sums). Resident merges it into the fp8 weights (requantised), so
    # it agrees closely rather than exactly.
    torch.testing.assert_close(res["swap"].latent, res["stream"].latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["resident"].latent, res["swap"].latent, rtol=0.05, atol=0.05)
    sides = {m: json.loads(r.sidecar.read_text()) for m, r in res.items()}
    for m, side in sides.items():
        entry = side["plan"]["runtime"]["memory"]
        assert entry["plan"]["experts"] == m and entry["fallback"] is None
        assert side["peak_host_rss_bytes"] > 50 << 20
    run = {m: sides[m]["plan"]["runtime"]["memory"]["run"] for m in ("swap", "stream")}
    assert run["swap"]["expert_installs"] == 2 and run["swap"]["streamed_block_copies"] == 0
    # stream on the CPU keeps 1 of the demo's 2 blocks resident: 1 copy per forward, 4 steps.
    assert run["stream"]["expert_installs"] == 2 and run["stream"]["streamed_block_copies"] == 4
    assert "expert_install" in sides["swap"]["timings_s"]


def test_out_of_memory_steps_down_once_and_says_so(demo, tmp_path, monkeypatch) -> None:
    from wanrender import engine as engine_mod
    from wanrender.runner import Runner
    from wanrender.runtime import gpus, planner
    from wanrender.runtime.memory import Weights, Workload

    files, image = demo
    # Plan as for an H100 whose memory another process then takes: resident first.
    ctx = planner.Context(gpus.named("h100"), Weights.standard(), "fp8", "off", 0.5, 128)
    decision = planner.decide(ctx, Workload(81))
    assert decision.chosen.plan.experts == "resident"
    monkeypatch.setattr(planner, "plan_render", lambda *a, **k: decision)
    real_step_down = planner.step_down
    monkeypatch.setattr(planner, "step_down", lambda d, failed, gpu: real_step_down(
        d, failed, replace(gpus.named("h100"), free_gib=30.0)))  # fmt: skip
    calls = []
    real_render = engine_mod.Engine.render

    def flaky(self, *a, **k):
        calls.append(self.memory.plan.experts)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_render(self, *a, **k)

    monkeypatch.setattr(engine_mod.Engine, "render", flaky)
    events = []
    res = Runner("cpu").render(_req(image, tmp_path / "f.mp4", "auto"), files, lambda *e: events.append(e))
    assert calls[0] == "resident" and calls[1] != "resident" and len(calls) == 2
    side = json.loads(res.sidecar.read_text())
    fb = side["plan"]["runtime"]["memory"]["fallback"]
    assert fb["from"]["experts"] == "resident" and fb["to"]["experts"] == calls[1]
    assert any(e[0] == "memory" and "stepped down" in e[3] for e in events)
    # A second out-of-memory error is not retried again.
    calls.clear()
    monkeypatch.setattr(
        engine_mod.Engine, "render", lambda self, *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x"))
    )
    from wanrender.errors import WanrenderError

    with pytest.raises(WanrenderError, match="ran out of memory again after stepping down"):
        Runner("cpu").render(_req(image, tmp_path / "g.mp4", "auto"), files)
    assert not (tmp_path / "g.mp4").exists()


# ----------------------------------------------------------------------- the CUDA path


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_streaming_equals_resident_and_bounds_memory() -> None:
    big = replace(TINY_DIT, dim=512, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=64)
    host = tiny_dit(big)
    args = inputs(device="cuda")
    args[2] = torch.randn(2, 7, big.text_dim, device="cuda")
    ref = tiny_dit(big).cuda()(*args)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    s = BlockStreamer(host, "cuda", resident=2)
    held = torch.cuda.memory_allocated() - base
    block = sum(t.numel() * t.element_size() for t in host.blocks[0].state_dict().values())
    assert held < 2 * block + 2 * (block + 64 * 256) + sum(  # resident blocks + two slots + the rest
        t.numel() * t.element_size() for n, t in host.state_dict().items() if not n.startswith("blocks.")
    )
    out = host(*args)
    torch.testing.assert_close(out, ref)
    assert s.copies == 6 and s.pinned_bytes > 0
    s.uninstall()
    assert all(t.device.type == "cpu" for t in host.parameters())


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_swap_prefetches_the_low_expert_during_the_last_high_step() -> None:
    from wanrender.runtime.offload import MemoryRuntime
    from wanrender.runtime.planner import MemoryPlan

    high, low = tiny_dit(CFG, 0), tiny_dit(CFG, 1)
    args = inputs(device="cuda")
    ref_low = tiny_dit(CFG, 1).cuda()(*args)
    rt = MemoryRuntime(high, low, torch.nn.Linear(2, 2), torch.device("cuda"), MemoryPlan("swap", prefetch=True))
    rt.begin_sampling()
    assert all(t.is_cuda for t in high.parameters()) and not any(t.is_cuda for t in low.parameters())
    rt.after_step("pass1_high", 0, 2)  # the last high step starts: low comes in beside it
    high(*args)
    rt.switch()
    assert rt.prefetched and not any(t.is_cuda for t in high.parameters())
    torch.testing.assert_close(low(*args), ref_low)
    rt.release()
    assert not any(t.is_cuda for t in low.parameters())
