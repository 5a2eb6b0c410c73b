"""The VRAM planner: predict peak memory and time of each candidate plan, pick the
fastest that fits under the reserve, or refuse before anything is loaded.

Candidates (``MemoryPlan``):

- experts ``resident`` (both on the GPU), ``swap`` (one at a time; the next one is
  installed at the switch, prefetched during the last high step when both fit) or
  ``stream`` (N blocks of the active expert resident, the rest streamed block by
  block from host memory through two pinned staging buffers, prefetched one block
  ahead — runtime/streaming.py);
- text encoder ``resident``, ``release`` (moved in for the encode, dropped after)
  or ``cpu``;
- VAE decode whole-frame or tiled (512 px tiles);
- the DiT's token-wise work in 1, 4 or 16 sequence chunks (attention itself is not
  chunked in K/V, so the result is the same).

Several GPUs (``Context.gpus``, sequence parallelism): per GPU the weights are
replicated and the DiT's activations and time divide by N, plus the all-to-all
(runtime/multigpu.py); only resident, unchunked plans run that way. The two-GPU expert
pipeline's throughput is ``expert_pipeline``.

Memory per stage comes from runtime/memory.py, time from runtime/timing.py. A plan
fits when every stage's allocated peak, plus allocator slack, is within the budget:
free memory now (live GPU) or total minus the CUDA context (named GPU), minus
the reserve (``RuntimeKnobs.reserve_vram``).

This module only predicts and decides: it imports no request or generation code,
and its errors name spec fields, which the CLI maps to its flags (cli_errors.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from wanrender.errors import WanrenderError
from wanrender.runtime import memory as mem
from wanrender.runtime import multigpu, timing
from wanrender.runtime.gpus import GIB, GPUSpec
from wanrender.runtime.memory import Weights, Workload
from wanrender.spec import SpecError, Stage, check_reserve

MODES = ("auto", "resident", "swap", "stream")
EXPERTS = ("resident", "swap", "stream")
TEXT_ENCODER = ("resident", "release", "cpu")
CHUNKS = (1, 4, 16)
DEFAULT_RESERVE_GIB = 0.5
HOST_BASE_GIB = 3.0  # estimate: Python, torch, CUDA libraries, frames in flight
STAGING_BUFFERS = 2
TIE = 0.02


@dataclass(frozen=True)
class MemoryPlan:
    experts: str = "resident"
    resident_blocks: int | None = None  # stream: blocks kept on the GPU (None: all)
    text_encoder: str = "resident"
    tiled_decode: bool = False
    chunks: int = 1
    prefetch: bool = False  # swap: install the low expert during the last high step

    def describe(self) -> str:
        parts = {"resident": ["both experts resident"], "swap": ["one expert at a time"],
                 "stream": [f"stream: {self.resident_blocks} of the blocks resident"]}[self.experts]  # fmt: skip
        if self.prefetch:
            parts.append("prefetch")
        if self.text_encoder != "resident":
            parts.append(f"text encoder {'released' if self.text_encoder == 'release' else 'on CPU'}")
        if self.chunks > 1:
            parts.append(f"{self.chunks} chunks")
        if self.tiled_decode:
            parts.append("tiled decode")
        return ", ".join(parts)

    def short(self) -> str:
        core = {"resident": "resident", "swap": "swap", "stream": f"stream {self.resident_blocks}"}[self.experts]
        extras = [e for e, on in (("pf", self.prefetch), ("te-" + self.text_encoder, self.text_encoder != "resident"),
                                  (f"x{self.chunks}", self.chunks > 1), ("tiled", self.tiled_decode)) if on]  # fmt: skip
        return " ".join([core, *extras])

    def complexity(self, blocks: int = 40) -> tuple:
        """Fewer moving parts first: the tie-break between plans of about the same speed."""
        streamed = blocks - (self.resident_blocks or 0) if self.experts == "stream" else 0
        return (EXPERTS.index(self.experts), streamed, TEXT_ENCODER.index(self.text_encoder), self.chunks,
                self.tiled_decode, self.prefetch)  # fmt: skip

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    plan: MemoryPlan
    stage_bytes: dict[str, int]  # allocated peak per stage
    stage_seconds: dict[str, float]
    step_seconds: float
    host_bytes: int
    fits: bool
    notes: tuple[str, ...] = ()
    holes_bytes: int = 0  # allocator holes during sampling (memory.allocator_holes), not in stage_bytes

    @property
    def peak_bytes(self) -> int:
        return max(self.stage_bytes.values())

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())

    def to_json(self) -> dict:
        return {
            "plan": self.plan.to_json(), "describe": self.plan.describe(),
            "predicted_peak_gib": round(self.peak_bytes / GIB, 2),
            "predicted_stage_gib": {k: round(v / GIB, 2) for k, v in self.stage_bytes.items()},
            "predicted_seconds": round(self.seconds, 1), "predicted_step_seconds": round(self.step_seconds, 2),
            "predicted_stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
            "predicted_host_gib": round(self.host_bytes / GIB, 1), "notes": list(self.notes),
            "predicted_holes_gib": round(self.holes_bytes / GIB, 2),
        }  # fmt: skip


@dataclass(frozen=True)
class Context:
    """Everything a prediction depends on besides the plan."""

    gpu: GPUSpec
    weights: Weights
    precision: str = "fp8"  # resolved: fp8 | bf16
    compile: str = "off"
    reserve_gib: float = DEFAULT_RESERVE_GIB
    host_ram_gib: float | None = None
    gpus: int = 1  # GPUs of this kind sharing each video (sequence parallel); budgets are per GPU
    interconnect: str = "nvlink"  # between them (multigpu.INTERCONNECT_GBS)

    @property
    def path(self) -> str:
        return mem.compute_path(self.precision if self.gpu.fp8_matmul else "bf16", self.compile)

    @property
    def budget_bytes(self) -> int:
        avail = self.gpu.free_gib if self.gpu.free_gib is not None else self.gpu.total_gib - mem.CUDA_CONTEXT_GIB
        return int((avail - self.reserve_gib) * GIB)


def predict(plan: MemoryPlan, ctx: Context, work: Workload) -> Prediction:
    w, gpu = ctx.weights, ctx.gpu
    te_gpu = w.text_encoder if plan.text_encoder == "resident" else 0
    te_stage = w.text_encoder if plan.text_encoder != "cpu" else 0
    lora = w.lora if plan.experts != "resident" else 0  # LoRAs stay unmerged when weights move
    g = ctx.gpus
    act = mem.dit_activation_bytes(work, ctx.path, plan.chunks)
    if g > 1:  # each GPU holds its shard's tokens, and the all-to-all's copies of them
        act = act * multigpu.shard_tokens(work, g) // work.tokens + multigpu.exchange_buffer_bytes(work, g)
    act += mem.misc_bytes(work)
    if plan.experts == "resident":
        dit_weights, base = 0, 2 * w.expert + w.vae + te_gpu
    else:
        base = w.vae + te_gpu
        if plan.experts == "swap":
            dit_weights = (2 if plan.prefetch else 1) * (w.expert + lora)
        else:
            dit_weights = w.expert_top + lora + (plan.resident_blocks or 0) * w.block + STAGING_BUFFERS * w.block
    stages = {
        Stage.TEXT_ENCODE.value: base - te_gpu + te_stage + (mem.TE_WORK_BYTES if te_stage else 0),
        Stage.VAE_ENCODE.value: base + mem.vae_encode_bytes(work),
        Stage.SAMPLING.value: base + dit_weights + act,
        Stage.VAE_DECODE.value: base + mem.vae_decode_bytes(work, plan.tiled_decode),
    }
    # --- host memory: weights not on the GPU live in the page cache (mmap), plus pinned staging
    host = HOST_BASE_GIB * GIB + (2 * w.expert if plan.experts != "resident" else 0)
    host += w.text_encoder if plan.text_encoder != "resident" else 0
    host += STAGING_BUFFERS * w.block if plan.experts == "stream" else 0
    notes = []
    link = min(gpu.h2d_gbs, timing.HOST_COPY_GBS)
    install_gbs = timing.PAGEABLE_GBS
    if ctx.host_ram_gib is not None and plan.experts != "resident" and host > ctx.host_ram_gib * GIB:
        link = install_gbs = timing.DISK_GBS
        notes.append(
            f"host RAM {ctx.host_ram_gib:.0f} GiB < {host / GIB:.0f} GiB needed: weights are re-read from disk"
        )
    # --- time
    parts = timing.dit_step_seconds(gpu, work, ctx.path, plan.chunks, lora_unmerged=plan.experts != "resident")
    step = parts["total"]
    if g > 1:
        a2a = multigpu.all_to_all_seconds(work, g, ctx.interconnect)
        step = step / g + a2a
        share = multigpu.decode_fraction(work, g) if not plan.tiled_decode else 1.0
        notes.append(
            f"{g} GPUs, sequence parallel: DiT {parts['total']:.2f} s/step on one GPU -> {parts['total'] / g:.2f} s "
            f"+ {a2a:.2f} s all-to-all ({multigpu.INTERCONNECT_GBS[ctx.interconnect]:g} GB/s {ctx.interconnect}, "
            "assumed); "
            + (f"VAE decode split by rows ({share:.2f}x of one GPU's, modelled)" if share < 1.0
               else "VAE decode on one GPU (tiled, or too few rows to split)")
            + "; text encode not split"
        )  # fmt: skip
    if plan.experts == "stream":
        n = plan.resident_blocks or 0
        step += timing.stream_overhead(parts["total"], w.block, w.num_blocks - n, n, link)
    high_steps, low_steps = work.switch, work.steps - work.switch
    seconds = {
        Stage.TEXT_ENCODE.value: timing.text_encode_seconds(gpu, plan.text_encoder, w.text_encoder),
        Stage.VAE_ENCODE.value: timing.vae_seconds(gpu, work, decode=False),
        Stage.PASS1_HIGH.value: high_steps * step,
        Stage.PASS2_LOW.value: low_steps * step,
        Stage.VAE_DECODE.value: timing.vae_seconds(gpu, work, decode=True, tiled=plan.tiled_decode),
        Stage.VIDEO_ENCODE.value: timing.video_encode_seconds(work),
    }
    if g > 1 and not plan.tiled_decode:  # parallel/decode.py: a band of rows per GPU
        seconds[Stage.VAE_DECODE.value] = seconds[Stage.VAE_DECODE.value] * multigpu.decode_fraction(
            work, g
        ) + multigpu.decode_gather_seconds(work, g, ctx.interconnect)
    if plan.experts != "resident":
        installed = (
            w.expert_top + lora + (w.num_blocks if plan.experts == "swap" else plan.resident_blocks or 0) * w.block
        )
        install = installed / (install_gbs * 1e9)
        # Each render installs the high expert before pass 1 and the low one at the switch;
        # a prefetched install hides behind the last high step.
        seconds[Stage.EXPERT_INSTALL.value] = install + (max(0.0, install - step) if plan.prefetch else install)
    holes = mem.allocator_holes(work, plan.chunks)
    fits = mem.device_bytes(need_bytes(stages, holes)) - int(mem.CUDA_CONTEXT_GIB * GIB) <= ctx.budget_bytes
    return Prediction(plan, stages, seconds, step, int(host), fits, tuple(notes), holes)


def need_bytes(stages: dict[str, int], holes: int) -> int:
    """The allocated peak a plan must have room for: sampling also leaves allocator holes."""
    return max(v + (holes if k == Stage.SAMPLING else 0) for k, v in stages.items())


def _stream_blocks(ctx: Context, work: Workload, plan: MemoryPlan) -> int:
    """The most blocks that can stay resident under the budget (-1: not even zero)."""
    probe = predict(replace(plan, resident_blocks=0), ctx, work)
    room = ctx.budget_bytes / (1 + mem.FRAGMENTATION) - probe.stage_bytes[Stage.SAMPLING] - probe.holes_bytes
    if any(v * (1 + mem.FRAGMENTATION) > ctx.budget_bytes for k, v in probe.stage_bytes.items() if k != Stage.SAMPLING):
        return -1
    return min(ctx.weights.num_blocks - 1, int(room // ctx.weights.block)) if room >= 0 else -1


def candidates(ctx: Context, work: Workload, mode: str = "auto") -> list[Prediction]:
    """Every candidate plan's prediction, fastest fitting first."""
    if mode not in MODES:
        raise SpecError("memory", f"memory {mode!r} is invalid — choose one of {', '.join(MODES)}")
    out: list[Prediction] = []
    experts = EXPERTS if mode == "auto" else (mode,)
    chunk_counts = CHUNKS
    if ctx.gpus > 1:
        check_parallel_memory(mode, ctx.gpus)
        experts, chunk_counts = ("resident",), (1,)
    for ex, te, tiled, chunks in itertools.product(experts, TEXT_ENCODER, (False, True), chunk_counts):
        plan = MemoryPlan(ex, None, te, tiled, chunks)
        if ex == "stream":
            n = _stream_blocks(ctx, work, plan)
            plan = replace(plan, resident_blocks=max(n, 0))
        variants = [plan, replace(plan, prefetch=True)] if ex == "swap" else [plan]
        out += [predict(p, ctx, work) for p in variants]
    # Predictions within TIE (2%) of each other are ties, decided by fewer moving parts:
    # the model cannot tell them apart, and e.g. resident blocks beat streamed ones on
    # robustness (a streamed copy depends on the host keeping up).
    out.sort(key=lambda p: (not p.fits, _bucket(p.seconds), p.plan.complexity(ctx.weights.num_blocks)))
    return out


