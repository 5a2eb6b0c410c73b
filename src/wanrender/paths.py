"""Where wanrender keeps its cache, and file checksums (shared by every layer)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    """``$WANRENDER_HOME``, else ``~/.cache/wanrender``: demo models, weights, checksum cache."""
    env = os.environ.get("WANRENDER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wanrender"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
