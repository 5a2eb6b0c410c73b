"""LoRA dialects, merge vs run-time application, fp8 merging and the report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers_ckpt import write_dit
from helpers_models import tiny_dit
from safetensors.torch import save_file

from wanrender.errors import ModelFileError
from wanrender.models.common import Linear, quantize_fp8
from wanrender.models.dit import WanDiT, official_key_from_diffusers
from wanrender.models.loading import load_dit
from wanrender.models.lora import LoraUndo, apply_lora, parse_lora, remove_lora

# Targets spread over every kind of Linear: attention, FFN, embeddings, head.
LOWRANK_TARGETS = (
    "blocks.0.self_attn.q",
    "blocks.0.self_attn.o",
    "blocks.1.cross_attn.v",
    "blocks.0.ffn.0",
    "blocks.1.ffn.2",
    "text_embedding.0",
    "time_projection.1",
    "head.head",
)
# Written by hand from diffusers' WanTransformer3DModel (checked against dit.py below).
DIFFUSERS_NAMES = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
    "blocks.1.cross_attn.v": "blocks.1.attn2.to_v",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
RANK = 4


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 36, 2, 4, 6, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 32, generator=g)


def _run(model: WanDiT) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs())


def _lowrank(seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """stem -> (down [r, in], up [out, r]) for the tiny DiT."""
    model, g = tiny_dit(), torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for stem in LOWRANK_TARGETS:
        w = mods[stem].weight
        out[stem] = (torch.randn(RANK, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], RANK, generator=g) * 0.1)
    return out


def _dense(seed: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """kind -> {our parameter name: delta} for the diff / diff_b / diff_m dialects."""
    params, g = dict(tiny_dit().named_parameters()), torch.Generator().manual_seed(seed)
    pick = {
        "diff": (
            "blocks.0.ffn.0.weight",
            "blocks.0.norm3.weight",
            "blocks.1.self_attn.norm_q.weight",
            "patch_embedding.weight",
            "head.head.weight",
        ),
        "diff_b": (
            "blocks.0.self_attn.k.bias",
            "blocks.1.ffn.2.bias",
            "blocks.0.norm3.bias",
            "patch_embedding.bias",
            "time_embedding.2.bias",
        ),
        "diff_m": ("blocks.0.modulation", "blocks.1.modulation", "head.modulation"),
    }
    return {k: {n: torch.randn(params[n].shape, generator=g) * 0.05 for n in names} for k, names in pick.items()}


def _reference(strength: float, deltas: dict[str, torch.Tensor]) -> WanDiT:
    """The tiny DiT with W + strength * delta added by hand."""
    model = copy.deepcopy(tiny_dit())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(strength * d)
    return model


def _lowrank_deltas(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    return {f"{stem}.weight": scale * (up @ down) for stem, (down, up) in pairs.items()}


def _kohya(stem: str) -> str:
    return "lora_unet_" + stem.replace(".", "_")


# dialect -> (LoRA state dict, our parameter name -> expected delta at strength 1)
def _dialect(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    pairs = _lowrank()
    sd: dict[str, torch.Tensor] = {}
    if name.startswith("down_up_alpha:"):
        prefix = name.split(":", 1)[1]
        for stem, (down, up) in pairs.items():
            sd |= {
                f"{prefix}{stem}.lora_down.weight": down,
                f"{prefix}{stem}.lora_up.weight": up,
                f"{prefix}{stem}.alpha": torch.tensor(8.0),
            }
        return sd, _lowrank_deltas(pairs, 8.0 / RANK)
    if name.startswith("peft_official:"):
        prefix = name.split(":", 1)[1]
        for stem, (down, up) in pairs.items():
            sd |= {f"{prefix}{stem}.lora_A.default.weight": down, f"{prefix}{stem}.lora_B.default.weight": up}
        return sd, _lowrank_deltas(pairs, 1.0)
    if name.startswith("peft_diffusers:"):
        prefix = name.split(":", 1)[1]
        for stem, (down, up) in pairs.items():
            sd |= {
                f"{prefix}{DIFFUSERS_NAMES[stem]}.lora_A.weight": down,
                f"{prefix}{DIFFUSERS_NAMES[stem]}.lora_B.weight": up,
            }
        return sd, _lowrank_deltas(pairs, 1.0)
    if name in ("kohya", "kohya_fun", "kohya_diffusers"):
        for stem, (down, up) in pairs.items():
            base = {
                "kohya": _kohya(stem),
                "kohya_fun": "lora_unet__" + stem.replace(".", "_"),
                "kohya_diffusers": _kohya(DIFFUSERS_NAMES[stem]),
            }[name]
            sd |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(2.0)}
        return sd, _lowrank_deltas(pairs, 2.0 / RANK)
    dense = _dense()
    if name.startswith("diff:"):
        prefix = name.split(":", 1)[1]
        return {f"{prefix}{n.removesuffix('.weight')}.diff": d for n, d in dense["diff"].items()}, dense["diff"]
    if name == "diff_b":
        sd = {f"diffusion_model.{n.removesuffix('.bias')}.diff_b": d for n, d in dense["diff_b"].items()}
        return sd, dense["diff_b"]
    if name == "diff_m":
        sd = {f"diffusion_model.{n.removesuffix('.modulation')}.diff_m": d for n, d in dense["diff_m"].items()}
        return sd, dense["diff_m"]
    if name == "modulation_diff":  # kijai's renamed form of diff_m
        return {f"diffusion_model.{n}.diff": d for n, d in dense["diff_m"].items()}, dense["diff_m"]
    if name == "lightx2v_mix":  # what the lightx2v 4-step files hold: all kinds at once
        sd, want = _dialect("down_up_alpha:diffusion_model.")
        for kind in ("diff_b", "diff_m"):
            s, w = _dialect(kind)
            sd, want = sd | s, want | w
        s, w = _dialect("diff:diffusion_model.")
        for k, v in w.items():
            want[k] = want[k] + v if k in want else v
        return sd | s, want
    raise ValueError(name)


DIALECTS = (
    "down_up_alpha:diffusion_model.",
    "down_up_alpha:model.diffusion_model.",
    "down_up_alpha:",
    "peft_official:base_model.model.",
    "peft_official:diffusion_model.",
    "peft_diffusers:transformer.",
    "peft_diffusers:base_model.model.",
    "kohya",
    "kohya_fun",
    "kohya_diffusers",
    "diff:diffusion_model.",
    "diff:",
    "diff_b",
    "diff_m",
    "modulation_diff",
    "lightx2v_mix",
)


def test_diffusers_names_agree_with_dit() -> None:
    for stem, d in DIFFUSERS_NAMES.items():
        assert official_key_from_diffusers(d + ".weight") == stem + ".weight"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_dialect_merged_equals_unmerged_equals_reference(dialect: str) -> None:
    sd, deltas = _dialect(dialect)
    strength = 0.7
    base = _run(tiny_dit())
    want = _run(_reference(strength, deltas))

    merged = tiny_dit()
    lora = parse_lora(sd, merged)
    assert set(lora.report.matched) == set(deltas)
    assert not lora.report.unmatched and not lora.report.expected_misses
    report = apply_lora(merged, lora, strength, mode="merge")
    got_merged = _run(merged)

    unmerged = tiny_dit()
    before = dict(unmerged.named_parameters())
    report_u = apply_lora(unmerged, parse_lora(sd, unmerged), strength, mode="unmerged")
    got_unmerged = _run(unmerged)
    after = dict(unmerged.named_parameters())
    for name in report_u.runtime:  # Linear weights are left alone in unmerged mode
        assert after[name] is before[name]
    assert set(report_u.runtime) | set(report_u.merged) == set(deltas) == set(report.merged)

    # fp32 everywhere: merged and run-time differ only in summation order.
    assert not torch.allclose(got_merged, base, atol=1e-3)
    torch.testing.assert_close(got_merged, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_unmerged, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_unmerged, got_merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["merge", "unmerged"])
def test_strength_zero_changes_nothing(mode: str) -> None:
    sd, _ = _dialect("lightx2v_mix")
    model = tiny_dit()
    base = _run(model)
    before = dict(model.named_parameters())
    report = apply_lora(model, parse_lora(sd, model), 0.0, mode=mode)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert not any(isinstance(m, Linear) and m.adapters for m in model.modules())
    assert torch.equal(_run(model), base)
    assert "strength 0" in report.summary() and not report.merged and not report.runtime


def test_strength_scales_the_delta_linearly() -> None:
    sd, _ = _dialect("lightx2v_mix")
    w0 = {n: p.clone() for n, p in tiny_dit().named_parameters()}

    def delta(s: float) -> dict[str, torch.Tensor]:
        m = tiny_dit()
        apply_lora(m, parse_lora(sd, m), s)
        return {n: p - w0[n] for n, p in m.named_parameters()}

    unit = delta(1.0)
    for s in (0.5, -1.25, 2.0):
        for n, d in delta(s).items():
            torch.testing.assert_close(d, s * unit[n], rtol=1e-5, atol=1e-6)


def test_merge_never_writes_into_the_original_tensors() -> None:
    sd, _ = _dialect("lightx2v_mix")
    model = tiny_dit()
    before = {n: (p, p.clone()) for n, p in model.named_parameters()}
    report = apply_lora(model, parse_lora(sd, model), 1.0)
    for name in report.merged:
        old, copy_ = before[name]
        assert dict(model.named_parameters())[name] is not old
        assert torch.equal(old, copy_)


def test_remove_lora_restores_the_model() -> None:
    sd, _ = _dialect("lightx2v_mix")
    model = tiny_dit()
    base = _run(model)
    lora = parse_lora(sd, model)
    undo = LoraUndo()
    apply_lora(model, lora, 1.0, mode="unmerged", undo=undo)
    apply_lora(model, lora, 0.5, mode="unmerged", undo=undo)  # stacked: both are undone
    assert not torch.allclose(_run(model), base, atol=1e-3)
    assert remove_lora(model, undo) > 0
    assert torch.equal(_run(model), base)
    assert not any(isinstance(m, Linear) and m.adapters for m in model.modules())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_e4m3fn"])
def test_fp8_merge_error_is_the_quantisation_error(fmt: str, tmp_path: Path) -> None:
    path = write_dit(tiny_dit(), fmt, tmp_path)
    model = load_dit(path, compute_dtype=torch.float32)
    mods = dict(model.named_modules())
    q = mods["blocks.0.self_attn.q"]
    assert q.weight.dtype == torch.float8_e4m3fn
    assert (q.weight_scale is None) == (fmt == "fp8_e4m3fn")
    old_q = q.weight
    old_bytes = old_q.view(torch.uint8).clone()

    sd, deltas = _dialect("down_up_alpha:diffusion_model.")
    fp8_targets = [n for n in deltas if mods[n.removesuffix(".weight")].weight.dtype == torch.float8_e4m3fn]
    assert len(fp8_targets) >= 5
    # The exact merge: this file's (dequantised) weights + delta, all fp32.
    exact = {n: mods[n.removesuffix(".weight")].dequantized_weight(torch.float32) + deltas[n] for n in fp8_targets}
    apply_lora(model, parse_lora(sd, model), 1.0)

    assert q.weight is not old_q and torch.equal(old_q.view(torch.uint8), old_bytes)  # file view untouched
    for n in fp8_targets:
        mod = mods[n.removesuffix(".weight")]
        assert mod.weight.dtype == torch.float8_e4m3fn and mod.weight_scale is not None
        merged = mod.dequantized_weight(torch.float32)
        # Stochastic rounding: the error is fp8 rounding noise (3 mantissa bits: up to
        # one step), measured 0.037-0.038 relative L2 here (vs 0.026-0.027 for round-to-nearest) ...
        assert _rel(merged, exact[n]) < 0.06
        # ... but unbiased: the merged change projects onto the LoRA delta with a gain
        # near 1 (measured 0.994-1.004), where round-to-nearest of a small delta gives a gain near 0.
        base = exact[n] - deltas[n]
        gain = ((merged - base) * deltas[n]).sum() / (deltas[n] * deltas[n]).sum()
        assert 0.9 < gain.item() < 1.1


def test_stochastic_rounding_keeps_small_deltas() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    delta = 0.01 * torch.randn(256, 256, generator=g)  # well below half an e4m3 step
    q0, s0 = quantize_fp8(w)
    base = q0.float() * s0
    near, sn = quantize_fp8(base + delta)
    sto, ss = quantize_fp8(base + delta, seed=1)

    def gain(q, s):
        return (((q.float() * s - base) * delta).sum() / (delta * delta).sum()).item()

    assert gain(near, sn) < 0.5  # most of the delta rounds away
    assert 0.9 < gain(sto, ss) < 1.1


# ----------------------------------------------------------------------------- report


def test_wan21_image_keys_are_expected_misses() -> None:
    sd, deltas = _dialect("down_up_alpha:diffusion_model.")
    g = torch.Generator().manual_seed(3)
    extra = {}
    for i in range(4):  # a 40-block file on our 2 blocks: image keys never count against it
        for m in ("k_img", "v_img"):
            extra[f"diffusion_model.blocks.{i}.cross_attn.{m}.lora_down.weight"] = torch.randn(RANK, 64, generator=g)
            extra[f"diffusion_model.blocks.{i}.cross_attn.{m}.lora_up.weight"] = torch.randn(64, RANK, generator=g)
            extra[f"diffusion_model.blocks.{i}.cross_attn.{m}.alpha"] = torch.tensor(4.0)
        extra[f"diffusion_model.blocks.{i}.cross_attn.norm_k_img.diff"] = torch.randn(64, generator=g)
        extra[f"lora_unet_blocks_{i}_cross_attn_k_img.lora_down.weight"] = torch.randn(RANK, 64, generator=g)
    extra["diffusion_model.img_emb.proj.1.lora_down.weight"] = torch.randn(RANK, 1280, generator=g)
    extra["diffusion_model.img_emb.proj.1.diff_b"] = torch.randn(1280, generator=g)
    # More image keys than real ones: still fine, they do not count against the LoRA.
    assert len(extra) > len(sd)
    model = tiny_dit()
    lora = parse_lora(sd | extra, model)
    assert set(lora.report.expected_misses) == set(extra)
    assert not lora.report.unmatched
    assert set(lora.report.matched) == set(deltas)  # k_img never lands on cross_attn.k
    assert "Wan 2.1 image-branch keys skipped" in lora.report.summary()


def test_a_few_unknown_keys_are_reported_not_fatal() -> None:
    sd, _ = _dialect("down_up_alpha:diffusion_model.")
    junk = {
        "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
        "diffusion_model.blocks.0.self_attn.q.diff_x": torch.zeros(3),
    }
    report = parse_lora(sd | junk, tiny_dit()).report
    assert set(report.unmatched) == set(junk)
    assert "2 keys unmatched" in report.summary()


def test_sdxl_lora_is_refused_with_a_clear_message() -> None:
    sd = {}
    for blk in ("down_blocks_0_attentions_0", "up_blocks_1_attentions_2", "mid_block_attentions_0"):
        stem = f"lora_unet_{blk}_transformer_blocks_0_attn1_to_q"
        sd |= {
            f"{stem}.lora_down.weight": torch.zeros(4, 320),
            f"{stem}.lora_up.weight": torch.zeros(320, 4),
            f"{stem}.alpha": torch.tensor(4.0),
        }
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 1280)
    with pytest.raises(ModelFileError, match=r"not a LoRA for the Wan 2\.2 DiT — it looks like SDXL"):
        parse_lora(sd, tiny_dit())


def test_flux_lora_is_named() -> None:
    sd = {f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072) for i in range(3)}
    with pytest.raises(ModelFileError, match="looks like Flux"):
        parse_lora(sd, tiny_dit())


def test_shape_mismatch_names_key_and_shapes() -> None:
    sd, _ = _dialect("down_up_alpha:diffusion_model.")
    sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 48)
    with pytest.raises(ModelFileError) as e:
        parse_lora(sd, tiny_dit())
    msg = str(e.value)
    assert "blocks.0.self_attn.q.lora_up.weight" in msg and "(4, 48)" in msg and "(64, 64)" in msg

    sd = {"diffusion_model.blocks.0.diff_m": torch.zeros(1, 6, 5120)}
    with pytest.raises(ModelFileError, match=r"diff_m has shape \(1, 6, 5120\).*\(1, 6, 64\).*Wan 14B"):
        parse_lora(sd, tiny_dit())


def test_lycoris_is_refused() -> None:
    hada = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    sd = {f"lora_unet_blocks_0_ffn_0.{k}": torch.zeros(4, 4) for k in hada}
    sd |= {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64)}
    with pytest.raises(ModelFileError, match="hada_w1_a"):
        parse_lora(sd, tiny_dit())
    dora, _ = _dialect("down_up_alpha:diffusion_model.")
    dora["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(64, 1)
    with pytest.raises(ModelFileError, match="dora_scale"):
        parse_lora(dora, tiny_dit())


def test_lora_file_via_open_checkpoint_and_peft_metadata(tmp_path: Path) -> None:
    sd, deltas = _dialect("peft_diffusers:transformer.")
    path = tmp_path / "my_lora.safetensors"
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 8, "transformer.r": RANK})}
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path), metadata=meta)
    model = tiny_dit()
    lora = parse_lora(path, model)
    assert lora.report.source == str(path) and lora.report.summary().startswith("my_lora.safetensors: 8 tensors")
    apply_lora(model, lora, 1.0)
    # bf16 LoRA tensors, alpha 8 / rank 4 from the header: scale 2.
    bf16 = {
        n: 2.0 * d
        for n, d in _lowrank_deltas(
            {s: (dn.bfloat16().float(), up.bfloat16().float()) for s, (dn, up) in _lowrank().items()}, 1.0
        ).items()
    }
    assert set(bf16) == set(deltas)
    torch.testing.assert_close(_run(model), _run(_reference(1.0, bf16)), rtol=1e-5, atol=1e-5)


def test_invalid_mode() -> None:
    sd, _ = _dialect("diff_b")
    model = tiny_dit()
    with pytest.raises(ValueError, match="mode"):
        apply_lora(model, parse_lora(sd, model), 1.0, mode="fuse")
