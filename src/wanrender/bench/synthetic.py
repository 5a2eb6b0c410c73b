"""Full-size models with seeded random weights, built directly on the GPU.

Speed does not depend on weight values, so benchmarks and sweeps on machines
without the real checkpoints (they are the user's, fetched explicitly) run on
these: the i2v-A14B experts stored as fp8 + per-tensor scale (as the users'
fp8_scaled files), the umt5-xxl encoder fp8-stored, the Wan 2.1 VAE in bf16, and
a tiny SentencePiece tokenizer (prompt length is all that matters for speed).
Weights are normal with std 0.02 (norm gains near 1): never zeros.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from wanrender.models.random_init import init_random_

_WORDS = "snow winter bear cub fur light soft gentle camera motion slow dolly cinematic scene crisp calm".split()


def to_fp8_(model: nn.Module) -> nn.Module:
    """Store every ``Linear`` weight as e4m3 + a per-tensor scale (frees the bf16 copy)."""
    from wanrender.models.common import Linear, quantize_fp8, set_tensor

    for mod in model.modules():
        if isinstance(mod, Linear) and mod.weight.element_size() > 1:
            q, s = quantize_fp8(mod.weight)
            set_tensor(mod, "weight", q)
            mod.weight_scale = s
    return model


def random_dit(device: torch.device, seed: int = 0, fp8: bool = True, preset: str = "i2v-A14B") -> nn.Module:
    from wanrender.models.dit import DiTConfig, WanDiT
    from wanrender.models.random_init import init_random_

    with torch.device("meta"):
        m = WanDiT(DiTConfig.preset(preset))
    m = m.to_empty(device=device).to(torch.bfloat16).eval()
    init_random_(m, seed)
    m.compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return to_fp8_(m) if fp8 else m


def tiny_tokenizer(folder: Path):
    """A tiny tokenizer (prompt length is all that matters for speed), also written to ``folder``/spiece.model."""
    from wanrender.models.random_init import train_tokenizer
    from wanrender.models.text_encoder import Tokenizer

    path = folder / "spiece.model"
    path.write_bytes(train_tokenizer(_WORDS, vocab=200, seed=0, lines=500, per_line=10))
    return Tokenizer.from_file(path)


FULL = ("i2v-A14B", "umt5-xxl", "wan2.1")
TINY = ("demo", "demo", "demo")  # the same code on the CPU, for tests


def random_engine(device: str | torch.device = "cuda", memory=None, presets: tuple[str, str, str] = FULL):
    """An ``Engine`` with full-size random-weight models, placed as ``memory`` (a
    runtime.planner.MemoryPlan; None: all resident) says: what a swap or stream plan
    keeps on the host is built on the GPU and then moved to host memory, so building
    needs an uncapped GPU (apply an emulated VRAM cap afterwards). ``presets``: DiT,
    text encoder and VAE presets (``TINY`` for tests). The engine has no files and no
    configuration yet: render it through ``runner.Runner(engine=...)``, which applies
    the plan's precision, attention, compile and memory runtime."""
    from wanrender.engine import Engine
    from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.runtime.offload import load_devices

    dev = torch.device(device)
    expert_dev, te_dev, _ = load_devices(memory, dev)
    host = torch.device("cpu")

    def park(model: nn.Module) -> nn.Module:
        # Built in bf16 and quantised on the device, the fp8 tensors sit in allocator
        # segments that also held the bf16 originals: under a VRAM cap that
        # fragmentation cost gigabytes a real load never pays. Every model goes to
        # the host once and comes back compact (or stays there, as the plan says).
        if dev.type == "cuda":
            model = model.to(host)
            torch.cuda.empty_cache()
        return model

    dit_p, te_p, vae_p = presets
    high = park(random_dit(dev, seed=0, preset=dit_p))
    low = park(random_dit(dev, seed=1, preset=dit_p))
    with torch.device("meta"):
        te = UMT5Encoder(TextEncoderConfig.preset(te_p))
    te = te.to_empty(device=dev).to(torch.bfloat16)
    init_random_(te, seed=2, std=0.05)
    to_fp8_(te)
    te.compute_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    te = park(te).to(te_dev)
    high, low = high.to(expert_dev), low.to(expert_dev)
    vae = WanVAE(VAEConfig.preset(vae_p)).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    init_random_(vae, seed=3)
    from wanrender.kernels.vae_norm import prepare_vae

    prepare_vae(vae)  # as Engine.load does
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp))
    engine = Engine(high, low, vae, te, tok, dev, None)  # in-memory: no files to hash or reload
    engine.placed_for = memory
    return engine