def check_parallel_memory(mode: str, gpus: int) -> None:
    """Sequence parallelism runs both experts resident on every GPU, unchunked."""
    if gpus > 1 and mode not in ("auto", "resident"):
        raise SpecError("memory", f"memory {mode!r} cannot be used with {gpus} GPUs: every GPU keeps both experts "
                                  "resident — use memory auto or resident")  # fmt: skip


def _bucket(seconds: float) -> int:
    return int(math.log(max(seconds, 1e-3)) / math.log(1 + TIE))


class PlanRefused(WanrenderError):
    """No plan fits: the numbers, and the nearest requests that would fit.

    The message names spec fields (``frames 49 at 832x1216``, ``size 640x928``,
    ``memory auto``); a front end passes its own names to ``describe``.
    """

    def __init__(self, what: str, gpu: str, mode: str, leanest: MemoryPlan, need_gib: float, usable_gib: float,
                 reserve_gib: float, frames: int, size: tuple[int, int], max_frames: int | None,
                 max_size: tuple[int, int] | None, auto_fits: bool) -> None:  # fmt: skip
        self.what, self.gpu, self.mode, self.leanest = what, gpu, mode, leanest
        self.need_gib, self.usable_gib, self.reserve_gib = need_gib, usable_gib, reserve_gib
        self.frames, self.size = frames, size
        self.max_frames = max_frames  # the most frames that fit at this size (None: not even 1)
        self.max_size = max_size  # the largest same-aspect size that fits at this frame count
        self.auto_fits = auto_fits  # an explicit memory mode refused what ``auto`` would fit
        super().__init__(self.describe())

    def fixes(self) -> list[tuple[str, str]]:
        """(field, what to set it to), most direct first."""
        out = [("memory", "auto")] if self.auto_fits else []
        if self.max_frames:
            out.append(("frames", f"{self.max_frames} at {self.size[0]}x{self.size[1]}"))
        if self.max_size:
            out.append(("size", f"{self.max_size[0]}x{self.max_size[1]} at {self.frames} frames"))
        return out

    def describe(self, name: Callable[[str], str] = str) -> str:
        """The one-line message, with ``name`` turning a field into what the reader types."""
        fixes = " or ".join(f"{name(f)} {v}" for f, v in self.fixes()) or "a GPU with more memory"
        return (f"{self.what} does not fit {self.gpu}: the leanest {self.mode} plan ({self.leanest.short()}) needs "
                f"{self.need_gib:.2f} GiB, {self.usable_gib:.2f} GiB usable after the {self.reserve_gib:g} GiB "
                f"reserve — use {fixes}")  # fmt: skip


