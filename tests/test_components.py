"""VAE, text encoder and tokenizer through the real loaders; `models check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_ckpt import write_dit
from helpers_models import TINY_DIT, randomize_, tiny_dit
from helpers_text import make_tiny_spm
from typer.testing import CliRunner

from wanrender.cli import app
from wanrender.errors import ModelFileError, WanrenderError
from wanrender.models.dit import DiTConfig
from wanrender.models.export import convert_state, save_safetensors
from wanrender.models.formats import inspect_checkpoint
from wanrender.models.inventory import scan
from wanrender.models.loading import load_text_encoder, load_tokenizer, load_vae
from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder, encode_text
from wanrender.models.vae import VAEConfig, WanVAE

TE_CFG = TextEncoderConfig.preset("demo", dim=TINY_DIT.text_dim)


def _vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAEConfig.preset("demo")).eval()  # torch's seeded init: non-zero


def _te() -> UMT5Encoder:
    return randomize_(UMT5Encoder(TE_CFG), seed=3, std=0.1).eval()


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "pth"])
def test_vae_formats_load_back(fmt: str, tmp_path: Path) -> None:
    vae = _vae()
    if fmt == "pth":
        path = tmp_path / "Wan2.1_VAE.pth"
        torch.save(vae.state_dict(), path)
    else:
        tensors, _ = convert_state(vae.state_dict(), fmt)
        path = save_safetensors(tensors, tmp_path / f"wan_2.1_vae_{fmt}.safetensors")
    info = inspect_checkpoint(path)
    assert (info.role, info.variant) == ("vae", "wan2.1")
    loaded = load_vae(path, dtype=torch.float32)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tol = 2e-2 if fmt == "bf16" else 1e-6  # bf16 storage rounds weights to 8 bits of mantissa
    want, got = vae.encode(x), loaded.encode(x)
    assert ((got - want).norm() / want.norm()).item() <= tol


def test_vae_diffusers_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=8, z_dim=16)
    folder = tmp_path / "vae"
    ref.save_pretrained(folder)
    info = inspect_checkpoint(folder)
    assert (info.role, info.layout) == ("vae", "diffusers")
    ours = load_vae(folder)
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean
    assert ((ours.encode(x, normalized=False) - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize("fmt", ["bf16", "fp8_scaled"])
def test_text_encoder_file_with_embedded_tokenizer(fmt: str, tmp_path: Path) -> None:
    te = _te()
    spm = make_tiny_spm(tmp_path, vocab_size=TE_CFG.vocab)
    tensors, meta = convert_state(te.state_dict(), fmt)
    tensors["spiece_model"] = torch.frombuffer(bytearray(spm.read_bytes()), dtype=torch.uint8)
    path = save_safetensors(tensors, tmp_path / f"umt5_xxl_{fmt}.safetensors", meta)
    info = inspect_checkpoint(path)
    assert (info.role, info.has_tokenizer) == ("text_encoder", True)
    assert info.precision == ("fp8_scaled" if fmt == "fp8_scaled" else "bf16")
    enc = load_text_encoder(path)
    tok = load_tokenizer(path)
    if fmt == "fp8_scaled":
        assert enc.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    ctx = encode_text(enc, tok, ["a bear cub in the snow", "slow dolly-in"], text_len=32)
    ref = encode_text(te, load_tokenizer(spm), ["a bear cub in the snow", "slow dolly-in"], text_len=32)
    assert ctx.shape == (2, 32, TE_CFG.dim)
    tol = 0.03 if fmt == "bf16" else 0.15  # storage rounding, measured well below these
    assert ((ctx - ref).norm() / ref.norm()).item() <= tol
    assert ctx[1, 10:].abs().max() == 0  # padded positions are zero


def test_official_pth_text_encoder(tmp_path: Path) -> None:
    from wanrender.models.text_encoder import official_keys_to_hf

    te = _te()
    names = _official_names(te)  # HF name -> official name
    hf = te.state_dict()
    official = {names[k]: v for k, v in hf.items()}
    assert official_keys_to_hf(official).keys() == hf.keys()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(official, path)
    assert inspect_checkpoint(path).layout == "official"
    enc = load_text_encoder(path)
    ids = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(enc(ids), te(ids))


def _official_names(te: UMT5Encoder) -> dict[str, str]:
    from wanrender.models.text_encoder import _OFFICIAL_BLOCK_KEYS, _OFFICIAL_TOP_KEYS

    out = {v: k for k, v in _OFFICIAL_TOP_KEYS.items()}
    for i in range(TE_CFG.layers):
        for o, h in _OFFICIAL_BLOCK_KEYS.items():
            out[f"encoder.block.{i}.{h}"] = f"blocks.{i}.{o}"
    return {h: o for h, o in out.items() if h in te.state_dict()}


def test_tokenizer_errors(tmp_path: Path) -> None:
    te_only = save_safetensors(convert_state(_te().state_dict(), "bf16")[0], tmp_path / "umt5.safetensors")
    with pytest.raises(ModelFileError, match="carries no tokenizer"):
        load_tokenizer(te_only)
    with pytest.raises(ModelFileError, match="expected the UMT5-XXL text encoder"):
        load_text_encoder(write_dit(tiny_dit(), "comfy-bf16", tmp_path))


def _complete_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_dit(tiny_dit(seed=1), "fp8_scaled", root, name="wan2.2_i2v_high_noise_14B")
    write_dit(tiny_dit(seed=2), "fp8_scaled", root, name="wan2.2_i2v_low_noise_14B")
    t2v = DiTConfig(**{**TINY_DIT.to_dict(), "in_channels": 16, "patch_size": (1, 2, 2)})
    write_dit(tiny_dit(t2v), "comfy-bf16", root, name="wan2.2_t2v_high_noise_14B")
    save_safetensors(convert_state(_vae().state_dict(), "bf16")[0], root / "wan_2.1_vae.safetensors")
    tensors, _ = convert_state(_te().state_dict(), "bf16")
    tensors["spiece_model"] = torch.frombuffer(bytearray(make_tiny_spm(root.parent).read_bytes()), dtype=torch.uint8)
    save_safetensors(tensors, root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    return root


def test_scan_picks_one_file_per_role(tmp_path: Path) -> None:
    root = _complete_folder(tmp_path / "models")
    ms = scan(root)
    assert ms.high.name.startswith("wan2.2_i2v_high_noise")
    assert ms.low.name.startswith("wan2.2_i2v_low_noise")
    assert ms.vae.name == "wan_2.1_vae.safetensors"
    assert ms.tokenizer == ms.text_encoder
    assert ms.missing() == []
    assert any("text-to-video" in n for n in ms.notes)


def test_models_check_cli(tmp_path: Path) -> None:
    root = _complete_folder(tmp_path / "models")
    runner = CliRunner()
    res = runner.invoke(app, ["models", "check", str(root)])
    assert res.exit_code == 0, res.output
    assert "high-noise expert" in res.output and "fp8_scaled" in res.output
    assert "turbo preset also needs the two 4-step LoRAs" in res.output
    # Half the files: the check says what is missing and exits non-zero.
    (root / "wan_2.1_vae.safetensors").unlink()
    for f in root.glob("wan2.2_i2v_low_noise*"):
        f.unlink()
    res = runner.invoke(app, ["models", "check", str(root)])
    assert res.exit_code == 1
    assert "low-noise I2V expert" in res.output and "Wan 2.1 VAE" in res.output


def test_half_folder_refused_before_loading(tmp_path: Path) -> None:
    from wanrender.models.inventory import resolve_files

    root = _complete_folder(tmp_path / "models")
    for f in root.glob("umt5*"):
        f.unlink()
    with pytest.raises(WanrenderError, match="missing the UMT5-XXL text encoder.*models fetch"):
        resolve_files(root)


def test_unreadable_file_listed_not_fatal(tmp_path: Path) -> None:
    root = _complete_folder(tmp_path / "models")
    (root / "broken.safetensors").write_bytes(b"\x00" * 4)
    ms = scan(root)
    bad = [e for e in ms.entries if e.path.name == "broken.safetensors"]
    assert bad and bad[0].info is None and "download it again" in bad[0].error
    assert ms.missing() == []
