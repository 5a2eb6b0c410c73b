"""The Wan 2.x diffusion transformer (one expert of I2V-A14B / T2V-A14B).

Parameter names follow the official Wan layout (``blocks.N.self_attn.q`` ...), the
lingua franca of ComfyUI/official checkpoints and LoRAs, so those load unrenamed.
``official_keys_from_diffusers`` maps a diffusers ``WanTransformer3DModel`` state
dict onto it.

Numeric islands (as in the reference): the residual stream, adaLN modulation, the
gates, the time embedding, RoPE and the output head run in fp32; the heavy linear
layers and attention run in ``compute_dtype`` (bf16 on GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wanrender.models.common import FP32LayerNorm, Linear, RMSNorm

# q, k, v: [B, L, H, D] -> [B, L, H, D]. Backends (kernels/attention) replace it.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention: PyTorch SDPA in the [B, L, H, D] layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_channels: int = 36
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = 512
    rope_theta: float = 10000.0
    rope_max_len: int = 1024

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        # I2V experts take 16 noise + 4 mask + 16 image-latent channels.
        return self.in_channels == self.out_channels + 4 + self.out_channels

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or (self.head_dim // 6) < 1:
            raise ValueError(f"head_dim {self.head_dim} is too small or odd for 3-D RoPE")

    @staticmethod
    def preset(name: str) -> DiTConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @staticmethod
    def from_dict(d: dict) -> DiTConfig:
        fields = {k: v for k, v in d.items() if k in DiTConfig.__dataclass_fields__}
        if "patch_size" in fields:
            fields["patch_size"] = tuple(fields["patch_size"])
        return DiTConfig(**fields)


PRESETS: dict[str, DiTConfig] = {
    "i2v-A14B": DiTConfig(),
    "t2v-A14B": DiTConfig(in_channels=16),
    # Same architecture, tiny: for tests and the embedded demo (random weights).
    "demo": DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64),
}


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] timestep embedding, computed in float64 like the reference."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def rope_tables(cfg: DiTConfig, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Rotations for 3-D RoPE over a (frames, height, width) token grid.

    The head dim is split into frame/height/width parts (44/42/42 for head dim 128);
    angles are computed in float64 like the reference. Returns float32
    ``[L, 1, head_dim // 2, 2]``: (cos, sin) per interleaved channel pair, real so the
    compiled block sees no complex tensor (Inductor cannot generate code for one).
    """
    d = cfg.head_dim
    parts = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    f, h, w = grid
    angles = []
    for n, size in zip(grid, parts):
        inv = 1.0 / torch.pow(cfg.rope_theta, torch.arange(0, size, 2, dtype=torch.float64, device=device) / size)
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv))
    a = torch.cat(
        [
            angles[0][:, None, None, :].expand(f, h, w, -1),
            angles[1][None, :, None, :].expand(f, h, w, -1),
            angles[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return torch.view_as_real(torch.polar(torch.ones_like(a), a).to(torch.complex64)).contiguous()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (even, odd) channel pairs of x [B, L, H, D] in fp32.

    Eager: one complex multiply, three passes over the tensor instead of eight.
    Compiled: Inductor has no code generation for complex ops (it falls back to eager
    and the qk norm cannot fuse with the rotation), so the same product in real
    arithmetic, which it fuses with the norm into one pass.
    """
    if torch.compiler.is_compiling():
        return rope_real(x, rope)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.view_as_complex(rope)).flatten(-2).type_as(x)


def rope_real(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in real arithmetic: (a + ib)(c + is) = (ac - bs) + i(as + bc)."""
    x2 = x.float().unflatten(-1, (-1, 2))
    a, b = x2[..., 0], x2[..., 1]
    c, s = rope[..., 0], rope[..., 1]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Self-attention (with RoPE) when ``context`` is None, else cross-attention to it."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = Linear(cfg.dim, cfg.dim)
        self.k = Linear(cfg.dim, cfg.dim)
        self.v = Linear(cfg.dim, cfg.dim)
        self.o = Linear(cfg.dim, cfg.dim)
        # qk RMSNorm over the whole dim (across heads), not per head.
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)
        # A fused norm + rotation the runtime may set (kernels/qk_norm.py): (y, norm, rope,
        # reference) -> result, or None where it does not apply. None keeps the ops.
        self.norm_rope: Callable | None = None

    def forward(
        self, x: torch.Tensor, attn: AttentionFn, rope: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        kv = x if context is None else context
        q = self.query(x, rope)
        k, v = self.key_value(kv, rope)
        return self.out(attn(q, k, v))

    # The steps of forward, also run piecewise by Block's chunked path (``rope``: the
    # rows of the tokens given).
    def query(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        return self._norm_rope(self.q(x), self.norm_q, rope)

    def key_value(self, kv: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._norm_rope(self.k(kv), self.norm_k, rope)
        return k, self.v(kv).unflatten(-1, (self.num_heads, -1))

    def _norm_rope(self, y: torch.Tensor, norm: RMSNorm, rope: torch.Tensor | None) -> torch.Tensor:
        if self.norm_rope is not None:
            fused = self.norm_rope(y, norm, rope, lambda t: self._plain_norm_rope(t, norm, rope))
            if fused is not None:
                return fused.unflatten(-1, (self.num_heads, -1))
        return self._plain_norm_rope(y, norm, rope)

    def _plain_norm_rope(self, y: torch.Tensor, norm: RMSNorm, rope: torch.Tensor | None) -> torch.Tensor:
        h = norm(y).unflatten(-1, (self.num_heads, -1))
        return h if rope is None else apply_rope(h, rope[: h.shape[-3]])

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.o(attended.flatten(-2))


class FeedForward(nn.Sequential):
    def __init__(self, cfg: DiTConfig) -> None:
        # Indices 0 and 2 match the checkpoint keys ffn.0 / ffn.2.
        super().__init__(Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, cfg.dim))


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: normed * (1 + scale) + shift, in fp32."""
    return torch.addcmul(shift, normed, 1 + scale)


def _spans(n: int, chunks: int) -> list[tuple[int, int]]:
    step = -(-n // chunks)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(cfg)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(cfg)
        self.norm2 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(cfg)
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim), requires_grad=False)
        # A fused LayerNorm + modulation + cast the runtime may set (kernels/ln_mod.py):
        # (x, norm, shift, scale, dtype, reference) -> result, or None. None keeps the ops.
        self.norm_mod: Callable | None = None

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        rope: torch.Tensor,
        attn: AttentionFn,
        compute_dtype: torch.dtype,
        chunks: int = 1,
        cross_attn: AttentionFn | None = None,
    ) -> torch.Tensor:
        """``chunks`` > 1 runs the token-wise work in that many sequence pieces to lower
        peak activation memory, and then updates ``x`` in place (see ``_forward_chunked``).
        ``cross_attn`` (default: ``attn``) lets sequence parallelism (parallel/ulysses.py)
        exchange tokens around the self-attention only: its queries are sharded but the
        text keys are not."""
        cross_attn = attn if cross_attn is None else cross_attn
        # x: fp32 residual [B, L, dim]; e: fp32 time projection [B, 6, dim].
        # Modulation and gates stay fp32: bf16 gates visibly shift colours.
        mod = (self.modulation.float() + e).unsqueeze(2).unbind(1)
        if chunks > 1:  # a Python int: a compiled block specialises on it, no graph break
            return self._forward_chunked(x, mod, context, rope, attn, compute_dtype, chunks, cross_attn)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod
        # addcmul: modulate / gate-and-add in one pass each (the residual is 1.7 GB at 81 frames).
        h = self._normed(self.norm1, x, shift_a, scale_a, compute_dtype)
        x = torch.addcmul(x, self.self_attn(h, attn, rope=rope), gate_a)
        x = x + self.cross_attn(self._normed(self.norm3, x, None, None, compute_dtype), cross_attn, context=context)
        h = self._normed(self.norm2, x, shift_f, scale_f, compute_dtype)
        return torch.addcmul(x, self.ffn(h), gate_f)

    def _normed(self, norm: FP32LayerNorm, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """``norm(x)``, modulated when ``shift`` is given, in ``dtype``."""
        if self.norm_mod is not None:
            fused = self.norm_mod(
                x, norm, shift, scale, dtype, lambda t: self._plain_normed(norm, t, shift, scale, dtype)
            )
            if fused is not None:
                return fused
        return self._plain_normed(norm, x, shift, scale, dtype)

    @staticmethod
    def _plain_normed(norm: FP32LayerNorm, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        y = norm(x)
        return (y if shift is None else modulate(y, shift, scale)).to(dtype)

    def _forward_chunked(
        self,
        x: torch.Tensor,
        mod: tuple[torch.Tensor, ...],
        context: torch.Tensor,
        rope: torch.Tensor,
        attn: AttentionFn,
        compute_dtype: torch.dtype,
        chunks: int,
        cross_attn: AttentionFn,
    ) -> torch.Tensor:
        """``forward`` with the token-wise work (modulation, projections, norms, RoPE,
        FFN, cross-attention) in sequence chunks. Only K and V of the self-attention
        span the whole sequence; queries are chunked, which leaves every attention row
        unchanged. Updates ``x`` in place rather than holding a second residual (the
        DiT's block loop owns the residual stream and rebinds it to the result)."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod
        sa, ca = self.self_attn, self.cross_attn
        spans = _spans(x.shape[1], chunks)
        # Pass 1: K and V of the whole sequence (attention needs all of them).
        k = v = None
        for s, t in spans:
            kc, vc = sa.key_value(self._normed(self.norm1, x[:, s:t], shift_a, scale_a, compute_dtype), rope[s:t])
            if k is None:
                k = kc.new_empty(x.shape[0], x.shape[1], *kc.shape[2:])
                v = vc.new_empty(x.shape[0], x.shape[1], *vc.shape[2:])
            k[:, s:t], v[:, s:t] = kc, vc
            del kc, vc
        # Pass 2: queries, attention, output and residual per chunk. Every attention row
        # sees all keys; updating x[s:t] cannot affect a later chunk's queries (token-wise).
        for s, t in spans:
            q = sa.query(self._normed(self.norm1, x[:, s:t], shift_a, scale_a, compute_dtype), rope[s:t])
            x[:, s:t] = torch.addcmul(x[:, s:t], sa.out(attn(q, k, v)), gate_a)
            del q
        del k, v
        ck, cv = ca.key_value(context)
        for s, t in spans:
            q = ca.query(self._normed(self.norm3, x[:, s:t], None, None, compute_dtype))
            x[:, s:t] = x[:, s:t] + ca.out(cross_attn(q, ck, cv))
            h = self._normed(self.norm2, x[:, s:t], shift_f, scale_f, compute_dtype)
            x[:, s:t] = torch.addcmul(x[:, s:t], self.ffn(h), gate_f)
        return x


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim), requires_grad=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + temb[:, None]).unsqueeze(2).unbind(1)
        # Small (dim -> 64) and output-defining: run it in fp32.
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """One Wan expert. ``forward(x, t, context)`` predicts the flow velocity."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype: torch.dtype = torch.float32
        self.attention: AttentionFn = sdpa_attention
        # Optional: blocks -> the callables to run in their place, in order. The memory
        # runtime (runtime/streaming.py) sets it to stream weights in or chunk the work;
        # None runs self.blocks as they are.
        self.block_source: Callable[[nn.ModuleList], Iterable[Callable[..., torch.Tensor]]] | None = None
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        for p in self.patch_embedding.parameters():
            p.requires_grad_(False)
        self.text_embedding = nn.Sequential(
            Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(time embedding [B, dim], block modulation [B, 6, dim]), both fp32."""
        temb = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim))
        return temb, self.time_projection(temb).unflatten(1, (6, self.cfg.dim))

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        return self.text_embedding(context.to(self.compute_dtype))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, F, H, W] noisy latent; t [B] timesteps (sigma * 1000);
        context [B, L, text_dim] text encoder output; cond [B, 20, F, H, W] the
        I2V mask + image latent (concatenated after x). Returns [B, out, F, H, W] fp32.
        """
        tokens, grid = self.embed_tokens(x, cond)
        rope = rope_tables(self.cfg, grid, x.device)
        temb, e = self.embed_time(t.to(x.device).float().expand(tokens.shape[0]))
        ctx = self.embed_text(context)
        for block in self.blocks if self.block_source is None else self.block_source(self.blocks):
            tokens = block(tokens, e, ctx, rope, self.attention, self.compute_dtype)
        out = self.head(tokens, temb)
        return unpatchify(out, grid, self.cfg.patch_size, self.cfg.out_channels)

    def embed_tokens(
        self, x: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The patch embedding: (fp32 tokens [B, L, dim], the token grid (frames, height, width))."""
        cfg = self.cfg
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"DiT expects {cfg.in_channels} input channels, got {x.shape[1]}"
                + (" (an I2V expert needs the image condition)" if cfg.is_i2v and cond is None else "")
            )
        _, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {(f, h, w)} is not a multiple of the patch size {cfg.patch_size}")
        grid = (f // pt, h // ph, w // pw)

        pe, cd = self.patch_embedding, self.compute_dtype
        bias = pe.bias.to(cd) if pe.bias is not None else None
        tokens = F.conv3d(x.to(cd), pe.weight.to(cd), bias, stride=cfg.patch_size)
        return tokens.flatten(2).transpose(1, 2).float(), grid


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], c: int) -> torch.Tensor:
    """[B, L, pt*ph*pw*C] (channels innermost) -> [B, C, F*pt, H*ph, W*pw]."""
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    x = x.reshape(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, f * pt, h * ph, w * pw)


