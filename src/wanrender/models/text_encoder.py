"""The UMT5-XXL text encoder Wan 2.2 conditions on, and its SentencePiece tokenizer.

This is the encoder half of ``google/umt5-xxl``: pre-norm T5 blocks with a gated
GELU(tanh) feed-forward, scale-only RMS norms, unscaled dot-product attention and
(unlike T5, where only block 0 owns one) a separate bucketed relative-position
bias table in *every* block.

Parameter names follow the Hugging Face / ComfyUI layout (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight`` ...) because that is what the
widely shared ``umt5_xxl_fp16`` / ``umt5_xxl_fp8_e4m3fn_scaled`` files hold;
``official_keys_to_hf`` renames the official Wan ``.pth`` layout onto it and
``normalize_state_dict`` accepts any of them.

Padding convention (checked against ComfyUI and the official Wan code): the DiT
receives ``[B, 512, dim]`` whose positions after each prompt's EOS are exactly 0.
ComfyUI pads tokens to 512, masks the pads in attention and multiplies the output
by the mask (``zero_out_masked``); official Wan trims the output to the real length
and its DiT zero-pads back to 512. ``encode_text`` produces that tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from wanrender.errors import ModelFileError, WanrenderError
from wanrender.models.common import Linear, is_fp8

if TYPE_CHECKING:
    import numpy as np
    import sentencepiece

log = logging.getLogger(__name__)

# T5 vocabulary conventions, shared by every T5/UMT5 SentencePiece model.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab: int = 256384
    dim: int = 4096
    dim_ff: int = 10240
    heads: int = 64
    d_kv: int = 64
    layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "dim_ff", "heads", "d_kv", "layers", "max_distance", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        # The bidirectional bucketing splits the buckets in two halves, and each
        # half again into exact and log-spaced bins.
        if self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a multiple of 4, got {self.num_buckets}")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.d_kv

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TextEncoderConfig:
        """A named preset, optionally with fields replaced (e.g. ``dim=32`` for a demo DiT)."""
        if name not in PRESETS:
            raise ValueError(f"unknown text-encoder preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> TextEncoderConfig:
        """Read the sizes off a normalised (HF-layout) state dict.

        ``max_distance`` and ``eps`` are not recoverable from shapes; they keep the
        UMT5 values unless overridden.
        """
        try:
            vocab, dim = sd["shared.weight"].shape
            prefix = "encoder.block.0.layer."
            num_buckets, heads = sd[prefix + "0.SelfAttention.relative_attention_bias.weight"].shape
            inner = sd[prefix + "0.SelfAttention.q.weight"].shape[0]
            dim_ff = sd[prefix + "1.DenseReluDense.wi_0.weight"].shape[0]
        except KeyError as err:
            raise ValueError(f"not a UMT5 encoder state dict: missing {err}") from None
        ids = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
        fields: dict[str, Any] = dict(
            vocab=vocab,
            dim=dim,
            dim_ff=dim_ff,
            heads=heads,
            d_kv=inner // heads,
            layers=max(ids) + 1,
            num_buckets=num_buckets,
        )
        fields.update(overrides)
        return cls(**fields)


PRESETS: dict[str, TextEncoderConfig] = {
    "umt5-xxl": TextEncoderConfig(),
    # Tiny stand-in for tests and the demo pipeline; its vocabulary fits the
    # throw-away SentencePiece models the tests train (<= 1000 pieces).
    "demo": TextEncoderConfig(vocab=1000, dim=64, dim_ff=128, heads=4, d_kv=16, layers=2),
}


# --------------------------------------------------------------------------- layers


class T5Norm(nn.Module):
    """Scale-only RMS norm (no mean subtraction, no bias) evaluated in fp32.

    The statistics must be fp32: the T5 residual stream reaches magnitudes where
    a bf16/fp16 mean of squares loses most of its precision.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class TokenEmbedding(nn.Module):
    """Embedding table that may be stored in fp8 (with an optional scale), like ``Linear``."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim), requires_grad=False)
        self.weight_scale: torch.Tensor | None
        self.register_buffer("weight_scale", None)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Gather first, then convert: the 256k x 4096 table is never copied whole.
        x = self.weight[ids].to(dtype)
        if self.weight_scale is not None:
            scale = self.weight_scale
            if scale.ndim == 2 and scale.shape[0] == self.weight.shape[0]:
                scale = scale[ids]  # per-row scale [vocab, 1]
            x = x * scale.to(dtype)
        if is_fp8(self.weight.dtype):
            # e4m3fn has no inf: values that overflowed when the table was cast
            # were stored as NaN. ComfyUI zeroes them too (its "fp8 T5" fix).
            x = torch.nan_to_num(x)
        return x


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """Bidirectional T5 bucket index for every (query, key) pair: ``[length, length]`` long.

    Half of the buckets are for keys after the query, half for keys at or before
    it. Within a half, small distances get one bucket each and larger ones share
    log-spaced buckets up to ``max_distance``, beyond which they all share the last.
    The log is taken in float32 in the same order as Mesh-TensorFlow so the bin
    edges fall on exactly the integers the model was trained with.
    """
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]  # key position minus query position
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep an fp16 residual stream finite, as the reference does.

    Some UMT5 feed-forward outputs exceed fp16's 65504; one inf in the residual
    stream turns every later norm into NaN. The reference clamps to max-1000 when
    an inf appears; clamping finite values to max is a no-op, so the sync-free
    form below gives the same numbers. bf16/fp32 never need it.
    """
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000.0, big).to(x.dtype)
    return torch.clamp(x, min=-limit, max=limit)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.d_kv = cfg.d_kv
        self.q = Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.k = Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.v = Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.o = Linear(cfg.inner_dim, cfg.dim, bias=False)
        # An empty table given, not initialised: nn.Embedding's normal_ init on the meta
        # device goes through torch's reference ops, which import all of Dynamo (1.6 s
        # here, about 4 s on a fresh install) in a process that never compiles.
        table = torch.empty(cfg.num_buckets, cfg.heads)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads, _weight=table, _freeze=True)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # No 1/sqrt(d_kv): T5 folds that factor into the initialisation of q, so
        # the trained weights expect raw dot products. Raw products can exceed
        # fp16's range, hence scores (and the softmax) in fp32 whatever the
        # compute dtype; at <= 512 tokens this costs little.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
        bias = self.relative_attention_bias.weight.float()[buckets]  # [n, n, heads]
        scores = scores + bias.permute(2, 0, 1).unsqueeze(0) + mask_bias
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, self.heads * self.d_kv)
        return self.o(out)


