"""UMT5 text encoder and tokenizer: parity with transformers, key layouts, padding."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers_text import make_tiny_spm  # noqa: E402

from wanrender.errors import ModelFileError  # noqa: E402
from wanrender.models.common import Linear  # noqa: E402
from wanrender.models.text_encoder import (  # noqa: E402
    PRESETS,
    TextEncoderConfig,
    Tokenizer,
    UMT5Encoder,
    _clamp_fp16,
    encode_text,
    normalize_state_dict,
    official_keys_to_hf,
    relative_position_buckets,
)

SHORT = "a cat walks in the park"
LONG = ", ".join(["the astronaut dances on the beach at sunset, cinematic lighting, slow motion zuletonu vumo"] * 8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def tokenizer(spm_path: Path) -> Tokenizer:
    return Tokenizer.from_file(spm_path)


@pytest.fixture(scope="module")
def hf_pair() -> tuple[torch.nn.Module, UMT5Encoder]:
    """transformers' UMT5EncoderModel with random (not tiny) weights, and ours loaded from it."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = PRESETS["demo"]
    hf_cfg = UMT5Config(
        vocab_size=cfg.vocab,
        d_model=cfg.dim,
        d_kv=cfg.d_kv,
        d_ff=cfg.dim_ff,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps,
        attn_implementation="eager",
    )
    assert hf_cfg.is_gated_act and hf_cfg.dense_act_fn == "gelu_new"
    torch.manual_seed(0)
    hf = UMT5EncoderModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.copy_(torch.randn_like(p))
            else:  # linear [out, in]: scaled so attention is far from uniform
                p.copy_(torch.randn_like(p) * 1.5 / p.shape[1] ** 0.5)
    ours = UMT5Encoder.from_state_dict(hf.state_dict())
    return hf, ours


def test_config_presets() -> None:
    xxl = TextEncoderConfig.preset("umt5-xxl")
    assert (xxl.vocab, xxl.dim, xxl.dim_ff, xxl.heads, xxl.d_kv, xxl.layers) == (256384, 4096, 10240, 64, 64, 24)
    assert (xxl.num_buckets, xxl.max_distance, xxl.text_len) == (32, 128, 512)
    demo = TextEncoderConfig.preset("demo", dim=32)
    assert demo.dim == 32 and PRESETS["demo"].dim == 64
    with pytest.raises(ValueError, match="unknown"):
        TextEncoderConfig.preset("t5-small")


def test_buckets_match_transformers() -> None:
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128), True)
    n = 600  # past max_distance on both sides
    pos = torch.arange(n)
    ref = attn._relative_position_bucket(pos[None, :] - pos[:, None])
    assert torch.equal(relative_position_buckets(n, 32, 128), ref)


def test_parity_with_transformers(hf_pair, tokenizer: Tokenizer) -> None:
    hf, ours = hf_pair
    assert ours.config == PRESETS["demo"]
    # 300 positions: distances beyond max_distance (128) hit the last log bucket.
    ids, mask, truncated = tokenizer.encode([LONG, SHORT], max_len=300)
    assert truncated == [False, False] and int(mask[0].sum()) > 200 > 20 > int(mask[1].sum())
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    err = rel_err(out, ref)
    print(f"\nparity fp32 rel err (whole batch incl. pads): {err:.2e}")
    assert out.shape == ref.shape == (2, 300, 64)
    assert err <= 1e-5
    for row in range(2):  # each prompt separately, real tokens only
        k = int(mask[row].sum())
        assert rel_err(out[row, :k], ref[row, :k]) <= 1e-5


def test_lower_precision_close(hf_pair, tokenizer: Tokenizer) -> None:
    _, ours = hf_pair
    ids, mask, _ = tokenizer.encode([SHORT, LONG], max_len=64)
    with torch.no_grad():
        ref = ours(ids, mask)
        # Loose bounds: these random weights make attention very peaked, which
        # amplifies rounding (transformers' own bf16 run is 4.4% off here).
        for dtype, bound in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            out = ours(ids, mask, dtype=dtype)
            assert out.dtype == dtype
            assert rel_err(out, ref) < bound, dtype


def test_fp16_clamp() -> None:
    x = torch.tensor([1.0, float("inf"), -float("inf"), 3.0], dtype=torch.float16)
    y = _clamp_fp16(x)
    big = torch.finfo(torch.float16).max
    assert torch.isfinite(y).all() and float(y[1]) == pytest.approx(big - 1000, rel=1e-3)
    assert float(_clamp_fp16(torch.tensor([65504.0], dtype=torch.float16))) == big


