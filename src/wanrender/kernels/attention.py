"""Attention backends: a registry whose entries say why they cannot run.

Every backend computes ``attn(q, k, v) -> out`` in the DiT's ``[B, L, H, D]``
layout (no mask, non-causal, scale 1/sqrt(D)). ``reference`` is the plain-PyTorch
twin that the others are tested against. ``select("auto", ...)`` walks a priority
list measured per GPU generation (``PRIORITY``) and reports the winner and the
rejected candidates with their reasons; an explicit choice that cannot run raises
with its reasons.

``cudnn-fp8`` (``attention_cudnn``) is cuDNN's fp8 kernel from NVIDIA's PyPI
frontend; its plain-PyTorch twin is ``cudnn_fp8_math.cudnn_fp8_reference``.

Kernel options (today only ``sage8`` takes any: tiling, formats) travel with the
choice: ``select(..., options=...)`` builds the backend's function bound to them and
records them, frozen, in ``Choice.options`` (for a sidecar or a plan). Nothing at
module level changes what a kernel does.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from wanrender.errors import WanrenderError
from wanrender.spec import SpecError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Kernel options, frozen: (name, value) pairs sorted by name, values JSON scalars.
Options = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Target:
    """What a backend must run on: the device, its compute capability, dtype, head dim."""

    device: str = "cpu"
    capability: tuple[int, int] | None = None
    dtype: torch.dtype = torch.bfloat16
    head_dim: int = 128

    @staticmethod
    def of(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> Target:
        dev = torch.device(device)
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        return Target(dev.type, cap, dtype, head_dim)


def _no_options() -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True)
class Backend:
    """``build(**options)`` makes the attention function; ``option_names()`` names the
    kernel options it takes (none for most backends)."""

    name: str
    description: str
    build: Callable[..., AttentionFn]
    check: Callable[[Target], list[str]]
    option_names: Callable[[], frozenset[str]] = _no_options


@dataclass(frozen=True)
class Choice:
    """The selected backend, its function (bound to ``options``) and why others were skipped."""

    backend: Backend
    fn: AttentionFn
    rejected: dict[str, list[str]] = field(default_factory=dict)
    options: Options = ()

    def describe(self) -> str:
        skipped = "; ".join(f"{n}: {', '.join(r)}" for n, r in self.rejected.items())
        text = f"attention: {self.backend.name}"
        if self.options:
            text += " [" + ", ".join(f"{k}={v}" for k, v in self.options) + "]"
        return text + (f" (skipped {skipped})" if skipped else "")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention in fp32, written out: the twin every backend is tested against."""
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    w = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ vf).transpose(1, 2).to(q.dtype)


def _sdpa(backends: list | None) -> AttentionFn:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if backends is None:
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    return run


def _sdpa_with(name: str) -> Callable[[], AttentionFn]:
    def build() -> AttentionFn:
        from torch.nn.attention import SDPBackend

        return _sdpa([getattr(SDPBackend, name)])

    return build


def _needs_cuda(t: Target, min_cc: tuple[int, int] = (8, 0)) -> list[str]:
    if t.device != "cuda":
        return ["needs a CUDA GPU"]
    if t.capability is not None and t.capability < min_cc:
        return [f"needs compute capability >= {min_cc[0]}.{min_cc[1]} (this GPU: {t.capability[0]}.{t.capability[1]})"]
    return []


def _half(t: Target) -> list[str]:
    return [] if t.dtype in (torch.float16, torch.bfloat16) else [f"needs bf16/fp16 (got {t.dtype})"]


def _package(mod: str, pip: str) -> list[str]:
    return [] if importlib.util.find_spec(mod) is not None else [f"package '{pip}' is not installed"]


def _flash_attn() -> AttentionFn:
    from flash_attn import flash_attn_func  # [B, L, H, D] natively

    return lambda q, k, v: flash_attn_func(q, k, v)


def _sage() -> AttentionFn:
    from sageattention import sageattn

    return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