@dataclass(frozen=True)
class Decision:
    ctx: Context
    work: Workload
    mode: str
    ranked: tuple[Prediction, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def chosen(self) -> Prediction | None:
        return self.ranked[0] if self.ranked and self.ranked[0].fits else None

    def leanest(self) -> Prediction:
        return min(self.ranked, key=lambda p: need_bytes(p.stage_bytes, p.holes_bytes))

    def refusal(self) -> PlanRefused:
        lean = self.leanest()
        frames, size = largest_fit(self.ctx, self.work, self.mode)
        auto_fits = self.mode != "auto" and largest_fit(self.ctx, self.work, "auto")[0] == self.work.frames
        need = need_bytes(lean.stage_bytes, lean.holes_bytes) * (1 + mem.FRAGMENTATION) / GIB
        return PlanRefused(self.work.label(), self.ctx.gpu.label(), self.mode, lean.plan, need,
                           self.ctx.budget_bytes / GIB, self.ctx.reserve_gib, self.work.frames,
                           (self.work.width, self.work.height), frames, size, auto_fits)  # fmt: skip

    def to_json(self) -> dict:
        c = self.chosen
        return {
            "mode": self.mode, "gpu": self.ctx.gpu.label(), "precision": self.ctx.precision, "path": self.ctx.path,
            "reserve_gib": self.ctx.reserve_gib, "budget_gib": round(self.ctx.budget_bytes / GIB, 2),
            "weights_source": self.ctx.weights.source, **(c.to_json() if c else {}), "decision_notes": list(self.notes),
        }  # fmt: skip


def decide(ctx: Context, work: Workload, mode: str = "auto") -> Decision:
    return Decision(ctx, work, mode, tuple(candidates(ctx, work, mode)))


def largest_fit(ctx: Context, work: Workload, mode: str = "auto") -> tuple[int | None, tuple[int, int] | None]:
    """(most frames at this size, largest same-aspect size at this frame count) that fit."""

    def fits(w: Workload) -> bool:
        return any(p.fits for p in candidates(ctx, w, mode))

    frames = next((f for f in range(work.frames, 0, -4) if fits(replace(work, frames=f))), None)
    size = None
    for k in range(100, 0, -1):  # shrink both sides together, keeping the aspect ratio
        wd, ht = (max(64, 16 * round(v * k / 100 / 16)) for v in (work.width, work.height))
        if fits(replace(work, width=wd, height=ht)):
            size = (wd, ht)
            break
    return frames, size


def step_down(decision: Decision, failed: MemoryPlan, gpu: GPUSpec | None = None) -> Prediction | None:
    """After an out-of-memory error: the fastest plan that fits the memory free now and
    needs clearly less than the one that failed (at least 10% less at its peak)."""
    ctx = replace(decision.ctx, gpu=gpu) if gpu is not None else decision.ctx
    failed_peak = predict(failed, decision.ctx, decision.work).peak_bytes
    for p in candidates(ctx, decision.work, "auto"):
        if p.fits and p.peak_bytes <= 0.9 * failed_peak:
            return p
    return None


def auto_precision(fp8_capable: bool, compile: str) -> str:
    """What precision ``auto`` means, for the planner and for runtime/plan.py alike.

    Measured (docs/benchmarks.md): fp8 linears pay off with the compiled block
    (0.97x the peer vs 1.13x for bf16 eager); eager fp8 is unmeasured, so auto keeps
    bf16 there.
    """
    return "fp8" if fp8_capable and compile != "off" else "bf16"


def resolve_precision(precision: str, gpu: GPUSpec, compile: str = "off") -> str:
    return auto_precision(gpu.fp8_matmul, compile) if precision == "auto" else precision


def plan_render(
    req, files, device, gpu: GPUSpec | None = None, weights: Weights | None = None, gpus: int = 1
) -> Decision | MemoryPlan:
    """The memory plan for a render (a ``spec.RenderRequest``: ``.render``, ``.sampling``,
    ``.knobs``), decided before any model is loaded.

    A CUDA device is probed (or ``gpu`` used); a refusal raises here. On the CPU there
    is no VRAM to plan: ``auto`` keeps everything resident and an explicit mode runs
    its code path with the CPU standing in for the device (tests, the demo).
    ``weights`` replaces the sizes read from ``files`` (models built in memory).
    ``gpus``: that many GPUs like this one share the render (sequence parallel).
    """
    import torch

    from wanrender.runtime import gpus as gpu_specs

    knobs = req.knobs
    dev = torch.device(device)
    check_parallel_memory(knobs.memory, gpus)
    if gpu is None and dev.type != "cuda":
        return cpu_plan(knobs.memory)
    spec = gpu or gpu_specs.probe(dev)
    precision = resolve_precision(knobs.precision, spec, knobs.compile)
    reserve = check_reserve(knobs.reserve_vram if knobs.reserve_vram is not None else DEFAULT_RESERVE_GIB,
                            card_gib=spec.total_gib)  # fmt: skip
    ctx = Context(spec, weights or Weights.from_files(files, precision), precision, knobs.compile, reserve,
                  gpu_specs.host_ram_gib()[0], gpus, multigpu.default_interconnect(spec.name))  # fmt: skip
    decision = decide(ctx, Workload.of(req), knobs.memory)
    if decision.chosen is None:
        raise decision.refusal()
    return decision


@dataclass(frozen=True)
class PipelinePrediction:
    """The two-GPU expert pipeline on a stream of equal jobs: GPU A runs text encode,
    VAE encode and pass 1 (high-noise expert); GPU B pass 2 (low-noise expert), VAE
    decode and the MP4. A job leaves every ``period`` seconds once the pipe is full."""

    peak_bytes: dict[str, int]  # "a", "b": the allocated peak of each GPU
    seconds: dict[str, float]  # "a", "b": one job's work on each GPU
    single: Prediction | None  # one GPU alone (its fastest fitting plan), for comparison
    fits: bool
    text_encoder: str = "resident"  # on GPU A: resident, or released after each encode

    @property
    def period(self) -> float:
        return max(self.seconds.values())

    @property
    def videos_per_hour(self) -> float:
        return 3600.0 / self.period

    @property
    def single_videos_per_hour(self) -> float | None:
        return 3600.0 / self.single.seconds if self.single is not None else None


def expert_pipeline(ctx: Context, work: Workload) -> PipelinePrediction:
    """Memory and throughput of the expert pipeline on two GPUs like ``ctx.gpu``. GPU A
    keeps the text encoder resident when that fits, else releases it after each encode."""
    one = replace(ctx, gpus=1)
    w = ctx.weights
    both = predict(MemoryPlan(), one, work)  # both experts, text encoder and VAE resident
    st, sec = both.stage_bytes, both.stage_seconds
    room = one.budget_bytes + int(mem.CUDA_CONTEXT_GIB * GIB)
    b = {k: st[k] - w.expert - w.text_encoder for k in (Stage.SAMPLING, Stage.VAE_DECODE)}
    seconds_b = sec[Stage.PASS2_LOW] + sec[Stage.VAE_DECODE] + sec[Stage.VIDEO_ENCODE]
    for te in ("resident", "release"):
        kept = w.text_encoder if te == "resident" else 0
        a = {Stage.TEXT_ENCODE: st[Stage.TEXT_ENCODE] - w.expert}
        a.update({k: st[k] - w.expert - w.text_encoder + kept for k in (Stage.VAE_ENCODE, Stage.SAMPLING)})
        peak = {"a": need_bytes(a, both.holes_bytes), "b": need_bytes(b, both.holes_bytes)}
        fits = all(mem.device_bytes(v) <= room for v in peak.values())
        if fits:
            break
    text = timing.text_encode_seconds(ctx.gpu, te, w.text_encoder)
    seconds = {"a": text + sec[Stage.VAE_ENCODE] + sec[Stage.PASS1_HIGH], "b": seconds_b}
    return PipelinePrediction(peak, seconds, decide(one, work).chosen, fits, te)


def cpu_plan(mode: str) -> MemoryPlan:
    if mode not in MODES:
        raise SpecError("memory", f"memory {mode!r} is invalid — choose one of {', '.join(MODES)}")
    return {
        "auto": MemoryPlan(), "resident": MemoryPlan(), "swap": MemoryPlan("swap", text_encoder="release"),
        "stream": MemoryPlan("stream", resident_blocks=1, text_encoder="release", chunks=4),
    }[mode]  # fmt: skip


# --- the frame-count guide of `wanrender plan` (cli_plan.py prints it) ------------------

GUIDE_FRAMES = (25, 49, 61, 81, 101, 121, 161)


def guide(ctx: Context, work: Workload, frames: tuple[int, ...] = GUIDE_FRAMES, mode: str = "auto") -> list[dict]:
    """One row per frame count at ``work``'s size: the chosen plan, peak, time."""
    rows = []
    for f in frames:
        w = replace(work, frames=f)
        d = decide(ctx, w, mode)
        c = d.chosen
        rows.append({
            "frames": f, "seconds_of_video": (f - 1) / 16, "size": f"{w.width}x{w.height}",
            "plan": c.plan.short() if c else "does not fit", "peak_gib": (c or d.leanest()).peak_bytes / GIB,
            "step_s": c.step_seconds if c else None, "total_s": c.seconds if c else None, "fits": c is not None,
        })  # fmt: skip
    return rows
