"""Host-to-GPU upload of checkpoint tensors through pinned staging buffers.

The tensors of a checkpoint are mmap views of the file (page cache). Copying such a
pageable tensor to a GPU makes the driver stage it through its own small pinned
buffer, synchronously, one tensor at a time: 3.8 GB/s was measured for the experts
on an H200 (9.3 s of the 15.7–23.7 s load, docs/benchmarks.md). Here tensors are
packed into two large pinned buffers instead: while the DMA engine drains one, the
CPU fills the other, and the copies are asynchronous on the current stream, so the
casts and scales that follow are ordered after them without a synchronisation.

``WANRENDER_STAGED_UPLOAD=0`` turns it off (the plain per-tensor copy), for
measuring both in one run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

CHUNK_BYTES = 256 << 20  # two of these pinned: large enough that per-copy overheads vanish


def staging_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("WANRENDER_STAGED_UPLOAD", "1") != "0"


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def to_device(items: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` with each tensor on ``device``, in the given order, with
    its dtype and shape. Bit-exact: bytes are copied, never converted."""
    if not staging_enabled(device):
        for name, t in items:
            yield name, t.to(device)
        return
    bufs = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    drained: list[torch.cuda.Event | None] = [None, None]
    batch: list[tuple[str, torch.Tensor]] = []
    used, k = 0, 0

    def flush() -> list[tuple[str, torch.Tensor]]:
        nonlocal used, k
        slot = k % 2
        if drained[slot] is not None:
            drained[slot].synchronize()  # the DMA out of this buffer has finished: it may be refilled
        buf, off, out = bufs[slot], 0, []
        for name, t in batch:
            n = t.numel() * t.element_size()
            buf[off : off + n].copy_(_as_bytes(t))
            dst = torch.empty(t.shape, dtype=t.dtype, device=device)
            _as_bytes(dst).copy_(buf[off : off + n], non_blocking=True)
            out.append((name, dst))
            off += n
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        drained[slot] = ev
        batch.clear()
        used, k = 0, k + 1
        return out

    try:
        for name, t in items:
            n = t.numel() * t.element_size()
            if n > CHUNK_BYTES or n == 0:  # rare: an oversized or empty tensor goes the plain way
                if batch:
                    yield from flush()
                yield name, t.to(device)
                continue
            if used + n > CHUNK_BYTES:
                yield from flush()
            batch.append((name, t))
            used += n
        if batch:
            yield from flush()
    finally:
        for ev in drained:  # the pinned buffers are freed on return: nothing may still read them
            if ev is not None:
                ev.synchronize()
