"""The JSON sidecar written next to every video, and cached file checksums."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
from pathlib import Path

from wanrender.media.atomic import atomic_write_text
from wanrender.paths import home, sha256_file

_CACHE_LOCK = threading.Lock()  # one writer of the cache file per process


def _fingerprint(path: Path, st: os.stat_result) -> str:
    """(path, size, mtime, first MiB): a file rewritten in place within the mtime's
    resolution, or copied with its mtime kept, still changes its key when its header does."""
    with open(path, "rb") as fh:
        head = hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{head}"


def cached_sha256(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of a file, cached by its fingerprint: hashing 14 GB takes a while."""
    path = Path(path).resolve()
    key = _fingerprint(path, path.stat())
    cache_file = (cache or home()) / "sha256.json"
    known = _read_cache(cache_file)
    if key in known:
        return known[key]
    digest = sha256_file(path)
    with _CACHE_LOCK:
        known = _read_cache(cache_file)  # another thread may have added entries meanwhile
        known[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(known, indent=1))
        except OSError:
            pass  # a read-only cache only costs time
    return digest


def _read_cache(cache_file: Path) -> dict[str, str]:
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


class FileHashes:
    """The sidecar's file checksums, computed on a background thread from the moment
    the files are known: hashing 37 GB takes ~20 s of one core, which the load and the
    render hide (hashlib and file reads release the GIL). ``describe()`` waits for it."""

    def __init__(self, files: dict[str, Path | None], cache: Path | None = None) -> None:
        self.files = {role: Path(p) for role, p in files.items() if p is not None}
        self._cache = cache
        self._result: dict[str, dict] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="wanrender-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = describe_files(self.files, self._cache)
        except BaseException as e:  # reported by describe(), on the caller's thread
            self._error = e

    def covers(self, files: dict[str, Path | None]) -> bool:
        """Are these checksums for exactly ``files`` (roles without a file ignored)?"""
        return self.files == {role: Path(p) for role, p in files.items() if p is not None}

    def describe(self) -> dict[str, dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _weight_files(p: Path) -> list[Path]:
    """Every file a model entry stands for: a folder's weights and tokenizer, a shard
    index's shards (and the index), or the file itself."""
    if p.is_dir():
        return sorted(
            q for q in p.rglob("*") if q.is_file() and q.suffix in (".safetensors", ".pth", ".model", ".json")
        )
    if p.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(p.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            shards = []
        return [p] + [p.parent / s for s in shards if (p.parent / s).is_file()]
    return [p]


def describe_files(files: dict[str, Path | None], cache: Path | None = None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for role, p in files.items():
        if p is None:
            continue
        paths = _weight_files(p)
        out[role] = {
            "path": str(p),
            "files": [{"name": q.name, "bytes": q.stat().st_size, "sha256": cached_sha256(q, cache)} for q in paths],
        }
    return out


def versions() -> dict[str, str]:
    import torch

    from wanrender import __version__

    v = {"wanrender": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
         "platform": platform.platform()}  # fmt: skip
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
        v["gpu"] = torch.cuda.get_device_name()
    try:
        import av

        v["pyav"] = av.__version__
    except ImportError:
        pass
    return v


def write_sidecar(path: Path, data: dict) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))
    return path
