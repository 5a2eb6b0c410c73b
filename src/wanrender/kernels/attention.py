"""Attention backends: a registry whose entries say why they cannot run.

Every backend computes ``attn(q, k, v) -> out`` in the DiT's ``[B, L, H, D]``
layout (no mask, non-causal, scale 1/sqrt(D)). ``reference`` is the plain-PyTorch
twin that the others are tested against. ``select("auto", ...)`` walks a priority
list measured per GPU generation (``PRIORITY``) and reports the winner and the
rejected candidates with their reasons; an explicit choice that cannot run raises
with its reasons.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from wanrender.errors import WanrenderError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    build: Callable[[], AttentionFn]
    check: Callable[[Target], list[str]]


@dataclass(frozen=True)
class Choice:
    backend: Backend
    fn: AttentionFn
    rejected: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        skipped = "; ".join(f"{n}: {', '.join(r)}" for n, r in self.rejected.items())
        return f"attention: {self.backend.name}" + (f" (skipped {skipped})" if skipped else "")


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


_SAGE8_OP: list[AttentionFn] = []
# Keyword options of sage8_attention for the registered op ({}: the kernel's measured
# defaults). Benchmarks set it to time a variant inside a whole forward.
SAGE8_OPTIONS: dict = {}


def _sage8() -> AttentionFn:
    """The Triton kernel as a PyTorch custom op: opaque to torch.compile (Inductor
    must not re-generate a hand-written Triton kernel), with a shape-only fake."""
    if not _SAGE8_OP:
        from wanrender.kernels.attention_sage8 import sage8_attention

        @torch.library.custom_op("wanrender::sage8_attention", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return sage8_attention(q, k, v, **SAGE8_OPTIONS).contiguous()  # the fake promises a contiguous result

        @op.register_fake
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return q.new_empty(q.shape)

        _SAGE8_OP.append(op)
    op, exact = _SAGE8_OP[0], _sdpa(None)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The kernel is for self-attention (q, k, v of one length). Cross-attention to
        # the 512 text tokens is ~0.5% of the FLOPs: it stays on exact SDPA.
        return op(q, k, v) if q.shape == k.shape == v.shape else exact(q, k, v)

    return run


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
        Backend("sage8", "wanrender's 8-bit Triton kernel (SageAttention recipe)", _sage8, _sage8_check),
    )
}  # fmt: skip

# Measured order of preference per GPU generation (docs/benchmarks.md). Unknown
# GPUs fall back to "default". CPU: PyTorch SDPA. "<gen>-8bit" ranks the fp8 path
# (precision fp8, which auto picks with --compile on): on an H200 the whole forward
# with sage8 ran 10.10 s against the peer's 12.81 s in one run (fp8 + cuDNN: 12.45
# s against 12.80), output cosine 0.9953 to the peer, turbo latents 0.99977 to the
# bf16 path. sm89 (RTX 4090) is unmeasured: exact attention there.
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


def reasons(name: str, target: Target) -> list[str]:
    if name not in REGISTRY:
        raise WanrenderError(f"unknown attention backend {name!r} — choose auto or one of {', '.join(REGISTRY)}")
    return REGISTRY[name].check(target)


def select(name: str, target: Target, eight_bit: bool = False) -> Choice:
    """The backend to use: an explicit name (must be able to run) or ``auto``
    (with ``eight_bit``, the fp8 path's priority list where one is measured)."""
    if name != "auto":
        why = reasons(name, target)
        if why:
            raise WanrenderError(f"attention backend {name!r} cannot run here: {'; '.join(why)} — use --attention auto")
        return Choice(REGISTRY[name], REGISTRY[name].build())
    rejected: dict[str, list[str]] = {}
    gen = generation(target)
    order = PRIORITY.get(f"{gen}-8bit", PRIORITY[gen]) if eight_bit else PRIORITY[gen]
    for candidate in order:
        why = REGISTRY[candidate].check(target)
        if not why:
            return Choice(REGISTRY[candidate], REGISTRY[candidate].build(), rejected)
        rejected[candidate] = why
    return Choice(REGISTRY["sdpa"], REGISTRY["sdpa"].build(), rejected)
