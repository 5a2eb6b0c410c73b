"""Tiny random models shared by the tests."""

from __future__ import annotations

import torch

from wanrender.models.dit import DiTConfig, WanDiT

TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with seeded non-zero random values (never time or test on zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            vals = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm" in name.split(".")[-2]:
                vals = 1.0 + vals * 0.5
            p.copy_(vals.to(p.dtype))
    return module


def tiny_dit(cfg: DiTConfig = TINY_DIT, seed: int = 0) -> WanDiT:
    return randomize_(WanDiT(cfg), seed).eval()
