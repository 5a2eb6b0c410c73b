"""Write a .safetensors file tensor by tensor, without holding the whole state dict.

The ``safetensors`` package needs every tensor in memory at once; a 14 GB expert
made on the fly must not be. The format is simple enough to write directly: an
8-byte little-endian header length, the JSON header (``__metadata__`` first, then
the tensors in data order), spaces up to an 8-byte boundary, then the raw bytes.
The header is computed from (name, dtype, shape) alone, so a file's layout and
size are known before any tensor exists, and the bytes match what
``safetensors.torch.save_file`` writes for the same tensors.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from wanrender.models.safetensors_io import DTYPES

_CODE = {dt: code for code, dt in DTYPES.items()}
# The order safetensors lays data out in: larger dtypes first (its Rust ``Dtype``
# enum order, reversed), ties by name. Only the dtypes checked against the library.
_RANK = {"BOOL": 0, "U8": 1, "I8": 2, "F8_E5M2": 3, "F8_E4M3": 4, "I16": 5, "F16": 6, "BF16": 7,
         "I32": 8, "F32": 9, "F64": 10, "I64": 11}  # fmt: skip
_CHUNK = 64 << 20  # bytes per device -> host copy: big writes, bounded pinned memory


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """Where every tensor goes: ``header`` is the file's first bytes (length prefix included)."""

    header: bytes
    specs: tuple[TensorSpec, ...]  # in data order
    offsets: Mapping[str, int]  # absolute file offset of each tensor's first byte

    @property
    def total_bytes(self) -> int:
        return len(self.header) + sum(s.nbytes for s in self.specs)


def plan_layout(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> Layout:
    ordered = sorted(specs, key=lambda s: (-_RANK[_CODE[s.dtype]], s.name))
    if len({s.name for s in ordered}) != len(ordered):
        raise ValueError("duplicate tensor names")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    rel: dict[str, int] = {}
    for s in ordered:
        header[s.name] = {"dtype": _CODE[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        rel[s.name] = pos
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return Layout(struct.pack("<Q", len(text)) + text, tuple(ordered), {k: start + v for k, v in rel.items()})


def read_header(path: str | os.PathLike, limit: int = 100 << 20) -> bytes | None:
    """The first bytes of a safetensors file up to its data (as ``Layout.header``); None if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > limit:
                return None
            body = f.read(n)
    except OSError:
        return None
    return raw + body if len(body) == n else None


def write_streaming(
    path: str | os.PathLike,
    layout: Layout,
    make: Callable[[TensorSpec], torch.Tensor],
    order: Iterable[str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write ``layout`` to ``path``, asking ``make`` for one tensor at a time.

    ``order`` is the order tensors are made in (default: data order); a tensor that
    depends on another (a scale on its weight) is simply made later and written at
    its offset. Tensors may live on a GPU: they are copied through pinned buffers,
    and a writer thread puts one chunk on disk while the next is made.
    """
    specs = {s.name: s for s in layout.specs}
    names = list(order) if order is not None else [s.name for s in layout.specs]
    if sorted(names) != sorted(specs):
        raise ValueError("order must name every tensor of the layout once")
    todo: queue.Queue = queue.Queue(maxsize=2)
    pinned = _Pinned()
    failed: list[BaseException] = []

    with open(path, "wb") as f:
        f.write(layout.header)

        def writer() -> None:
            while (item := todo.get()) is not None:
                offset, data, staging = item
                if failed:
                    continue  # drain: the main thread stops at its next put
                try:
                    if f.tell() != offset:
                        f.seek(offset)
                    f.write(memoryview(data.numpy()))
                    if on_bytes:
                        on_bytes(data.numel())
                except BaseException as e:  # handed to the main thread, raised there
                    failed.append(e)
                if staging is not None:
                    pinned.put(staging)

        thread = threading.Thread(target=writer, name="safetensors-writer", daemon=True)
        thread.start()
        try:
            for name in names:
                spec = specs[name]
                t = make(spec)
                if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                    raise ValueError(f"{name}: made {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}")
                _send(todo, pinned, layout.offsets[name], t, failed)
                if failed:
                    break
        finally:
            todo.put(None)
            thread.join()
        if failed:
            raise failed[0]
        # A file whose last tensors were written first still has its full length.
        f.truncate(layout.total_bytes)


class _Pinned:
    """Up to ``count`` reusable pinned host buffers, made on first use."""

    def __init__(self, count: int = 4) -> None:
        self.free: queue.Queue = queue.Queue()
        self.made = 0
        self.count = count

    def get(self) -> torch.Tensor:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if self.made < self.count:
            self.made += 1
            return torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True)
        return self.free.get()  # the writer hands every buffer back, also after a failure

    def put(self, buf: torch.Tensor) -> None:
        self.free.put(buf)


def _send(todo: queue.Queue, pinned: _Pinned, offset: int, t: torch.Tensor, failed: list) -> None:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return
    if flat.device.type == "cpu":
        todo.put((offset, flat, None))
        return
    # Device tensors: chunked copies into reused pinned buffers (fast DMA, bounded memory).
    for start in range(0, flat.numel(), _CHUNK):
        if failed:
            return
        n = min(_CHUNK, flat.numel() - start)
        buf = pinned.get()
        buf[:n].copy_(flat[start : start + n])
        todo.put((offset + start, buf[:n], buf))
