"""Hand-written GPU kernels (Triton) for the hot spots of the renderer.

Modules here import Triton lazily, inside functions, so importing them works on a
machine without a GPU or without Triton; each exposes ``can_run()`` listing the
reasons it cannot run on the current machine.

- ``attention_sage8``: SageAttention-style 8-bit attention (smoothed, block-quantised
  fp8/int8 Q·K^T, fp8 P·V) for the DiT's self-attention.
- ``attention_cudnn``: cuDNN's fp8 attention through NVIDIA's frontend (imported
  lazily), around the scheme of ``cudnn_fp8_math`` (plain PyTorch, with its twin).
- ``fp8_merge``: a LoRA merged into fp8 weights with ``quantize_fp8``'s bytes.
- ``quant_rows``, ``qk_norm``, ``vae_norm``: passes the eager path fuses by hand
  (what Inductor would fuse when compiling), each checked against the PyTorch ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def triton_importable() -> bool:
    """Whether Triton imports here (asked on use, never at import time)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attach(model: torch.nn.Module, kind: type, attr: str, make: Callable[[], object],
           device: torch.device | str | None = None) -> int:  # fmt: skip
    """Set ``attr`` of every ``kind`` module of ``model`` to one ``make()`` when the model
    computes on a CUDA device (``device``; default: where its first parameter is; the
    weights of a streamed expert may sit on the host) and Triton imports; returns how
    many got it (0: none was touched)."""
    mods = [m for m in model.modules() if isinstance(m, kind)]
    if device is None:
        device = next(model.parameters()).device if mods else "cpu"
    if not mods or torch.device(device).type != "cuda" or not triton_importable():
        return 0
    shared = make()
    for m in mods:
        setattr(m, attr, shared)
    return len(mods)
