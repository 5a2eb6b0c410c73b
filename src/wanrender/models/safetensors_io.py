"""Zero-copy reading of .safetensors files (and .pth archives) through mmap.

Why our own reader: tensors must be views of the file's pages (no second copy of
14-28 GB of weights in host RAM, nothing read until used), and a truncated or
corrupt file must fail with a message that names it, before any model is built.
Writing uses the ``safetensors`` package.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from wanrender.errors import ModelFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_REDOWNLOAD = "the file is damaged or incomplete; download it again"
# The safetensors format's own limit; real headers are under a few MB (a 14B expert: ~200 kB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def load_json(data: bytes | str, path: object, what: str) -> object:
    """JSON read from a model file: any malformed text is the file's fault, one line naming it.

    Hostile text fails in more ways than JSONDecodeError: nesting 100,000 deep raises
    RecursionError, invalid UTF-8 UnicodeDecodeError, and a huge document MemoryError.
    NaN and Infinity are not JSON and are refused too.
    """
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError, MemoryError, TypeError):  # JSONDecodeError/UnicodeDecodeError are ValueErrors
        raise ModelFileError(path, f"unreadable {what} (not valid JSON)", _REDOWNLOAD) from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_info(path: Path, name: str, h: object) -> TensorInfo:
    """One header entry, checked field by field (a header is untrusted input)."""
    if not isinstance(h, dict):
        raise ModelFileError(path, f"malformed entry for tensor {name!r}", _REDOWNLOAD)
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str):
        raise ModelFileError(path, f"malformed entry for tensor {name!r} (dtype)", _REDOWNLOAD)
    if dtype not in DTYPES:
        raise ModelFileError(path, f"tensor {name!r} has unsupported dtype {dtype[:20]}", "convert it")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) for d in shape):
        raise ModelFileError(path, f"malformed entry for tensor {name!r} (shape)", _REDOWNLOAD)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise ModelFileError(path, f"malformed entry for tensor {name!r} (data_offsets)", _REDOWNLOAD)
    if offsets[0] > offsets[1]:
        raise ModelFileError(path, f"tensor {name!r}: its byte range is reversed", _REDOWNLOAD)
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor whose storage is the file's pages.

    The header is parsed and checked on open; tensor data is touched only when a
    tensor is used. Mapped read-only: the views must never be written in place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "file not found", "check the path")
        size = self.path.stat().st_size
        if size < 8:
            raise ModelFileError(self.path, f"only {size} bytes, not a safetensors file", _REDOWNLOAD)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n < 2 or n > _MAX_HEADER or 8 + n > size:
                    raise ModelFileError(
                        self.path,
                        f"not a valid safetensors file (header length {n} in a {size}-byte file)",
                        _REDOWNLOAD,
                    )
                raw = f.read(n)
        except OSError as e:
            raise ModelFileError(self.path, f"cannot read the file ({e.strerror})", "check its permissions") from None
        header = load_json(raw, self.path, "header")
        if not isinstance(header, dict):
            raise ModelFileError(self.path, "not a valid safetensors file (the header is not an object)", _REDOWNLOAD)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ModelFileError(self.path, "not a valid safetensors file (metadata is not text)", _REDOWNLOAD)
        self.metadata: dict[str, str] = meta
        self._data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        data_len = size - self._data_start
        for name, h in header.items():
            info = _tensor_info(self.path, name, h)
            if info.end > data_len:
                raise ModelFileError(
                    self.path, f"truncated: tensor {name!r} ends past the end of the file", _REDOWNLOAD
                )
            if info.nbytes != math.prod(info.shape) * DTYPES[info.dtype].itemsize:
                raise ModelFileError(
                    self.path, f"tensor {name!r}: its byte range does not match its shape", _REDOWNLOAD
                )
            self.infos[name] = info
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            # Read-only: a copy-on-write mapping is charged against memory commit, so a
            # file larger than RAM + swap (a 28 GB bf16 expert) could not even be mapped.
            try:
                with open(self.path, "rb") as f:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise ModelFileError(
                    self.path, f"cannot map the file ({e.strerror})", "check the disk and free memory"
                ) from None
        return self._mm

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        with warnings.catch_warnings():
            # The views are read-only by design: nothing may write into the user's file
            # (LoRA merges and casts always make new tensors).
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(
                self._map(), dtype=torch.uint8, count=info.nbytes, offset=self._data_start + info.start
            )
        return raw.view(dtype).reshape(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def dtype_of(self, name: str) -> torch.dtype:
        return DTYPES[self.infos[name].dtype]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape


class PthFile(Mapping[str, torch.Tensor]):
    """A torch zip archive (``.pth``) opened with ``mmap=True, weights_only=True``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "file not found", "check the path")
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many kinds for damaged archives
            raise ModelFileError(self.path, f"cannot read this .pth file ({type(e).__name__})", _REDOWNLOAD) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        # Any pickled dict of tensors loads with weights_only (tensors keyed by dtype, by
        # index): only names make it a state dict that the key-based detection can read.
        if not isinstance(sd, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
        ):
            raise ModelFileError(self.path, "this .pth file does not hold a plain state dict", "convert it")
        self._sd: dict[str, torch.Tensor] = sd
        self.metadata: dict[str, str] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)


class ShardedCheckpoint(Mapping[str, torch.Tensor]):
    """Several safetensors shards seen as one mapping (``*.safetensors.index.json``)."""

    def __init__(self, index_path: str | os.PathLike) -> None:
        self.path = Path(index_path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise ModelFileError(self.path, "file not found", "check the path") from None
        if len(raw) > _MAX_HEADER:
            raise ModelFileError(self.path, f"not a valid shard index ({len(raw)} bytes)", _REDOWNLOAD)
        index = load_json(raw, self.path, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFileError(self.path, "not a valid shard index (no weight_map)", _REDOWNLOAD)
        missing = sorted({f for f in weight_map.values() if not (self.path.parent / f).is_file()})
        if missing:
            raise ModelFileError(
                self.path, f"{len(missing)} shard(s) missing, e.g. {missing[0]}", "download the missing shards"
            )
        self.shards = {f: SafetensorsFile(self.path.parent / f) for f in sorted(set(weight_map.values()))}
        self._where: dict[str, SafetensorsFile] = {}
        for name, f in weight_map.items():
            shard = self.shards[f]
            if name not in shard.infos:
                raise ModelFileError(shard.path, f"tensor {name!r} listed in the index is absent", _REDOWNLOAD)
            self._where[name] = shard
        meta = index.get("metadata") or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._where[name].dtype_of(name)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape_of(name)

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.shards.values()]


Checkpoint = SafetensorsFile | PthFile | ShardedCheckpoint


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open one weights file (``.safetensors``, ``.pth``/``.pt``/``.bin`` or a shard index)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".index.json"):
        return ShardedCheckpoint(p)
    if name.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return PthFile(p)
    return SafetensorsFile(p)


def checkpoint_files(ck: Checkpoint) -> list[Path]:
    return ck.files if isinstance(ck, ShardedCheckpoint) else [ck.path]