@functools.cache
def _sage8_op():
    """The Triton kernel as a PyTorch custom op, registered once, on first use: opaque
    to torch.compile (Inductor must not re-generate a hand-written Triton kernel), with
    a shape-only fake. The kernel options are an argument of the op (canonical JSON),
    so one registration serves every variant and a compiled graph keeps its own."""
    from wanrender.kernels import attention_sage8 as sa

    @torch.library.custom_op("wanrender::sage8_attention", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: str) -> torch.Tensor:
        # The fake promises a contiguous result.
        return sa.sage8_attention(q, k, v, **dict(_decode(options))).contiguous()

    @op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: str) -> torch.Tensor:
        return q.new_empty(q.shape)

    return op


@functools.lru_cache(maxsize=64)
def _decode(options: str) -> Options:
    return tuple(sorted(json.loads(options).items()))


def _sage8(**options: Any) -> AttentionFn:
    from wanrender.kernels import attention_sage8 as sa

    op, exact = _sage8_op(), _sdpa(None)
    encoded = json.dumps(options, sort_keys=True)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The kernel is for self-attention (q, k, v of one length). Cross-attention to
        # the 512 text tokens is ~0.5% of the FLOPs: it stays on exact SDPA.
        if not q.shape == k.shape == v.shape:
            return exact(q, k, v)
        if torch.compiler.is_compiling():
            return op(q, k, v, encoded)
        # Eager: the kernel itself. A custom op's first call imports Dynamo and Inductor
        # (4 s on a fresh install, inside the first step of a process that never compiles).
        return sa.sage8_attention(q, k, v, **options).contiguous()

    return run


def _sage8_option_names() -> frozenset[str]:
    from wanrender.kernels.attention_sage8 import kernel_options

    return kernel_options()


def _cudnn_fp8() -> AttentionFn:
    from wanrender.kernels import cudnn_fp8_math as fm
    from wanrender.kernels.attention_cudnn import core, core_op

    op, exact = core_op(), _sdpa(None)
    # The rotation as a host constant (a compiled graph holds it; eager copies 64 KB).
    rotations = {d: fm.hadamard(d) for d in (64, 128)}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Self-attention only, as for sage8: cross-attention stays on exact SDPA.
        if not q.shape == k.shape == v.shape or q.shape[-1] not in rotations:
            return exact(q, k, v)
        # The pre-pass runs here, in plain ops, where torch.compile fuses it; only the
        # kernel and its post-pass are opaque.
        q8, k8, v8, dq, dk, dv, _, v_mean, _ = fm.prepare_parts(q, k, v, rotation=rotations[q.shape[-1]].to(q.device))
        kernel = op if torch.compiler.is_compiling() else core  # eager: no custom op, no Dynamo import (sage8)
        return kernel(q, k, v, q8, k8, v8, dq, dk, dv, v_mean)

    return run


def _cudnn_fp8_check(t: Target) -> list[str]:
    from wanrender.kernels.attention_cudnn import can_run

    return can_run(t.device, t.capability, t.dtype, t.head_dim)


def _sage8_check(t: Target) -> list[str]:
    try:
        from wanrender.kernels.attention_sage8 import can_run
    except ImportError as e:  # pragma: no cover - the module ships with the package
        return [f"kernel module missing ({e})"]
    return can_run(t.device, t.capability, t.dtype, t.head_dim)


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "plain PyTorch, fp32 math (slow; tests)", lambda: reference_attention, lambda t: []),
        Backend("sdpa", "PyTorch SDPA, its own backend choice", lambda: _sdpa(None), lambda t: []),
        Backend("sdpa-cudnn", "PyTorch SDPA, cuDNN backend", _sdpa_with("CUDNN_ATTENTION"),
                lambda t: _needs_cuda(t, (9, 0)) + _half(t)),
        Backend("sdpa-flash", "PyTorch SDPA, FlashAttention-2 backend", _sdpa_with("FLASH_ATTENTION"),
                lambda t: _needs_cuda(t) + _half(t) + ([] if t.head_dim <= 256 else ["head dim > 256"])),
        Backend("flash-attn", "the flash-attn package", _flash_attn,
                lambda t: _needs_cuda(t) + _half(t) + _package("flash_attn", "flash-attn")),
        Backend("sage", "the sageattention package", _sage,
                lambda t: _needs_cuda(t) + _half(t) + _package("sageattention", "sageattention")),
        Backend("sage8", "wanrender's 8-bit Triton kernel (SageAttention recipe)", _sage8, _sage8_check,
                _sage8_option_names),
        Backend("cudnn-fp8", "cuDNN's fp8 attention via nvidia-cudnn-frontend (K/V smoothed, Q/K rotated)",
                _cudnn_fp8, _cudnn_fp8_check),
    )
}  # fmt: skip

