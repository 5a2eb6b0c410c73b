"""Tiny random models shared by the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from wanrender.models.dit import DiTConfig, WanDiT
from wanrender.models.random_init import init_random_

TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """The tests' scheme: every parameter non-zero (never time or test on zeros), norm
    gains 1 + std/2 * N(0, 1)."""
    return init_random_(module, seed, std=std, gain_std=std / 2)


def tiny_dit(cfg: DiTConfig = TINY_DIT, seed: int = 0) -> WanDiT:
    return randomize_(WanDiT(cfg), seed).eval()


def dynamo_after(code: str) -> str:
    """Runs ``code`` in a fresh Python (only ``src`` on its path) and returns its last
    printed line followed by ``dynamo`` or ``clean``: whether it imported torch._dynamo,
    which costs a process that never compiles 1-4 s."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    probe = code + "\nprint('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n"
    r = subprocess.run([sys.executable, "-c", "import sys\n" + probe], capture_output=True, text=True,
                       env={"PYTHONPATH": src}, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return " ".join(r.stdout.split())