class GatedFeedForward(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.wi_0 = Linear(cfg.dim, cfg.dim_ff, bias=False)  # gate branch (through GELU)
        self.wi_1 = Linear(cfg.dim, cfg.dim_ff, bias=False)  # linear branch
        self.wo = Linear(cfg.dim_ff, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


# The CamelCase attribute names below exist only to reproduce the checkpoint keys.


class _AttentionSublayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.SelfAttention = SelfAttention(cfg)
        self.layer_norm = T5Norm(cfg.dim, cfg.eps)


class _FeedForwardSublayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.DenseReluDense = GatedFeedForward(cfg)
        self.layer_norm = T5Norm(cfg.dim, cfg.eps)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_AttentionSublayer(cfg), _FeedForwardSublayer(cfg)])

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = _clamp_fp16(x + attn.SelfAttention(attn.layer_norm(x), buckets, mask_bias))
        return _clamp_fp16(x + ff.DenseReluDense(ff.layer_norm(x)))


class _EncoderStack(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.block = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.layers)])
        self.final_layer_norm = T5Norm(cfg.dim, cfg.eps)


class UMT5Encoder(nn.Module):
    """UMT5 encoder: ``forward(ids, mask) -> last hidden state [B, L, dim]``.

    Weights keep the dtype they were loaded in (fp8 stays fp8); activations run in
    ``compute_dtype``. The default fp32 matches ComfyUI, which runs this encoder
    with fp32 activations and casts weights on use; the encoder runs once per
    prompt, so the extra cost is small next to the DiT. bf16 also works; fp16 is
    protected by the reference's overflow clamp.
    Build big models on the meta device (``from_state_dict`` does) so the fp32
    placeholder parameters are never allocated.
    """

    def __init__(self, config: TextEncoderConfig, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.shared = TokenEmbedding(config.vocab, config.dim)
        self.encoder = _EncoderStack(config)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Hidden states for every position, pads included (``encode_text`` zeroes them)."""
        dtype = dtype or self.compute_dtype
        cfg = self.config
        x = self.shared(input_ids, dtype)
        # Buckets depend only on the length: compute once, each block looks up its own table.
        buckets = relative_position_buckets(input_ids.shape[1], cfg.num_buckets, cfg.max_distance, input_ids.device)
        if attention_mask is None:
            mask_bias = torch.zeros((), device=x.device)
        else:
            # A large finite negative (not -inf) so a fully masked row stays finite.
            keep = attention_mask.to(x.device).bool()[:, None, None, :]
            mask_bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        for block in self.encoder.block:
            x = block(x, buckets, mask_bias)
        return self.encoder.final_layer_norm(x)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        config: TextEncoderConfig | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> UMT5Encoder:
        """Build an encoder around the tensors of ``sd`` (any supported layout), without copying them.

        The tensors are adopted as they are (``assign=True``), so an fp8 file stays
        fp8 in memory and tensors on the GPU stay there.
        """
        sd = normalize_state_dict(sd)
        config = config or TextEncoderConfig.from_state_dict(sd)
        scales = {k: sd.pop(k) for k in [k for k in sd if k.endswith(".weight_scale")]}
        with torch.device("meta"):
            model = cls(config, compute_dtype)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"UMT5 state dict does not fit {config}: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
        for key, scale in scales.items():
            owner = model.get_submodule(key.removesuffix(".weight_scale"))
            if not isinstance(owner, (Linear, TokenEmbedding)):
                raise ValueError(f"scale {key!r} belongs to a layer that cannot be scaled")
            owner.weight_scale = scale
        return model.requires_grad_(False).eval()


# --------------------------------------------------------------------------- keys

_OFFICIAL_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Official FFN is fc1(x) * gate(x) with gate = Linear + GELU, i.e. gate.0 is
    # the GELU branch (HF wi_0) and fc1 the linear branch (HF wi_1).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_OFFICIAL_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}


def official_keys_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official Wan ``models_t5_umt5-xxl-enc-bf16.pth`` keys to the HF/ComfyUI layout.

    Tensors are not copied. Unknown keys raise, so a file of another kind is not
    half-loaded.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _OFFICIAL_TOP_KEYS:
            out[_OFFICIAL_TOP_KEYS[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None or m.group(2) not in _OFFICIAL_BLOCK_KEYS:
            raise ValueError(f"unexpected key {key!r} in an official Wan UMT5 state dict")
        out[f"encoder.block.{m.group(1)}.{_OFFICIAL_BLOCK_KEYS[m.group(2)]}"] = value
    return out


# Keys text-encoder files carry that are not encoder weights.
_IGNORED_KEYS = {"scaled_fp8", "spiece_model", "lm_head.weight"}


def normalize_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring any supported UMT5 state dict to the HF layout this module uses.

    Handles: the official Wan layout; ``encoder.embed_tokens.weight`` as the
    embedding; ComfyUI fp8-scaled files (``*.scale_weight`` -> ``*.weight_scale``;
    ``*.scale_input`` and the ``scaled_fp8`` marker dropped, since we dequantise
    weights rather than run fp8 matmuls); decoder weights and the embedded
    tokenizer (``spiece_model``) are dropped.
    """
    if any(k.startswith("blocks.") or k == "token_embedding.weight" for k in sd):
        sd = official_keys_to_hf(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _IGNORED_KEYS or key.startswith("decoder.") or key.endswith(".scale_input"):
            continue
        if key.endswith(".scale_weight"):
            key = key.removesuffix(".scale_weight") + ".weight_scale"
        out[key] = value
    embed = out.pop("encoder.embed_tokens.weight", None)
    if embed is not None:
        out.setdefault("shared.weight", embed)
    scale = out.pop("encoder.embed_tokens.weight_scale", None)
    if scale is not None:
        out.setdefault("shared.weight_scale", scale)
    return out


# --------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """The UMT5 SentencePiece tokenizer with T5's conventions (EOS appended, pad 0).

    Wraps the ``sentencepiece`` library directly; no text cleaning is applied
    (ComfyUI applies none; official Wan also unescapes HTML and runs ``ftfy``,
    which only matters for mojibake or ``&amp;``-style prompts).
    """

    def __init__(self, processor: sentencepiece.SentencePieceProcessor) -> None:
        self.sp = processor
        # T5 models define pad/eos in the model proto; fall back to the T5 ids.
        self.eos_id = processor.eos_id() if processor.eos_id() >= 0 else EOS_ID
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else PAD_ID

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(path, "tokenizer file not found", "pass the path of spiece.model")
        try:
            proc = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ModelFileError(
                path, f"not a SentencePiece model ({err})", "pass the spiece.model of google/umt5-xxl"
            ) from None
        return cls(proc)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | torch.Tensor | np.ndarray) -> Tokenizer:
        """From a serialized model, e.g. the uint8 ``spiece_model`` tensor of ComfyUI text-encoder files."""
        import sentencepiece

        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            data = data.tobytes()  # numpy array
        try:
            proc = sentencepiece.SentencePieceProcessor(model_proto=bytes(data))
        except RuntimeError as err:
            raise ValueError(f"bytes are not a serialized SentencePiece model ({err})") from None
        return cls(proc)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """From a Hugging Face tokenizer folder; needs its ``spiece.model``."""
        directory = Path(directory)
        spiece = directory / "spiece.model"
        if spiece.is_file():
            return cls.from_file(spiece)
        if (directory / "tokenizer.json").is_file():
            raise ModelFileError(
                directory,
                "has only tokenizer.json, which this SentencePiece tokenizer cannot read",
                "add spiece.model (the SentencePiece model from google/umt5-xxl) to the folder",
            )
        raise ModelFileError(directory, "no spiece.model in this folder", "point at the umt5-xxl tokenizer folder")

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def serialized(self) -> bytes:
        return bytes(self.sp.serialized_model_proto())

    def encode(self, prompts: Sequence[str] | str, max_len: int = 512) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Token ids ``[B, max_len]`` (EOS appended, padded with 0), mask ``[B, max_len]`` and,
        per prompt, whether it was truncated (to ``max_len - 1`` tokens + EOS, like
        the official Wan tokenizer) so the caller can warn.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if isinstance(prompts, str):
            prompts = [prompts]
        pieces: list[list[int]] = self.sp.encode(list(prompts), out_type=int)
        ids = torch.full((len(pieces), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), max_len), dtype=torch.long)
        truncated: list[bool] = []
        for row, toks in enumerate(pieces):
            truncated.append(len(toks) + 1 > max_len)
            toks = toks[: max_len - 1] + [self.eos_id]
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, : len(toks)] = 1
        return ids, mask, truncated


# --------------------------------------------------------------------------- conditioning


def encode_text(
    encoder: UMT5Encoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | str,
    text_len: int | None = None,
) -> torch.Tensor:
    """The DiT's text conditioning: ``[B, text_len, dim]``, zero after each prompt's EOS.

    Over-long prompts are truncated (with a warning), as in official Wan.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    text_len = text_len or encoder.config.text_len
    ids, mask, truncated = tokenizer.encode(prompts, max_len=text_len)
    for prompt, cut in zip(prompts, truncated):
        if cut:
            log.warning("prompt longer than %d tokens was truncated: %.60r...", text_len, prompt)
    if int(ids.max()) >= encoder.config.vocab:
        raise WanrenderError(
            f"tokenizer produced id {int(ids.max())} but the encoder has only {encoder.config.vocab} "
            "embeddings — the tokenizer and text-encoder files do not belong together; use the umt5 pair"
        )
    # Run only up to the longest prompt: pads are masked out of attention (their
    # weight is exactly 0) and T5 has no absolute positions, so later positions
    # cannot change the real ones, and their outputs are zeroed anyway. A typical
    # prompt is ~10x shorter than 512, so this saves most of the encoder's work.
    n = int(mask.sum(dim=1).max())
    device = encoder.device
    ids, mask = ids[:, :n].to(device), mask[:, :n].to(device)
    # no_grad rather than inference_mode: callers may modify the result in place.
    with torch.no_grad():
        hidden = encoder(ids, mask)
        out = hidden.new_zeros(hidden.shape[0], text_len, hidden.shape[2])
        out[:, :n] = hidden * mask[..., None].to(hidden.dtype)
    return out
