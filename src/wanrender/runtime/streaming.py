"""Weights that move: modules placed on the GPU and back, and DiT blocks streamed.

``Placement`` moves a module's tensors to a device and restores the originals (the
host tensors, typically mmap views of the file) without copying anything back.

``BlockStreamer`` is installed on a loaded ``WanDiT`` as its ``block_source``: the
DiT's block loop asks it for each block. The first N blocks and everything outside
the blocks sit on the device; every other block is copied into one of two device
slots just before it runs, from the host through pinned staging buffers on a side
CUDA stream, while the previous block computes. The host copy of a block's tensors
into staging happens on the calling thread after the previous block's kernels are
queued, so it overlaps the GPU's work. Memory on the device: the resident part
plus two slots; on the host: two pinned staging buffers, whatever the model size.

On the CPU (tests) the same code runs with plain copies and no streams, so
"streamed == resident" is checked on the tiny model.

With ``chunks`` > 1 the streamer also hands out every block, resident or streamed,
as ``block(..., chunks=chunks)``: ``models.dit.Block.forward`` then runs the
token-wise work in sequence chunks to lower peak activation memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from wanrender.models.common import Linear, set_tensor

ALIGN = 256  # slot offsets: keeps every view aligned for vectorised kernels


def _tensors(module: nn.Module, recurse: bool = True) -> Iterator[tuple[nn.Module, str, bool, torch.Tensor]]:
    for mod in module.modules() if recurse else (module,):
        for name, t in mod._parameters.items():
            if t is not None:
                yield mod, name, True, t
        for name, t in mod._buffers.items():
            if t is not None:
                yield mod, name, False, t


def _set(mod: nn.Module, name: str, is_param: bool, t: torch.Tensor) -> None:
    set_tensor(mod, name, t)


def _adapters_to(module: nn.Module, device: torch.device) -> list[tuple[Linear, tuple]]:
    """Run-time LoRA adapters are attributes, not tensors of the module: move them too
    (they are small and stay on the device). Returns the originals, for restoring."""
    saved = []
    for mod in module.modules():
        if isinstance(mod, Linear) and mod.adapters:
            saved.append((mod, mod.adapters))
            mod.adapters = tuple(a._replace(down=a.down.to(device), up=a.up.to(device) if a.up is not None else None)
                                 for a in mod.adapters)  # fmt: skip
    return saved


def _restore_adapters(saved: list[tuple[Linear, tuple]]) -> None:
    for mod, adapters in saved:
        mod.adapters = adapters


class Placement:
    """A module's tensors on ``device``; ``restore`` puts the original tensors back."""

    def __init__(self, module: nn.Module, device: torch.device | str, recurse: bool = True) -> None:
        self.module = module
        self.device = torch.device(device)
        self._saved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        for mod, name, is_param, t in _tensors(module, recurse):
            if t.device != self.device:
                self._saved.append((mod, name, is_param, t))
                _set(mod, name, is_param, t.to(self.device))
        self._adapters = _adapters_to(module, self.device) if recurse else []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for *_, t in self._saved)

    def restore(self) -> None:
        for mod, name, is_param, t in self._saved:
            _set(mod, name, is_param, t)
        _restore_adapters(self._adapters)
        self._saved, self._adapters = [], []


@dataclass(frozen=True)
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor
    offset: int
    nbytes: int


