"""The JSON sidecar written next to every video, and cached file checksums."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from wanrender.media.atomic import atomic_write_text
from wanrender.paths import home, sha256_file


def cached_sha256(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of a file, cached by (path, size, mtime): hashing 14 GB takes a while."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = (cache or home()) / "sha256.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache only costs time
    return digest


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


def describe_files(files: dict[str, Path | None]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for role, p in files.items():
        if p is None:
            continue
        paths = _weight_files(p)
        out[role] = {
            "path": str(p),
            "files": [{"name": q.name, "bytes": q.stat().st_size, "sha256": cached_sha256(q)} for q in paths],
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
