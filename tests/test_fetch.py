"""`models fetch` with an in-process fake hub: checksums, no half-written files
(tests/test_hostile_models.py runs the CLI against a local HTTP hub: skipping, resuming)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wanrender.errors import WanrenderError
from wanrender.fetch import Hub, Remote, RemoteFile, fetch

FILES = (
    RemoteFile("org/repo", "split_files/a.safetensors", "a.safetensors", 0.0, "high-noise expert"),
    RemoteFile("org/tok", "spiece.model", "tok/spiece.model", 0.0, "tokenizer"),
)


def _fake_hub(payloads: dict[str, bytes], corrupt: set[str] = frozenset()):
    calls = []

    def meta(f: RemoteFile) -> Remote:
        return Remote(len(payloads[f.path]), hashlib.sha256(payloads[f.path]).hexdigest())

    def download(f: RemoteFile, cache: Path, remote: Remote) -> Path:
        calls.append(f.path)
        local = cache / f.path
        local.parent.mkdir(parents=True, exist_ok=True)
        data = payloads[f.path]
        local.write_bytes(data[:-1] + b"!" if f.path in corrupt else data)
        return local

    return Hub(meta, download), calls


def test_fetch_places_and_verifies(tmp_path: Path) -> None:
    payloads = {"split_files/a.safetensors": b"weights" * 100, "spiece.model": b"spm"}
    dl, calls = _fake_hub(payloads)
    out = fetch(tmp_path / "models", FILES, hub=dl)
    assert [p.read_bytes() for p in out] == [payloads["split_files/a.safetensors"], payloads["spiece.model"]]
    assert not (tmp_path / "models" / ".download").exists()
    assert calls == ["split_files/a.safetensors", "spiece.model"]


def test_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    payloads = {"split_files/a.safetensors": b"weights" * 100, "spiece.model": b"spm"}
    dl, _ = _fake_hub(payloads, corrupt={"split_files/a.safetensors"})
    with pytest.raises(WanrenderError, match="checksum mismatch.*run the command again"):
        fetch(tmp_path / "models", FILES, hub=dl)
    assert not (tmp_path / "models" / "a.safetensors").exists()
    assert not list((tmp_path / "models").rglob("a.safetensors"))


def test_a_disk_that_fills_up_mid_download_is_one_line(tmp_path: Path) -> None:
    """A full disk cannot be made here without root (a small tmpfs mount), so the hub's
    download raises ENOSPC itself; earlier files stay verified and recorded."""
    import errno

    payloads = {"split_files/a.safetensors": b"weights" * 100, "spiece.model": b"spm"}
    hub, _ = _fake_hub(payloads)

    def full(f: RemoteFile, cache: Path, remote: Remote) -> Path:
        if f.path == "spiece.model":
            raise OSError(errno.ENOSPC, "No space left on device")
        return hub.download(f, cache, remote)

    with pytest.raises(WanrenderError, match=r"no space left on device while saving tok/spiece.model — free space"):
        fetch(tmp_path / "models", FILES, hub=Hub(hub.meta, full))
    assert (tmp_path / "models" / "a.safetensors").read_bytes() == payloads["split_files/a.safetensors"]
    assert not (tmp_path / "models" / "tok" / "spiece.model").exists()
