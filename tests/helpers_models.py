"""Tiny random models shared by the tests."""

from __future__ import annotations

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
