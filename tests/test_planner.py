"""The VRAM planner: memory and time models against the measurements, decisions on
synthetic GPUs, refusals, and `wanrender plan`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from wanrender.cli import app
from wanrender.errors import WanrenderError
from wanrender.runtime import gpus, planner, timing
from wanrender.runtime import memory as mem
from wanrender.runtime.gpus import GIB, GPUSpec
from wanrender.runtime.memory import Weights, Workload
from wanrender.runtime.planner import Context, MemoryPlan, PlanRefused, decide, predict
from wanrender.spec import GIB as SPEC_GIB
from wanrender.spec import Sampling, SpecError, parse_bytes, parse_gib

W = Weights.standard()
REF = Workload(81, 832, 1216)


def ctx_for(gpu: str | GPUSpec, vram: float | None = None, precision: str = "fp8", compile: str = "off",
            reserve: float = 0.5, ram: float | None = 128) -> Context:  # fmt: skip
    spec = gpus.named(gpu) if isinstance(gpu, str) else gpu
    if vram is not None:
        spec = spec.with_vram(vram)
    return Context(spec, W, planner.resolve_precision(precision, spec), compile, reserve, ram)


def test_standard_weights_match_the_architecture() -> None:
    from wanrender.models.common import Linear
    from wanrender.models.dit import DiTConfig, WanDiT
    from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder
    from wanrender.models.vae import VAEConfig, WanVAE

    with torch.device("meta"):
        dit, te, vae = WanDiT(DiTConfig()), UMT5Encoder(TextEncoderConfig.preset("umt5-xxl")), WanVAE(VAEConfig())

    def fp8_bytes(m):  # Linear weights 1 byte, everything else bf16
        lin = sum(x.weight.numel() for x in m.modules() if isinstance(x, Linear))
        return lin + 2 * (sum(p.numel() for p in m.parameters()) - lin)

    assert W.expert == fp8_bytes(dit) and W.block == fp8_bytes(dit.blocks[0]) and W.num_blocks == 40
    assert W.text_encoder == fp8_bytes(te)
    assert W.vae == 2 * sum(p.numel() for p in vae.parameters())
    assert 14.2e9 < W.expert < 14.4e9  # the fp8_scaled file is ~14.3 GB


def test_model_reproduces_the_measured_h200_peak_and_times() -> None:
    # docs/benchmarks.md: 44.1 GiB allocated, everything resident, eager dequantising path.
    weights = 2 * W.expert + W.text_encoder + W.vae
    old_code = weights + mem.MEASURED_UNITS * 5120 * REF.tokens * mem.ACT_CALIBRATION + mem.misc_bytes(REF)
    assert old_code / GIB == pytest.approx(mem.MEASURED_PEAK_GIB, abs=0.05)
    h200 = ctx_for("h200", precision="bf16")
    now = predict(MemoryPlan(), replace(h200, weights=replace(W, lora=0)), REF)
    assert 42.0 < now.peak_bytes / GIB < mem.MEASURED_PEAK_GIB  # RoPE temporaries shrank since (24 vs 26 units)
    # Measured forwards: bf16 eager 15.33 s, fp8 + compile 12.45 s; the turbo pipeline 69.25 s.
    assert timing.dit_step_seconds(h200.gpu, REF, "eager")["total"] == pytest.approx(15.33, abs=0.05)
    assert timing.dit_step_seconds(h200.gpu, REF, "compiled-fp8")["total"] == pytest.approx(12.45, abs=0.05)
    assert now.seconds == pytest.approx(69.25, rel=0.03)


def test_activation_model_scales_as_documented() -> None:
    eager = mem.dit_activation_bytes(REF, "eager")
    assert mem.dit_activation_bytes(replace(REF, sampling=Sampling(cfg=3.5)), "eager") == pytest.approx(
        2 * eager, rel=1e-6
    )
    assert mem.dit_activation_bytes(replace(REF, frames=161), "eager") / eager == pytest.approx(41 / 21, rel=1e-3)
    assert mem.dit_activation_bytes(REF, "fp8-eager") > eager > mem.dit_activation_bytes(REF, "compiled-fp8")
    chunked = [mem.dit_activation_bytes(REF, "fp8-eager", n) for n in (1, 4, 16)]
    assert chunked[0] > chunked[1] > chunked[2] > 8 * 5120 * REF.tokens  # K, V and x stay whole
    assert mem.vae_decode_bytes(REF, tiled=True) < 0.5 * mem.vae_decode_bytes(REF)
    # The measured peak came from the DiT: the modelled decode must stay below it.
    assert mem.vae_decode_bytes(REF) < (mem.MEASURED_PEAK_GIB * GIB - 2 * W.expert - W.text_encoder)


# (gpu, vram override, frames, size, cfg, expected experts mode)
DECISIONS = [
    ("h200", None, 81, (832, 1216), 1.0, "resident"),
    ("h200", None, 161, (832, 1216), 3.5, "resident"),
    ("h100", None, 161, (832, 1216), 1.0, "resident"),
    ("a100-80g", None, 81, (832, 1216), 1.0, "resident"),
    ("rtx5090", None, 81, (832, 1216), 1.0, "stream"),
    ("rtx4090", None, 81, (832, 1216), 1.0, "stream"),
    ("rtx4090", None, 161, (832, 1216), 1.0, "stream"),
    ("h100", 30.0, 81, (480, 832), 1.0, "swap"),
    ("rtx4090", 12.0, 81, (832, 1216), 1.0, "stream"),
    ("rtx4090", 6.0, 81, (832, 1216), 1.0, None),  # refused
]


@pytest.mark.parametrize("gpu,vram,frames,size,cfg,expected", DECISIONS)
def test_planner_decisions(gpu, vram, frames, size, cfg, expected) -> None:
    ctx = ctx_for(gpu, vram)
    work = Workload(frames, *size, Sampling(cfg=cfg))
    d = decide(ctx, work)
    if expected is None:
        assert d.chosen is None
        return
    c = d.chosen
    assert c is not None and c.plan.experts == expected, c.plan.describe()
    assert mem.device_bytes(c.peak_bytes) - mem.CUDA_CONTEXT_GIB * GIB <= ctx.budget_bytes
    # Nothing that fits is predicted faster than the choice, beyond the tie band.
    assert all(c.seconds <= p.seconds * (1 + planner.TIE) for p in d.ranked if p.fits)
    if c.plan.experts == "stream":  # as many blocks resident as the budget allows
        more = predict(replace(c.plan, resident_blocks=c.plan.resident_blocks + 1), ctx, work)
        assert c.plan.resident_blocks == W.num_blocks - 1 or not more.fits


def test_more_memory_is_never_slower_and_peaks_grow_with_frames() -> None:
    times = [decide(ctx_for("rtx4090", v), REF).chosen.seconds for v in (10, 16, 24, 32, 48, 80)]
    # Within the planner's tie band (plans 2% apart are ties, decided by robustness).
    assert all(b <= a * (1 + planner.TIE) for a, b in zip(times, times[1:])) and times[-1] < times[0]
    peaks = [predict(MemoryPlan(), ctx_for("h200"), replace(REF, frames=f)).peak_bytes for f in (17, 49, 81, 121)]
    assert peaks == sorted(peaks)


def test_streaming_costs_nothing_when_compute_hides_it_and_shows_when_it_cannot() -> None:
    ctx = ctx_for("rtx4090", 48)
    swap = predict(MemoryPlan("swap"), ctx, REF)
    stream = predict(MemoryPlan("stream", resident_blocks=0), ctx, REF)
    assert stream.step_seconds < swap.step_seconds * 1.01  # 35 ms copies behind ~1.6 s blocks
    tiny = Workload(5, 256, 256)  # ~0.3 ms blocks: every copy is exposed
    s0 = predict(MemoryPlan("stream", resident_blocks=0), ctx, tiny).step_seconds
    assert s0 > 3 * predict(MemoryPlan("swap"), ctx, tiny).step_seconds
    slow_host = replace(ctx, host_ram_gib=16)
    assert any("re-read from disk" in n for n in predict(MemoryPlan("swap"), slow_host, REF).notes)


def test_refusal_names_the_largest_request_that_fits() -> None:
    from wanrender.cli_errors import flagged

    ctx = ctx_for("rtx4090", 8.5)
    work = Workload(121, 832, 1216)
    d = decide(ctx, work)
    assert d.chosen is None
    err = d.refusal()
    msg = str(err)
    assert isinstance(err, PlanRefused) and "\n" not in msg and " — use " in msg
    assert "121 frames at 832x1216 does not fit" in msg and "--" not in msg  # field terms, not flags
    frames, size = planner.largest_fit(ctx, work)
    assert (err.max_frames, err.max_size, err.auto_fits) == (frames, size, False)
    assert err.usable_gib == pytest.approx(ctx.budget_bytes / GIB) and err.need_gib > err.usable_gib
    assert err.reserve_gib == 0.5 and err.leanest == d.leanest().plan
    assert f"frames {frames} at 832x1216" in msg and f"size {size[0]}x{size[1]} at 121 frames" in msg
    shown = flagged(err)  # what the CLI prints
    assert f"--frames {frames} at 832x1216" in shown and f"--size {size[0]}x{size[1]} at 121 frames" in shown
    assert decide(ctx, replace(work, frames=frames)).chosen is not None
    assert decide(ctx, replace(work, frames=frames + 4)).chosen is None
    assert decide(ctx, replace(work, width=size[0], height=size[1])).chosen is not None
    # An explicit mode that cannot fit points at the planner's own choice.
    err = decide(ctx_for("rtx4090"), REF, "resident").refusal()
    assert err.auto_fits and "the leanest resident plan" in str(err) and "use memory auto" in str(err)
    assert "use --memory auto" in flagged(err)


def test_spec_errors_name_flags_on_the_command_line() -> None:
    from wanrender.cli_errors import flagged

    with pytest.raises(SpecError) as e:
        planner.candidates(ctx_for("h100"), REF, "lowvram")
    assert e.value.field == "memory" and str(e.value).startswith("memory 'lowvram' is invalid")
    assert flagged(e.value).startswith("--memory 'lowvram' is invalid")
    assert flagged(SpecError("reserve_vram", "reserve_vram -1 is invalid")) == "--reserve-vram -1 is invalid"
    assert flagged(SpecError("width", "width 833 is invalid")) == "--size 833 is invalid"
    assert flagged(SpecError("shift_low", "shift_low 0 is invalid")) == "--shift 0 is invalid"
    assert flagged(SpecError("frames", "the frames must be 4k+1")) == "the frames must be 4k+1"  # no leading field
    assert flagged(WanrenderError("frames 6 is invalid")) == "frames 6 is invalid"  # untyped: left alone
    advice = SpecError("attention", "attention 'sage8' cannot run here: needs a CUDA GPU — use attention auto")
    assert flagged(advice) == "--attention 'sage8' cannot run here: needs a CUDA GPU — use --attention auto"


def test_step_down_needs_less_memory_and_fits_what_is_free_now() -> None:
    ctx = ctx_for("h100")
    d = decide(ctx, REF)
    assert d.chosen.plan.experts == "resident"
    live = replace(gpus.named("h100"), free_gib=30.0)  # another process took ~48 GiB
    lower = planner.step_down(d, d.chosen.plan, live)
    assert lower is not None and lower.fits and lower.peak_bytes <= 0.9 * d.chosen.peak_bytes
    assert planner.step_down(d, d.chosen.plan, replace(live, free_gib=2.0)) is None


def test_parse_sizes_and_named_gpus() -> None:
    # One unit rule: GB = 10^9 bytes, GiB = 2^30 bytes; a bare memory size is GiB.
    assert SPEC_GIB == GIB
    assert parse_gib("24GiB") == 24 and parse_gib("23.5") == 23.5 and parse_gib("24576MiB") == 24
    assert parse_gib("24GB") == pytest.approx(24e9 / 2**30) and parse_gib("24000MB") == pytest.approx(24e9 / 2**30)
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("24GiB") == 24 * 2**30
    with pytest.raises(SpecError, match="vram 'lots' is invalid") as e:
        parse_gib("lots")
    assert e.value.field == "vram"
    with pytest.raises(SpecError, match="ram '0' is out of range"):
        parse_gib("0", "ram")
    assert gpus.named("RTX4090").name == "RTX 4090" and gpus.named("a100").total_gib > 70
    with pytest.raises(WanrenderError, match="unknown GPU 'v100' — choose one of rtx4090"):
        gpus.named("v100")
    assert gpus.match_name("NVIDIA H100 80GB HBM3") == "h100" and gpus.match_name("NVIDIA A100-SXM4-40GB") == "a100-40g"
    assert gpus.peak_rss_bytes() > 10 << 20


def test_weights_from_files_read_headers(tmp_path, monkeypatch) -> None:
    from wanrender.demo import ensure_demo_models
    from wanrender.models import loading

    monkeypatch.setenv("WANRENDER_HOME", str(tmp_path))
    files = ensure_demo_models()
    w = Weights.from_files(files, "bf16")
    dit = loading.load_dit(files.high)
    on_device = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    assert w.num_blocks == len(dit.blocks) and w.expert == on_device  # what loading puts on the device
    block0 = sum(t.numel() * t.element_size() for t in dit.blocks[0].state_dict().values())
    assert w.block == block0 and w.text_encoder > 0 and w.vae > 0 and w.lora > 0
    # A bf16 file planned for fp8: wide Linear weights become 1 byte (+ a per-channel scale).
    from helpers_models import tiny_dit
    from safetensors.torch import save_file

    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in tiny_dit().state_dict().items()}
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    top16, blocks16 = mem._dit_bytes(tmp_path / "bf16.safetensors", "bf16")
    top8, blocks8 = mem._dit_bytes(tmp_path / "bf16.safetensors", "fp8")
    assert top16 + sum(blocks16) == sum(v.numel() * 2 for v in sd.values())
    # Block 0 (dim 64, ffn 128): 40,960 Linear weights convert (cross-attn k/v stay bf16),
    # saving 1 byte each but adding a 4-byte scale per output row (576 rows).
    assert blocks16[0] - blocks8[0] == 40_960 - 4 * 576


def test_fp8_exclusion_reads_official_and_diffusers_names() -> None:
    # One list (spec.FP8_EXCLUDE, official names); diffusers headers are renamed before matching.
    kept = ("blocks.3.cross_attn.k.weight", "blocks.3.attn2.to_v.weight", "head.head.weight", "proj_out.weight",
            "condition_embedder.text_embedder.linear_1.weight", "condition_embedder.time_proj.weight",
            "model.diffusion_model.time_embedding.0.weight")  # fmt: skip
    converted = ("blocks.3.self_attn.q.weight", "blocks.3.attn1.to_q.weight", "blocks.3.attn2.to_q.weight",
                 "blocks.3.ffn.net.0.proj.weight", "model.diffusion_model.blocks.3.ffn.0.weight")  # fmt: skip
    assert all(mem._kept_on_bf16(k) for k in kept)
    assert not any(mem._kept_on_bf16(k) for k in converted)


def test_cli_plan_for_named_gpus() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "--gpu", "rtx4090", "--frames", "81", "--ram", "64GiB"])
    assert res.exit_code == 0, res.output
    assert "RTX 4090" in res.output and "Frame-count guide at 832x1216" in res.output
    assert "stream:" in res.output and "161" in res.output and "does not fit" not in res.output
    assert "kept free while sampling" in res.output
    res = runner.invoke(app, ["plan", "--gpu", "h100", "--frames", "161"])
    assert res.exit_code == 0 and "both experts resident" in res.output
    res = runner.invoke(app, ["plan", "--gpu", "v100"])
    assert res.exit_code == 2 and "unknown GPU" in res.output
    res = runner.invoke(app, ["plan", "--gpu", "h100", "--frames", "80"])
    assert res.exit_code == 2 and "try 81" in res.output
    res = runner.invoke(app, ["plan", "--vram", "lots"])
    assert res.exit_code == 2 and "--vram 'lots' is invalid" in res.output
    res = runner.invoke(app, ["plan", "--gpu", "h100", "--memory", "lowvram"])
    assert res.exit_code == 2 and "--memory 'lowvram' is invalid" in res.output


def test_cli_plan_exits_1_when_the_request_is_refused() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "--vram", "6GiB", "--ram", "64GiB"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())  # rich wraps long lines
    assert "81 frames at 832x1216: refused" in out and "does not fit" in out
    assert "use --size " in out and "Frame-count guide at 832x1216" in out  # the report and guide still print
    # The frames asked about fit, even where longer rows of the guide do not: exit 0.
    res = runner.invoke(app, ["plan", "--vram", "12GiB", "--ram", "64GiB", "--frames", "25"])
    assert res.exit_code == 0, res.output
    # A bare --vram is GiB; 24GB is 22.35 GiB (GB = 10^9 bytes).
    res = runner.invoke(app, ["plan", "--vram", "24GB", "--ram", "64GiB"])
    assert res.exit_code == 0 and "a GPU @ 22.3517 GiB" in res.output, res.output
    res = runner.invoke(app, ["plan", "--vram", "24", "--ram", "64GiB"])
    assert res.exit_code == 0 and "a GPU @ 24 GiB" in res.output, res.output


def test_plan_render_refuses_before_loading() -> None:
    from types import SimpleNamespace

    from wanrender.cli_errors import flagged
    from wanrender.spec import RenderSpec, RuntimeKnobs

    # plan_render reads only .render, .sampling and .knobs of a request.
    req = SimpleNamespace(render=RenderSpec(image=None, prompt="a bear"), sampling=Sampling(), knobs=RuntimeKnobs())
    tiny = gpus.named("rtx4090").with_vram(4)
    with pytest.raises(PlanRefused, match=r"81 frames at 832x1216 does not fit RTX 4090 @ 4 GiB.* — use size") as e:
        planner.plan_render(req, None, "cuda", gpu=tiny, weights=W)  # files are never opened
    assert e.value.max_size is not None and "— use --size" in flagged(e.value)
    # The knobs steer the decision: a larger reserve leaves less usable memory.
    roomy = gpus.named("h100")
    assert planner.plan_render(req, None, "cuda", gpu=roomy, weights=W).chosen.plan.experts == "resident"
    held = SimpleNamespace(
        render=req.render, sampling=req.sampling, knobs=RuntimeKnobs(memory="swap", reserve_vram=4.0)
    )
    d = planner.plan_render(held, None, "cuda", gpu=roomy, weights=W)
    assert d.mode == "swap" and d.ctx.reserve_gib == 4.0 and d.chosen.plan.experts == "swap"
    assert planner.plan_render(held, None, "cpu") == planner.cpu_plan("swap")
    assert Workload.of(req) == REF


def test_generate_refuses_before_loading(tmp_path, monkeypatch) -> None:
    from wanrender.engine import Engine
    from wanrender.request import from_preset
    from wanrender.runner import Runner

    monkeypatch.setenv("WANRENDER_HOME", str(tmp_path / "home"))
    from wanrender.demo import demo_image, ensure_demo_models

    files = ensure_demo_models()
    req = from_preset("turbo", demo_image(), "a bear", frames=81, out=tmp_path / "x.mp4")
    monkeypatch.setattr(Engine, "load", classmethod(lambda *a, **k: pytest.fail("loaded before refusing")))
    tiny = gpus.named("rtx4090").with_vram(4)
    monkeypatch.setattr(planner, "Weights", type("W", (), {"from_files": staticmethod(lambda f, p: W)}))
    monkeypatch.setattr(gpus, "probe", lambda *a, **k: tiny)
    with pytest.raises(PlanRefused, match=r"81 frames at 832x1216 does not fit RTX 4090 @ 4 GiB.* — use size"):
        Runner("cuda").render(req, files)
    assert not (tmp_path / "x.mp4").exists()


def test_request_validates_memory_knobs(tmp_path) -> None:
    from wanrender.request import MEMORY_MODES, from_preset

    assert MEMORY_MODES == planner.MODES
    with pytest.raises(WanrenderError, match="memory 'lowvram' is invalid — choose one of auto"):
        from_preset("turbo", tmp_path / "i.png", "a bear", memory="lowvram")
    with pytest.raises(WanrenderError, match="reserve_vram -1 is invalid"):
        from_preset("turbo", tmp_path / "i.png", "a bear", reserve_vram=-1.0)
    assert (
        from_preset("turbo", tmp_path / "i.png", "a bear", memory="stream", reserve_vram=4.0).knobs.memory == "stream"
    )


def test_plans_leave_room_for_the_allocator_holes_measured_under_a_cap() -> None:
    # Measured on an H200 capped to an RTX 4090's 23.6 GiB (docs/benchmarks.md,
    # 2026-11-22): "stream 12, unchunked" peaked at 21.0 GiB allocated (predicted
    # 21.5) and still ran out of memory with 2.2 GiB held in allocator holes. The
    # planner now refuses that plan and picks one that leaves the room.
    w = Weights.standard(lora=False)
    ctx = Context(replace(gpus.named("h200"), total_gib=23.6, free_gib=None), w, "bf16", "off", 0.5, 125)
    failed = predict(MemoryPlan("stream", resident_blocks=12), ctx, REF)
    assert not failed.fits
    assert failed.holes_bytes == pytest.approx(3 * REF.tokens * 5120 * 2, rel=1e-6)
    chosen = decide(ctx, REF).chosen
    assert chosen.fits and chosen.peak_bytes + chosen.holes_bytes <= ctx.budget_bytes
    # Chunking shrinks the holes with the tensors that leave them.
    chunked = predict(MemoryPlan("stream", resident_blocks=6, chunks=4), ctx, REF)
    assert chunked.holes_bytes == failed.holes_bytes // 4


def test_allocator_config_defaults_to_expandable_segments_unless_the_user_chose() -> None:
    from wanrender.runtime.memory import ALLOC_CONF, default_allocator_config

    env: dict[str, str] = {}
    assert default_allocator_config(env) == ALLOC_CONF == "expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF}
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        mine = {var: "max_split_size_mb:512"}
        assert default_allocator_config(mine) is None and mine == {var: "max_split_size_mb:512"}


def test_flop_counts_add_up_per_layer() -> None:
    # One forward, counted layer by layer (the benchmarks' TFLOP/s use the same count).
    n, d, f, text = 82_992, 5120, 13824, 512
    per_block = (4 * 2 * n * d * d + 2 * 2 * n * d * d + 2 * 2 * text * d * d + 2 * 2 * n * d * f
                 + 4 * n * n * d + 4 * n * text * d)  # fmt: skip
    assert timing.forward_flops(Workload()) == pytest.approx(40 * per_block, rel=1e-12)
    assert timing.forward_flops(Workload(sampling=Sampling(cfg=5.0))) == pytest.approx(2 * 40 * per_block, rel=1e-12)
    assert timing.self_attention_flops(n) == 4 * n * n * 40 * 128


@pytest.mark.parametrize("gpu", ["h200", "h100", "a100-80g", "rtx5090", "rtx4090"])
def test_the_decode_is_whole_wherever_it_fits_at_81_frames(gpu) -> None:
    """Issue #14: at 81 x 832x1216 ComfyUI tiles its VAE decode after an out-of-memory
    error, even on an H200, and tiled frames are ~29.5 dB from whole ones on random
    weights (docs/benchmarks.md). The planner tiles only when the whole decode does not
    fit; where it fits, the chosen plan decodes whole, as the official code does."""
    ctx = ctx_for(gpu)
    c = decide(ctx, REF).chosen
    assert c is not None
    whole = predict(replace(c.plan, tiled_decode=False), ctx, REF)
    assert c.plan.tiled_decode == (not whole.fits), (gpu, c.plan.describe())
    if gpu in ("h200", "h100", "a100-80g"):
        assert not c.plan.tiled_decode
