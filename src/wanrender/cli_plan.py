"""`wanrender plan`: the flags turned into a planner context, and the report printed
from the planner's decision (the chosen plan, or the refusal, and a frame-count guide).

The planner (runtime/planner.py) only predicts and decides; what to parse, what to
print and which flags to suggest lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from wanrender.bench.commands import explicit_knobs
from wanrender.cli_errors import flagged
from wanrender.errors import WanrenderError
from wanrender.runtime import memory as mem
from wanrender.runtime import multigpu
from wanrender.runtime.gpus import GIB
from wanrender.runtime.memory import Weights, Workload
from wanrender.runtime.planner import (
    GUIDE_FRAMES,
    Context,
    PlanRefused,
    decide,
    expert_pipeline,
    guide,
    resolve_precision,
)
from wanrender.runtime.profiles import choose_profile, profile_spec
from wanrender.spec import check_reserve, parse_gib, parse_size


@dataclass(frozen=True)
class PlanOutput:
    renderables: list  # what to print, in order
    refused: PlanRefused | None  # the request asked about does not fit (the command exits 1)


def plan_report(ctx: Context, work: Workload, mode: str = "auto", frames: tuple[int, ...] = GUIDE_FRAMES,
                profile: str | None = None) -> PlanOutput:  # fmt: skip
    """Rich renderables for `wanrender plan`, and the refusal if the request does not fit.
    ``profile``: the line saying which GPU profile chose the knobs (None: no profile matched)."""
    from rich.table import Table
    from rich.text import Text

    d = decide(ctx, work, mode)
    g = ctx.gpu
    src = "live" if g.free_gib is not None else "named (datasheet figures and estimates)"
    head = [
        f"GPU: {f'{ctx.gpus} x ' if ctx.gpus > 1 else ''}{g.label()} — {src}; budget {ctx.budget_bytes / GIB:.1f} GiB after a {ctx.reserve_gib:g} GiB reserve"
        + ("" if g.free_gib is not None else f" and {mem.CUDA_CONTEXT_GIB:g} GiB CUDA context"),
        f"Compute: precision {ctx.precision if g.fp8_matmul else 'bf16'} ({ctx.path}), {g.attention_tflops:g} TFLOP/s attention; "
        f"weights: {ctx.weights.source} (expert {ctx.weights.expert / GIB:.1f} GiB, text encoder {ctx.weights.text_encoder / GIB:.1f} GiB)",
        "Knobs: " + (profile or "no GPU profile matches this GPU: generate's defaults (or your flags)"),
    ]  # fmt: skip
    refused = None
    if d.chosen is not None:
        c = d.chosen
        head.append(f"{work.label()}, {work.steps} steps, cfg {work.cfg:g}: {c.plan.describe()}")
        head.append(
            f"  predicted peak {c.peak_bytes / GIB:.1f} GiB ("
            + ", ".join(f"{k} {v / GIB:.1f}" for k, v in c.stage_bytes.items())
            + f"); {c.step_seconds:.1f} s/step, {c.seconds:.0f} s image to MP4; host RAM ~{c.host_bytes / GIB:.0f} GiB"
        )
        head.append(
            f"  kept free while sampling: {c.holes_bytes / GIB:.1f} GiB for the allocator's fragmentation (measured under caps)"
        )
        head += [f"  note: {n}" for n in c.notes]
        if ctx.gpus > 1:
            head.append(_speedup_line(ctx, work, c))
    else:
        refused = d.refusal()
        head.append(f"{work.label()}: refused — {flagged(refused)}")
    if ctx.gpus == 2:
        head.append(_pipeline_line(ctx, work))
    table = Table(title=f"Frame-count guide at {work.width}x{work.height} ({work.steps} steps, cfg {work.cfg:g})",
                  title_justify="left")  # fmt: skip
    for col, just in (("frames", "right"), ("video", "right"), ("plan", "left"), ("peak VRAM", "right"),
                      ("s/step", "right"), ("total", "right")):  # fmt: skip
        table.add_column(col, justify=just)
    for r in guide(ctx, work, frames, mode):
        table.add_row(
            str(r["frames"]), f"{r['seconds_of_video']:.1f} s", r["plan"] if r["fits"] else "[red]does not fit[/]",
            f"{r['peak_gib']:.1f} GiB", f"{r['step_s']:.1f}" if r["fits"] else "–", f"{r['total_s']:.0f} s" if r["fits"] else "–",
        )  # fmt: skip
    return PlanOutput([Text("\n".join(head)), table], refused)


def _speedup_line(ctx: Context, work: Workload, c) -> str:
    one = decide(replace(ctx, gpus=1), work).chosen
    if one is None:
        return f"  one GPU alone: does not fit; {ctx.gpus} GPUs: {c.seconds:.0f} s"
    return (f"  {ctx.gpus} GPUs (figures per GPU): {c.seconds:.0f} s image to MP4 vs {one.seconds:.0f} s on one "
            f"({one.plan.short()}): {one.seconds / c.seconds:.2f}x; DiT {one.step_seconds / c.step_seconds:.2f}x")  # fmt: skip


def _pipeline_line(ctx: Context, work: Workload) -> str:
    p = expert_pipeline(ctx, work)
    if not p.fits:
        return (f"Expert pipeline (--pipeline experts, 2 GPUs): does not fit (GPU A {p.peak_bytes['a'] / GIB:.1f} GiB, "
                f"GPU B {p.peak_bytes['b'] / GIB:.1f} GiB)")  # fmt: skip
    single = (f"{p.single_videos_per_hour:.0f} videos/h on one GPU ({p.single.plan.short()}), "
              f"{2 * p.single_videos_per_hour:.0f} on two independent ones") if p.single else "one GPU: does not fit"  # fmt: skip
    return (f"Expert pipeline (--pipeline experts, 2 GPUs): GPU A {p.peak_bytes['a'] / GIB:.1f} GiB (text encoder "
            f"{p.text_encoder}), GPU B {p.peak_bytes['b'] / GIB:.1f} GiB; {p.seconds['a']:.0f} s / {p.seconds['b']:.0f} s "
            f"per job -> {p.videos_per_hour:.0f} videos/h; {single}")  # fmt: skip


def plan_command(size: str, frames: int, gpu: str | None, vram: str | None, reserve: float, preset: str, mode: str,
                 precision: str, compile: str, models, ram: str | None, profile: str = "auto",
                 cmd=None, gpus: int = 1, interconnect: str | None = None) -> PlanOutput:  # fmt: skip
    """`wanrender plan`: parse the flags, build the context, return what to print."""
    from wanrender.request import PRESETS, validate
    from wanrender.runtime import gpus as gpu_specs
    from wanrender.runtime.planner import check_parallel_memory

    if gpus < 1:
        raise WanrenderError(f"--gpus {gpus} is invalid — use 1 or more")
    multigpu.check_heads(gpus, multigpu.WAN_HEADS)
    check_parallel_memory(mode, gpus)
    if interconnect is not None:
        multigpu.check_interconnect(interconnect)
    width, height = parse_size(size)
    reserve = check_reserve(reserve)
    if preset not in PRESETS:
        raise WanrenderError(f"unknown preset {preset!r} — choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    validate(_probe_request(frames, width, height, p))  # the same limits and messages as generate
    if gpu:
        spec = gpu_specs.named(gpu)
    elif vram is None:
        spec = gpu_specs.probe("cuda")
    else:
        spec = replace(gpu_specs.named("rtx4090"), name="a GPU")  # only the memory is given: 4090-class speed
    if vram is not None:
        spec = spec.with_vram(parse_gib(vram, "vram"))
    check_reserve(reserve, card_gib=spec.total_gib)
    # The knobs generate would use on this GPU: the same profile rule, so the two agree.
    choice = choose_profile(profile, spec.name, frames, width, height, explicit_knobs(cmd))
    knobs = choice.chosen if choice else {}
    precision, compile = knobs.get("precision", precision), knobs.get("compile", compile)
    line = "--profile off: generate's defaults (or your flags)" if profile_spec(profile) == "off" else None
    if choice is not None:
        line = choice.line() + ", as generate uses it"
        if knobs.get("attention", "").startswith("sage"):
            line += " (times use the exact-attention rate)"
        if "compile" in knobs and knobs["compile"] != "off":
            from wanrender.runtime.plan import COMPILE_SAVES_PER_FORWARD, compile_pays

            forwards = p.sampling.steps * (1 if p.sampling.cfg == 1.0 else 2)
            saves = f"~{forwards * COMPILE_SAVES_PER_FORWARD:.0f} s"
            # generate's whole-job rule (runner._compile_for_job): the plan says it too
            if not compile_pays(forwards, cached=True):
                line += (
                    f"; a one-video generate runs eager (compiling costs more than the {saves} it saves on one video)"
                )
            elif not compile_pays(forwards, cached=False):
                line += (
                    f"; a one-video generate runs eager until a render has compiled this shape in its compile "
                    f"cache (compiling first costs more than the {saves} it saves on one video)"
                )
    prec = resolve_precision(precision, spec, compile)
    if models is not None:
        from wanrender.generate import resolve_files

        weights = Weights.from_files(resolve_files(Path(models)), prec)
    else:
        weights = Weights.standard(lora=p.lora_strength > 0)
    host = parse_gib(ram, "ram") if ram else gpu_specs.host_ram_gib()[0]
    ctx = Context(
        spec, weights, prec, compile, reserve, host, gpus, interconnect or multigpu.default_interconnect(spec.name)
    )
    return plan_report(ctx, Workload(frames, width, height, p.sampling), mode, profile=line)


def _probe_request(frames: int, width: int, height: int, preset):
    from wanrender.spec import RenderRequest, RenderSpec

    return RenderRequest(
        RenderSpec(Path("plan.png"), "plan", frames=frames, width=width, height=height), preset.sampling
    )