def _layout(block: nn.Module) -> tuple[list[_Entry], int]:
    entries, off = [], 0
    for mod, name, is_param, t in _tensors(block):
        n = t.numel() * t.element_size()
        entries.append(_Entry(mod, name, is_param, t, off, n))
        off += -(-n // ALIGN) * ALIGN
    return entries, off


def _view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
    return buf[e.offset : e.offset + e.nbytes].view(e.host.dtype).view(e.host.shape)


class BlockStreamer:
    """Keeps ``resident`` blocks on ``device`` and streams the rest (see module doc)."""

    def __init__(self, model: nn.Module, device: torch.device | str, resident: int, buffers: int = 2,
                 chunks: int = 1) -> None:  # fmt: skip
        if buffers < 2:
            raise ValueError("streaming needs at least two buffers (one computing, one loading)")
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        blocks = list(model.blocks)
        self.resident = max(0, min(resident, len(blocks)))
        self.chunks = max(1, chunks)
        self.buffers = buffers
        self._placed = [Placement(b, self.device) for b in blocks[: self.resident]]
        # Everything outside the blocks (embeddings, time projection, head) stays on the device.
        self._placed += [Placement(m, self.device) for n, m in model.named_children() if n != "blocks"]
        self._placed += [Placement(model, self.device, recurse=False)]
        self.layouts = [_layout(b) for b in blocks[self.resident :]]
        self._adapters = [a for b in blocks[self.resident :] for a in _adapters_to(b, self.device)]
        size = max((n for _, n in self.layouts), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(buffers)] if size else []
        self.staging = (
            [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(buffers)] if size else []
        )
        self.copies = 0  # blocks copied in, for tests and the sidecar
        if self.cuda:
            self.side = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in range(buffers)]
            self.slot_free = [torch.cuda.Event() for _ in range(buffers)]
            self.staging_free = [torch.cuda.Event() for _ in range(buffers)]
        model.block_source = self if (self.layouts or self.chunks > 1) else None

    @property
    def device_bytes(self) -> int:
        return sum(p.nbytes for p in self._placed) + sum(s.numel() for s in self.slots)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.numel() for s in self.staging) if self.cuda else 0

    def _load(self, j: int) -> None:
        """Queue streamed block j into slot j % buffers (host copy now, device copy async)."""
        entries, nbytes = self.layouts[j]
        k = j % self.buffers
        stage, slot = self.staging[k], self.slots[k]
        if self.cuda:
            self.staging_free[k].synchronize()  # the previous copy out of this staging buffer is done
        for e in entries:
            _view(stage, e).copy_(e.host)
        if self.cuda:
            with torch.cuda.stream(self.side):
                self.side.wait_event(self.slot_free[k])  # the block that used this slot has finished
                slot[:nbytes].copy_(stage[:nbytes], non_blocking=True)
                self.ready[k].record(self.side)
                self.staging_free[k].record(self.side)
        else:
            slot[:nbytes].copy_(stage[:nbytes])
        self.copies += 1

    def _wrap(self, block: nn.Module) -> Callable:
        # Through the module's __call__, so a compiled block stays compiled.
        return block if self.chunks == 1 else functools.partial(block, chunks=self.chunks)

    def __call__(self, blocks: nn.ModuleList) -> Iterator[Callable]:
        streamed = len(blocks) - self.resident
        if streamed > 0:
            self._load(0)  # overlaps the resident blocks
        for i, block in enumerate(blocks):
            if i < self.resident:
                yield self._wrap(block)
                continue
            j = i - self.resident
            k = j % self.buffers
            if j > 0:
                self._load(j)  # block j-1's kernels are queued: this copy overlaps them
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[k])
            entries = self.layouts[j][0]
            for e in entries:
                _set(e.module, e.name, e.is_param, _view(self.slots[k], e))
            try:
                yield self._wrap(block)
            finally:
                for e in entries:
                    _set(e.module, e.name, e.is_param, e.host)
                if self.cuda:
                    self.slot_free[k].record(torch.cuda.current_stream(self.device))

    def uninstall(self) -> None:
        if self.cuda:
            self.side.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        for p in self._placed:
            p.restore()
        for entries, _ in self.layouts:  # a forward cut short (out of memory) may have left a block bound
            for e in entries:
                _set(e.module, e.name, e.is_param, e.host)
        _restore_adapters(self._adapters)
        self.model.block_source = None
        self.slots, self.staging, self._placed = [], [], []