def test_fp8_scaled_stays_fp8(hf_pair, tokenizer: Tokenizer) -> None:
    """ComfyUI fp8_scaled layout: fp8 weights + ``scale_weight`` scalars + ``scaled_fp8`` marker."""
    _, ours = hf_pair
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    deq: dict[str, torch.Tensor] = {}
    for key, w in ours.state_dict().items():
        if re.search(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$", key):
            scale = w.abs().max() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            sd[key], sd[key.removesuffix("weight") + "scale_weight"] = q, scale
            deq[key] = q.float() * scale
        else:
            sd[key] = deq[key] = w
    fp8 = UMT5Encoder.from_state_dict(sd)
    lin = fp8.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(lin, Linear) and lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale is not None
    ref_model = UMT5Encoder.from_state_dict(deq)
    ids, mask, _ = tokenizer.encode([SHORT, LONG], max_len=64)
    with torch.no_grad():
        assert rel_err(fp8(ids, mask), ref_model(ids, mask)) < 1e-6


def test_tokenizer_matches_transformers(spm_path: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    from transformers import T5Tokenizer

    (tmp_path / "spiece.model").write_bytes(spm_path.read_bytes())
    hf_tok = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0)
    prompts = [SHORT, "  Two   children\tswim near the river.  ", "", "Zürich café 東京 😀 vumo", LONG]
    for max_len in (512, 16):
        ref = hf_tok(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        ids, mask, truncated = tokenizer.encode(prompts, max_len=max_len)
        assert torch.equal(ids, ref.input_ids), max_len
        assert torch.equal(mask, ref.attention_mask), max_len
        assert truncated == [len(tokenizer.sp.encode(p)) + 1 > max_len for p in prompts]
    # and the documented rule on raw sentencepiece: pieces + EOS, then pad 0
    pieces = tokenizer.sp.encode(SHORT)
    ids, mask, _ = tokenizer.encode(SHORT, max_len=32)
    assert ids[0, : len(pieces) + 1].tolist() == pieces + [1]
    assert ids[0, len(pieces) + 1 :].eq(0).all() and int(mask.sum()) == len(pieces) + 1


def test_tokenizer_from_bytes_tensor(spm_path: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    blob = torch.frombuffer(bytearray(spm_path.read_bytes()), dtype=torch.uint8)
    save_file({"spiece_model": blob}, str(tmp_path / "te.safetensors"))  # as ComfyUI files carry it
    loaded = load_file(str(tmp_path / "te.safetensors"))["spiece_model"]
    assert loaded.dtype == torch.uint8
    prompts = [SHORT, LONG, ""]
    want = tokenizer.encode(prompts, max_len=64)
    for tok in (Tokenizer.from_bytes(loaded), Tokenizer.from_bytes(spm_path.read_bytes())):
        got = tok.encode(prompts, max_len=64)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    assert Tokenizer.from_bytes(tokenizer.serialized()).vocab_size == tokenizer.vocab_size
    with pytest.raises(ValueError):
        Tokenizer.from_bytes(b"not a model")


def test_tokenizer_from_dir(spm_path: Path, tmp_path: Path) -> None:
    only_json = tmp_path / "json_only"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFileError, match="spiece.model"):
        Tokenizer.from_dir(only_json)
    (only_json / "spiece.model").write_bytes(spm_path.read_bytes())
    assert Tokenizer.from_dir(only_json).vocab_size <= PRESETS["demo"].vocab
    with pytest.raises(ModelFileError):
        Tokenizer.from_file(tmp_path / "missing.model")


def test_truncation_and_empty(tokenizer: Tokenizer) -> None:
    ids, mask, truncated = tokenizer.encode([LONG, SHORT, ""], max_len=12)
    assert truncated == [True, False, False]
    assert mask[0].all() and ids[0, -1] == 1 and (ids[0, :-1] != 1).all()  # EOS kept last
    assert ids[2].tolist() == [1] + [0] * 11 and mask[2].tolist() == [1] + [0] * 11


def test_official_keys_round_trip(hf_pair) -> None:
    _, ours = hf_pair
    hf_sd = ours.state_dict()
    inverse = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    official: dict[str, torch.Tensor] = {}
    for key, value in hf_sd.items():
        if key == "shared.weight":
            official["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            official["norm.weight"] = value
        else:
            m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
            assert m is not None, key
            official[f"blocks.{m.group(1)}.{inverse[m.group(2)]}"] = value
    back = official_keys_to_hf(official)
    assert back.keys() == hf_sd.keys()
    assert all(back[k] is official_k for k, official_k in zip(back, official.values()))
    assert normalize_state_dict(official).keys() == hf_sd.keys()
    model = UMT5Encoder.from_state_dict(official)
    ids = torch.tensor([[5, 9, 33, 1]])
    with torch.no_grad():
        assert torch.equal(model(ids), ours(ids))
    with pytest.raises(ValueError, match="unexpected key"):
        official_keys_to_hf({**official, "blocks.0.attn.bogus.weight": torch.zeros(1)})


def test_encode_text_zeroes_padding(hf_pair, tokenizer: Tokenizer) -> None:
    _, ours = hf_pair
    cond = encode_text(ours, tokenizer, [SHORT, LONG])
    assert cond.shape == (2, 512, 64) and cond.dtype == torch.float32
    ids, mask, _ = tokenizer.encode([SHORT, LONG], max_len=512)
    with torch.no_grad():
        full = ours(ids, mask)  # all 512 positions, as ComfyUI runs it
    for row in range(2):
        k = int(mask[row].sum())
        assert cond[row, k:].eq(0).all()
        assert cond[row, :k].abs().sum(-1).gt(0).all()
        assert rel_err(cond[row, :k], full[row, :k]) < 1e-6  # trimming to the longest prompt is exact
    small = encode_text(ours, tokenizer, SHORT, text_len=16)
    assert small.shape == (1, 16, 64)


def test_encode_text_truncation_warns(hf_pair, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    _, ours = hf_pair
    with caplog.at_level("WARNING"):
        out = encode_text(ours, tokenizer, [LONG], text_len=20)
    assert out.shape == (1, 20, 64) and out[0].abs().sum(-1).gt(0).all()
    assert "truncated" in caplog.text


def test_building_the_encoder_does_not_import_dynamo() -> None:
    """A process that never compiles must not pay for importing Dynamo (1.6 s here, about
    4 s on a fresh GPU install): nn.Embedding's own init on the meta device did that."""
    from helpers_models import dynamo_after

    code = (
        "import torch\n"
        "from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder\n"
        "cfg = TextEncoderConfig(vocab=64, dim=32, dim_ff=64, heads=2, d_kv=16, layers=2)\n"
        "with torch.device('meta'):\n"
        "    UMT5Encoder(cfg)"
    )
    assert dynamo_after(code) == "clean"
