"""How this machine will run a render: precision, attention backend, compile policy.

``make_plan`` resolves the user's knobs (``auto`` included) against the device and
says why. The engine applies the plan (``apply_precision``, ``compile_blocks``) and
records it, so it can undo or change it between renders. Both experts get the same
settings so a compiled block serves both without recompiling.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

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


# What compiling costs and saves, measured on an H200 at 81x832x1216 through
# `generate` (fp8, sage8; docs/benchmarks.md, 2026-12-02, sixth session): a process
# that compiles on an empty cache pays ~35 s (11 s more in the load's warm-up, 24 s
# more in the first step), one that finds Inductor's cache warm ~11.4 s (9.3 + 2.1).
# Each compiled forward is 0.7 s faster than the eager one with the fused kernels
# (10.05 against 10.75 s). A 4-step video has 4 forwards: compiling does not pay even
# with a warm cache (a later process took 72.9 s compiled, 64.7 s eager); a 40-step
# video with CFG (80 forwards) pays even a cold compile.
COMPILE_COLD_S, COMPILE_WARM_S, COMPILE_SAVES_PER_FORWARD = 35.0, 11.4, 0.7


def compile_key(device: str | torch.device, tokens: int, plan: RenderPlan) -> str:
    """What makes a compiled block reusable from the cache: torch, the GPU, the shape
    and the knobs the block's graph depends on."""
    dev = torch.device(device)
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    return (
        f"torch {torch.__version__}|{dev.type} {cap}|tokens {tokens}|{plan.precision}|{plan.attention}|{plan.compile}"
    )


def _index_path() -> Path:
    import os

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or compile_cache_dir()) / "wanrender-compiled.json"


def compiled_before(key: str) -> bool:
    """Has a render in this cache folder compiled this key (so Inductor's cache is warm)?"""
    try:
        return key in json.loads(_index_path().read_text())
    except (OSError, ValueError, TypeError):
        return False


def remember_compiled(key: str) -> None:
    """Record a key whose compile finished; a cache that cannot be written only costs time."""
    from wanrender.media.atomic import atomic_write_text

    path = _index_path()
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if key in known:
        return
    known[key] = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=1))
    except OSError:
        pass


def compile_pays(forwards: int, cached: bool) -> bool:
    """Whole-job cost: does compiling save more than it costs for ``forwards`` DiT forwards?"""
    return forwards * COMPILE_SAVES_PER_FORWARD > (COMPILE_WARM_S if cached else COMPILE_COLD_S)


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
