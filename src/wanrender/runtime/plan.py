"""How this machine will run a render: precision, attention backend, compile policy.

``make_plan`` resolves the user's knobs (``auto`` included) against the device and
says why; ``apply_plan`` configures loaded experts accordingly. Both experts get
the same settings so a compiled block serves both without recompiling.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from wanrender.errors import WanrenderError
from wanrender.kernels import attention as attn
from wanrender.kernels.linear import enable_fp8, fp8_capable

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp8", "bf16")
COMPILE_MODES = ("off", "default", "max-autotune")
# Layers that stay on the dequantised bf16 path under fp8: small GEMMs (the text
# context has 512 rows; embeddings and the head run once per step) or layers whose
# output defines the result directly (the head).
FP8_EXCLUDE = ("text_embedding", "time_embedding", "time_projection", "head.", "cross_attn.k", "cross_attn.v")


@dataclass(frozen=True)
class RenderPlan:
    device: str
    precision: str
    attention: str
    compile: str
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def auto_precision(fp8_capable: bool, compile: str) -> str:
    """What ``--precision auto`` means (the planner uses the same rule).

    Measured (docs/benchmarks.md): fp8 linears pay off with the compiled block
    (0.97x the peer vs 1.13x for bf16 eager); eager fp8 is unmeasured, so auto keeps
    bf16 there.
    """
    return "fp8" if fp8_capable and compile != "off" else "bf16"


def make_plan(
    device: str | torch.device,
    precision: str = "auto",
    attention: str = "auto",
    compile: str = "off",
    head_dim: int = 128,
) -> tuple[RenderPlan, attn.Choice]:
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise WanrenderError(f"--precision {precision!r} is invalid — choose one of {', '.join(PRECISIONS)}")
    if compile not in COMPILE_MODES:
        raise WanrenderError(f"--compile {compile!r} is invalid — choose one of {', '.join(COMPILE_MODES)}")
    notes = []
    why_not_fp8 = fp8_capable(dev)
    if precision == "auto":
        precision = auto_precision(not why_not_fp8, compile)
        if why_not_fp8:
            notes.append("precision bf16: " + "; ".join(why_not_fp8))
        elif precision == "bf16":
            notes.append("precision bf16: fp8 is chosen automatically with --compile on")
    elif precision == "fp8" and why_not_fp8:
        raise WanrenderError(f"--precision fp8 cannot run here: {'; '.join(why_not_fp8)} — use --precision bf16")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    choice = attn.select(attention, attn.Target.of(dev, dtype, head_dim), eight_bit=precision == "fp8")
    notes.append(choice.describe())
    return RenderPlan(str(dev), precision, choice.backend.name, compile, tuple(notes)), choice


def compile_cache_dir() -> str:
    from wanrender.paths import home

    return str(home() / "inductor-cache")


def apply_plan(experts: list[nn.Module], plan: RenderPlan, choice: attn.Choice) -> dict[str, float]:
    """Configure the loaded experts; returns timings (fp8 conversion, compile set-up)."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    for m in experts:
        m.attention = choice.fn
        if plan.precision == "fp8":
            enable_fp8(m, exclude=FP8_EXCLUDE)
    t["fp8_setup"] = time.perf_counter() - t0
    if plan.compile != "off":
        # Keep Inductor's cache between runs (the first compile of a shape is the slow one).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache_dir())
        for m in experts:
            compile_blocks(m, plan.compile)
    log.info("plan: %s", plan)
    return t


RECOMPILE_LIMIT = 64


def compile_blocks(model: nn.Module, mode: str) -> None:
    """Regional compilation: each repeated block is compiled from one shared code
    object, so 40 blocks x 2 experts cost one compile per input shape, and a LoRA
    strength or expert switch (new weight values, same structure) recompiles nothing.
    ``mode`` "off" puts compiled blocks back to eager."""
    if mode == "off":
        for block in model.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set
        return
    import torch._dynamo

    # The 40 blocks share one code object, so every (shape, attention, precision) a
    # process renders adds an entry to one cache; at Dynamo's default limit (8) a
    # worker rendering many sizes would silently fall back to eager blocks.
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    opts = {"mode": None if mode == "default" else mode, "dynamic": False}
    for block in model.blocks:
        block.compile(**opts)
