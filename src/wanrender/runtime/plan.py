"""How this machine will run a render: precision, attention backend, compile policy.

``make_plan`` resolves the user's knobs (``auto`` included) against the device and
says why. The engine applies the plan (``apply_precision``, ``compile_blocks``) and
records it, so it can undo or change it between renders. Both experts get the same
settings so a compiled block serves both without recompiling.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from wanrender.kernels import attention as attn
from wanrender.kernels.linear import disable_fp8, enable_fp8, fp8_capable
from wanrender.runtime.planner import auto_precision
from wanrender.spec import COMPILE_MODES, FP8_EXCLUDE, PRECISIONS, SpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderPlan:
    device: str
    precision: str
    attention: str
    compile: str
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def make_plan(
    device: str | torch.device,
    precision: str = "auto",
    attention: str = "auto",
    compile: str = "off",
    head_dim: int = 128,
) -> tuple[RenderPlan, attn.Choice]:
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise SpecError("precision", f"precision {precision!r} is invalid — choose one of {', '.join(PRECISIONS)}")
    if compile not in COMPILE_MODES:
        raise SpecError("compile", f"compile {compile!r} is invalid — choose one of {', '.join(COMPILE_MODES)}")
    notes = []
    why_not_fp8 = fp8_capable(dev)
    if precision == "auto":
        precision = auto_precision(not why_not_fp8, compile)
        if why_not_fp8:
            notes.append("precision bf16: " + "; ".join(why_not_fp8))
        elif precision == "bf16":
            notes.append("precision bf16: fp8 is chosen automatically when compiling")
    elif precision == "fp8" and why_not_fp8:
        raise SpecError("precision", f"precision fp8 cannot run here: {'; '.join(why_not_fp8)} — use precision bf16")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    choice = attn.select(attention, attn.Target.of(dev, dtype, head_dim), eight_bit=precision == "fp8")
    notes.append(choice.describe())
    return RenderPlan(str(dev), precision, choice.backend.name, compile, tuple(notes)), choice


def compile_cache_dir() -> str:
    from wanrender.paths import home

    return str(home() / "inductor-cache")


def apply_precision(experts: list[nn.Module], precision: str) -> bool:
    """fp8 kernels on (``fp8``) or off; returns True when weights had to be converted
    (stored wider than fp8): then only a reload brings the originals back."""
    from wanrender.models.common import Linear

    converted = False
    for m in experts:
        if precision == "fp8":
            converted |= any(isinstance(mod, Linear) and mod.weight.element_size() > 1 and not any(p in name for p in FP8_EXCLUDE)
                             for name, mod in m.named_modules())  # fmt: skip
            enable_fp8(m, exclude=FP8_EXCLUDE)
        else:
            disable_fp8(m)
    return converted


RECOMPILE_LIMIT = 64


@contextmanager
def compiled_scope() -> Iterator[None]:
    """Dynamo's recompile limit raised while the engine renders, and only then.

    The 40 blocks share one code object, so every (shape, attention, precision) a
    process renders adds an entry to one cache; at Dynamo's default limit (8) a
    worker rendering many sizes would silently fall back to eager blocks.
    """
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        yield


def compile_blocks(model: nn.Module, mode: str) -> None:
    """Regional compilation: each repeated block is compiled from one shared code
    object, so 40 blocks x 2 experts cost one compile per input shape, and a LoRA
    strength or expert switch (new weight values, same structure) recompiles nothing.
    ``mode`` "off" puts compiled blocks back to eager (nn.Module.compile has no public
    undo: clearing ``_compiled_call_impl`` is what reverses it)."""
    if mode == "off":
        for block in model.blocks:
            block._compiled_call_impl = None
        return
    opts = {"mode": None if mode == "default" else mode, "dynamic": False}
    for block in model.blocks:
        block.compile(**opts)
