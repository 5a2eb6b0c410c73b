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

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

ULP = 2.0**-7  # one unit in the last place of bf16, relative, at worst


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


# The row kernels (quant_rows, qk_norm, ln_mod): one program holds a whole row (the norms'
# rows up to MAX_ROW values); the first call's check compares the first CHECK_ROWS rows.
MAX_ROW = 16384
CHECK_ROWS = 64


class CheckedKernel:
    """A fused kernel whose first call on each device is checked against the PyTorch
    ops it replaces; a difference, or any exception in the kernel or the check, sends
    this and every later call to the ops, with one warning."""

    what = "fused kernel"

    def __init__(self) -> None:
        self.checked: set[Hashable] = set()
        self.broken: str | None = None

    def run(self, device: Hashable, compute: Callable[[], object], check: Callable[[object], None]):
        """``compute()``'s result, checked by ``check(result)`` (which calls ``verdict``)
        on this device's first call; None once the kernel is broken. ``device`` may be any
        key that says which checks are separate (a device, or a device and a layout)."""
        try:
            out = compute()
            if device not in self.checked:
                check(out)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot build or run: the PyTorch ops
            self.broken = f"{type(e).__name__}: {e}"
            log.warning("%s unavailable (%s): using the PyTorch ops", self.what, self.broken)
        return out if self.broken is None else None

    def compare(self, device: Hashable, got: torch.Tensor, ref: torch.Tensor) -> None:
        """The verdict of a kernel that is not bit-exact: within ``excess_error``'s bound."""
        err = excess_error(got, ref)
        self.verdict(device, None if err <= 1.0 else f"it differs from the PyTorch ops by {err:.1f}x the tolerance")

    def verdict(self, device: Hashable, problem: str | None) -> None:
        if problem is None:
            self.checked.add(device)
            return
        self.broken = problem
        log.warning("%s: %s — using the PyTorch ops", self.what, problem)


def excess_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest |got - ref| over its tolerance: two bf16 units in the last place of the
    value, or of the row's root mean square where a result cancels to near zero (the
    inputs' own rounding then dominates). Above 1: outside the tolerance."""
    g, r = got.float(), ref.float()
    rms = r.pow(2).mean(-1, keepdim=True).sqrt()
    return ((g - r).abs() / (2 * ULP * (r.abs() + rms)).clamp_min(1e-30)).max().item()
