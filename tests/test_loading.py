"""Round trips through every checkpoint format, auto-detection, and bad input."""

from pathlib import Path

import pytest
import torch
from helpers_ckpt import DIT_FORMATS, dequantized_copy, write_dit
from helpers_models import TINY_DIT, tiny_dit

from wanrender.errors import ModelFileError
from wanrender.models.dit import DiTConfig, WanDiT
from wanrender.models.formats import inspect_checkpoint
from wanrender.models.loading import load_dit

I2V = TINY_DIT
T2V = DiTConfig(**{**TINY_DIT.to_dict(), "in_channels": 16, "patch_size": (1, 2, 2)})

EXPECTED = {
    "comfy-bf16": ("comfy", "bf16", None),
    "comfy-fp16": ("official", "fp16", None),
    "fp8_scaled": ("official", "fp8_scaled", "scale_weight"),
    "fp8_scaled_v2": ("official", "fp8_scaled", "weight_scale"),
    "fp8_e4m3fn": ("official", "fp8_e4m3fn", None),
    "official": ("official", "fp32", None),
    "diffusers": ("diffusers", "fp32", None),
}


def _inputs(cfg: DiTConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    cond = torch.randn(1, cfg.in_channels - 16, 2, 4, 6, generator=g) if cfg.in_channels > 16 else None
    ctx = torch.randn(1, 6, cfg.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx, cond


@pytest.mark.parametrize("fmt", DIT_FORMATS)
def test_dit_round_trip(fmt: str, tmp_path: Path) -> None:
    model = tiny_dit(I2V, seed=5)
    src = write_dit(model, fmt, tmp_path)
    info = inspect_checkpoint(src)
    assert (info.role, info.variant) == ("dit", "i2v")
    assert (info.layout, info.precision, info.scale_style) == EXPECTED[fmt]

    loaded = load_dit(src, compute_dtype=torch.float32)
    # fp8 weights stay fp8 in memory, with their scale.
    q = loaded.blocks[0].self_attn.q
    assert q.weight.dtype == (torch.float8_e4m3fn if fmt.startswith("fp8") else info_dtype(fmt))
    assert (q.weight_scale is not None) == fmt.startswith("fp8_scaled")

    # Exactness: the loaded model equals the original with the stored (rounded) weights.
    ref = WanDiT(I2V).eval()
    ref.load_state_dict(dequantized_copy(model, fmt))
    x, t, ctx, cond = _inputs(I2V)
    with torch.no_grad():
        got, want, orig = loaded(x, t, ctx, cond), ref(x, t, ctx, cond), model(x, t, ctx, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Storage error against the fp32 original, stated per format (see docs/pitfalls.md).
    err = ((got - orig).norm() / orig.norm()).item()
    bound = {"official": 1e-6, "diffusers": 1e-6, "comfy-fp16": 2e-3, "comfy-bf16": 2e-2}.get(fmt, 0.15)
    assert err <= bound, f"{fmt}: relative error {err:.3g} over {bound}"


def info_dtype(fmt: str) -> torch.dtype:
    return {"comfy-bf16": torch.bfloat16, "comfy-fp16": torch.float16}.get(fmt, torch.float32)


def test_dtype_cast_and_bytes(tmp_path: Path) -> None:
    model = tiny_dit(I2V, seed=6)
    src = write_dit(model, "fp8_scaled", tmp_path)
    loaded = load_dit(src, dtype=torch.bfloat16)
    fp8_bytes = sum(p.numel() for n, p in loaded.named_parameters() if p.dtype == torch.float8_e4m3fn)
    assert fp8_bytes > 0.8 * sum(p.numel() for p in loaded.parameters())
    assert loaded.blocks[0].norm3.weight.dtype == torch.bfloat16


def test_t2v_expert_refused_for_i2v(tmp_path: Path) -> None:
    src = write_dit(tiny_dit(T2V), "comfy-bf16", tmp_path)
    with pytest.raises(ModelFileError, match="text-to-video expert"):
        load_dit(src)
    assert load_dit(src, require_i2v=False).cfg.in_channels == 16


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="file not found"):
        load_dit(tmp_path / "nope.safetensors")


def test_truncated_and_corrupt(tmp_path: Path) -> None:
    src = write_dit(tiny_dit(I2V), "comfy-bf16", tmp_path)
    data = src.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated.*download it again"):
        load_dit(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="unreadable header"):
        load_dit(junk)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load_dit(tiny)


def test_vae_given_where_dit_expected(tmp_path: Path) -> None:
    from wanrender.models.export import save_safetensors

    fake_vae = {
        "encoder.conv1.weight": torch.randn(4, 3, 3, 3, 3),
        "decoder.conv1.weight": torch.randn(4, 16, 3, 3, 3),
        "conv2.weight": torch.randn(16, 16, 1, 1, 1),
    }
    p = save_safetensors(fake_vae, tmp_path / "wan_2.1_vae.safetensors")
    with pytest.raises(ModelFileError, match="expected a Wan DiT expert, but this is a vae"):
        load_dit(p)


def test_missing_shard(tmp_path: Path) -> None:
    folder = write_dit(tiny_dit(I2V), "official", tmp_path)
    shards = sorted(folder.glob("*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelFileError, match="shard\\(s\\) missing"):
        load_dit(folder)


def test_wrong_architecture_names_tensor(tmp_path: Path) -> None:
    src = write_dit(tiny_dit(I2V), "comfy-bf16", tmp_path)
    other = DiTConfig(**{**I2V.to_dict(), "ffn_dim": 96, "patch_size": (1, 2, 2)})
    with pytest.raises(ModelFileError, match="has shape"):
        load_dit(src, config=other)
