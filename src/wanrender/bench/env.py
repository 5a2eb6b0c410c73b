"""The environment a measurement was taken in (stored with every result).

``snapshot()`` is what ``wanrender env`` prints and what every benchmark row
carries; ``fingerprint()`` hashes the part of it that can change a timing, so
results from different stacks are never mistaken for each other.

GPUs are listed through NVML when it is available (``runtime.hardware``): asking
torch would create a CUDA context in the sweep's parent process — hundreds of MiB
of VRAM that would then show up in every child's NVML memory reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from wanrender.runtime.hardware import cpu_info, nvml_gpus

# Distributions whose version can change a render's speed or result.
PACKAGES = (
    "torch", "triton", "numpy", "safetensors", "av", "pillow", "opencv-python-headless", "nvidia-ml-py",
    "flash-attn", "sageattention", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cublas-cu12",
    "nvidia-cublas-cu13", "nvidia-nccl-cu12", "diffusers", "transformers",
)  # fmt: skip
# Environment variables that change allocation, kernels, threading or the bench's own test hooks.
ENV_PREFIXES = ("PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "CUDA_", "CUDNN_", "NVIDIA_", "NCCL_", "WANRENDER_BENCH_")
ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "TRITON_CACHE_DIR")
# Keys of the snapshot that go into the fingerprint (what can change a timing).
FINGERPRINT_KEYS = ("python", "torch", "cuda", "cudnn", "triton", "driver", "wanrender", "env_vars", "packages")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _env_vars() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 2**30, 1)
    except (OSError, ValueError):
        pass
    return None


def _os() -> dict:
    info = {"system": platform.system(), "release": platform.release(), "platform": platform.platform()}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["distribution"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return info


def _torch_gpus() -> list[dict]:
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1)})  # fmt: skip
    return out


def _driver_from_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _git_commit() -> str | None:
    """The checkout's commit when wanrender runs from a git work tree (informational only)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def snapshot() -> dict:
    """GPUs, driver, CUDA, cuDNN, torch, triton, Python, packages, relevant env vars, CPU, RAM, OS."""
    import torch

    from wanrender import __version__

    env: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                 "wanrender": __version__, "git_commit": _git_commit(),
                 "taken": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found = nvml_gpus()
    if found is not None:
        env["gpus"], env["driver"] = found
    elif torch.cuda.is_available():
        env["gpus"], env["driver"] = _torch_gpus(), _driver_from_smi()
    else:
        env["gpus"], env["driver"] = [], None
    if env["gpus"]:  # the first GPU under the keys `bench dit` has always written
        g = env["gpus"][0]
        env.update(gpu=g["name"], capability=g.get("capability"), gpu_memory_gib=g["memory_gib"])
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["cpu"] = cpu_info()
    env["ram_gib"] = _ram_gib()
    env["os"] = _os()
    env["packages"] = {d: v for d in PACKAGES if (v := _version(d)) is not None}
    env["env_vars"] = _env_vars()
    env["fingerprint"] = fingerprint(env)
    return env


def fingerprint(env: dict) -> str:
    """12 hex digits over what can change a timing: versions, driver, GPUs, CPU, env vars."""
    stable = {k: env.get(k) for k in FINGERPRINT_KEYS}
    stable["gpus"] = [(g.get("name"), g.get("memory_gib")) for g in env.get("gpus") or []]
    stable["cpu"] = (env.get("cpu") or {}).get("model")
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