# diffusers WanTransformer3DModel name -> official name. Note the swap: diffusers'
# affine cross-attention norm is ``norm2``; the official one is ``norm3``.
_DIFFUSERS_BLOCK_RENAMES = (
    ("attn1.to_q.", "self_attn.q."),
    ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn1.norm_q.", "self_attn.norm_q."),
    ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."),
    ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    ("norm2.", "norm3."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
)
_DIFFUSERS_TOP_RENAMES = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
    ("patch_embedding.", "patch_embedding."),
)


def official_key_from_diffusers(key: str) -> str | None:
    """The official name of one diffusers key, or None if it has no counterpart."""
    if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        for old, new in _DIFFUSERS_BLOCK_RENAMES:
            if rest.startswith(old):
                return f"blocks.{idx}.{new}{rest[len(old) :]}"
        return None
    for old, new in _DIFFUSERS_TOP_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def official_keys_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name = official_key_from_diffusers(k)
        if name is None:
            raise KeyError(f"diffusers key {k!r} has no counterpart in the Wan 2.2 DiT")
        out[name] = v
    return out


def config_from_diffusers(d: dict) -> DiTConfig:
    heads = int(d.get("num_attention_heads", 40))
    return DiTConfig(
        dim=heads * int(d.get("attention_head_dim", 128)),
        ffn_dim=int(d.get("ffn_dim", 13824)),
        num_heads=heads,
        num_layers=int(d.get("num_layers", 40)),
        in_channels=int(d.get("in_channels", 16)),
        out_channels=int(d.get("out_channels", 16)),
        text_dim=int(d.get("text_dim", 4096)),
        freq_dim=int(d.get("freq_dim", 256)),
        patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        eps=float(d.get("eps", 1e-6)),
    )


def config_from_state_dict(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> DiTConfig:
    """Infer the architecture from tensor shapes (official key names).

    The head count is not visible in the shapes; Wan uses head dim 128.
    """
    pe = shapes["patch_embedding.weight"]
    dim, in_ch = pe[0], pe[1]
    patch = tuple(pe[2:5])
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    out_ch = shapes["head.head.weight"][0] // math.prod(patch)
    return DiTConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=num_heads or max(1, dim // 128),
        num_layers=layers,
        in_channels=in_ch,
        out_channels=out_ch,
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        patch_size=patch,  # type: ignore[arg-type]
    )