# Measured order of preference per GPU generation (docs/benchmarks.md). Unknown
# GPUs fall back to "default". CPU: PyTorch SDPA. "<gen>-8bit" ranks the fp8 path
# (precision fp8, which auto picks with --compile on): on an H200 the whole forward
# with sage8 ran 10.10 s against the peer's 12.81 s in one run (fp8 + cuDNN: 12.45
# s against 12.80), output cosine 0.9953 to the peer, turbo latents 0.99977 to the
# bf16 path. sm89 (RTX 4090) is unmeasured: exact attention there. "cudnn-fp8" is in
# no list yet: it joins "sm90-8bit" (ahead of sage8 only if faster) once a whole DiT
# forward with it has been measured on an H200 (benchmarks/gpu_cudnn_attention.py).
PRIORITY: dict[str, tuple[str, ...]] = {
    "sm90-8bit": ("sage8", "sdpa-cudnn", "sdpa-flash", "sdpa"),
    "sm90": ("sdpa-cudnn", "sdpa-flash", "sdpa"),
    "sm89": ("sdpa-flash", "sdpa"),
    "sm80": ("sdpa-flash", "sdpa"),
    "default": ("sdpa",),
    "cpu": ("sdpa",),
}


def generation(t: Target) -> str:
    if t.device != "cuda" or t.capability is None:
        return "cpu" if t.device == "cpu" else "default"
    key = f"sm{t.capability[0]}{t.capability[1]}"
    return key if key in PRIORITY else "default"


def _unknown(name: str) -> SpecError:
    return SpecError("attention", f"attention {name!r} is unknown — choose auto or one of {', '.join(REGISTRY)}")


def reasons(name: str, target: Target) -> list[str]:
    if name not in REGISTRY:
        raise _unknown(name)
    return REGISTRY[name].check(target)


def freeze_options(name: str, options: Mapping[str, Any] | None) -> Options:
    """``options`` checked against what backend ``name`` takes, as sorted (name, value)
    pairs; values must be JSON scalars (they are recorded, and cross the custom op)."""
    if not options:
        return ()
    if name not in REGISTRY:
        raise _unknown(name)
    known = REGISTRY[name].option_names()
    if not known:
        raise WanrenderError(f"attention backend {name!r} takes no kernel options (got {', '.join(sorted(options))})")
    unknown = sorted(set(options) - known)
    if unknown:
        raise WanrenderError(f"unknown {name} option {unknown[0]!r} — known: {', '.join(sorted(known))}")
    for k, v in options.items():
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise WanrenderError(f"{name} option {k!r} = {v!r} is invalid — use a number, true/false, a string or null")
    return tuple(sorted(options.items()))


def _choose(backend: Backend, options: Options, rejected: dict[str, list[str]] | None = None) -> Choice:
    return Choice(backend, backend.build(**dict(options)), rejected or {}, options)


def select(name: str, target: Target, eight_bit: bool = False, options: Mapping[str, Any] | None = None) -> Choice:
    """The backend to use: an explicit name (must be able to run) or ``auto``
    (with ``eight_bit``, the fp8 path's priority list where one is measured).

    ``options``: kernel options for the chosen backend, bound into ``Choice.fn`` and
    recorded in ``Choice.options``. With an explicit name they must be ones it takes;
    with ``auto`` they go to the winner if it takes kernel options (checked against
    it) and are dropped otherwise, as options of a kernel that does not run."""
    if name != "auto":
        why = reasons(name, target)
        if why:
            raise SpecError("attention", f"attention {name!r} cannot run here: {'; '.join(why)} — use attention auto")
        return _choose(REGISTRY[name], freeze_options(name, options))
    rejected: dict[str, list[str]] = {}
    gen = generation(target)
    order = PRIORITY.get(f"{gen}-8bit", PRIORITY[gen]) if eight_bit else PRIORITY[gen]
    for candidate in order:
        why = REGISTRY[candidate].check(target)
        if not why:
            backend = REGISTRY[candidate]
            return _choose(backend, freeze_options(candidate, options) if backend.option_names() else (), rejected)
        rejected[candidate] = why
    return _choose(REGISTRY["sdpa"], (), rejected)
