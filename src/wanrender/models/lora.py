"""LoRAs for the Wan 2.2 DiT: read every dialect seen in the wild, merge or apply at run time.

Dialects (all normalised onto the official parameter names of ``dit.WanDiT``):

* low-rank pairs ``<m>.lora_down.weight`` / ``<m>.lora_up.weight`` (kohya, ComfyUI,
  lightx2v, musubi-tuner) with an optional ``<m>.alpha`` (scale ``alpha / rank``,
  no alpha: 1), and PEFT ``lora_A`` / ``lora_B`` (also ``.lora_A.default.weight``);
  PEFT files without alpha keys may carry ``lora_alpha`` / ``r`` in the diffusers
  ``lora_adapter_metadata`` safetensors header, which is honoured;
* full differences ``<m>.diff`` (weights, also norms and the patch-embedding conv),
  bias differences ``<m>.diff_b`` (and PEFT's ``lora_B.bias``), and modulation
  differences ``<owner>.diff_m`` where the owner is ``blocks.N`` or ``head`` and the
  target is ``<owner>.modulation`` (lightx2v's extractor writes ``blocks.N.modulation``
  as ``blocks.N.diff_m``; ComfyUI's own loader ignores these keys, kijai's wrapper
  renames them to ``.modulation.diff``, which is accepted too);
* module names official (``blocks.0.self_attn.q``) or diffusers
  (``blocks.0.attn1.to_q``), dotted or kohya-underscored (``lora_unet_blocks_0_...``,
  Wan-Fun's ``lora_unet__blocks_0_...``), behind any of the prefixes
  ``diffusion_model.``, ``model.diffusion_model.``, ``transformer.``,
  ``base_model.model.`` (and a few rarer ones).

Underscored names cannot be turned back into dotted ones by a replace (``self_attn``,
``norm_q``, ``time_embedding`` hold underscores), so every name is looked up in a
table built from the model's own parameter owners; a longer name never falls back to
a shorter one (``cross_attn.k_img`` is not ``cross_attn.k``).

Wan 2.1 I2V LoRAs also train the CLIP image branch (``k_img``, ``v_img``,
``norm_k_img``, ``img_emb``), which Wan 2.2 does not have: those keys are reported as
expected misses, not errors.

One strength per expert: parse once (both experts share one architecture) and call
``apply_lora`` on each expert with its own strength, e.g.
``apply_lora(high, lora, 1.0); apply_lora(low, lora, 0.5)``.

``mode="merge"`` folds ``strength * delta`` into the weights in fp32 (fp8 weights are
dequantised, patched and requantised with a fresh per-tensor scale). e4m3 keeps 3
mantissa bits, so round-to-nearest would drop most of a typical LoRA delta (~1% of
W: requantisation error ~0.9x the delta); the requantisation therefore rounds
stochastically (seeded by the tensor name, as ComfyUI does when it patches fp8
weights), which keeps the delta on average at the cost of fp8-sized noise. For an
exact result on fp8 experts use ``unmerged``. ``"unmerged"``
leaves Linear weights untouched and adds the low-rank term at run time through
``common.Linear.adapters``; the other targets (biases, modulation, norms, the
patch-embedding conv) are small and are merged even then, but their original tensors
are recorded in a caller-held ``LoraUndo`` so that ``remove_lora`` restores them. Apply unmerged LoRAs after moving the
model to its device: the adapters are placed on the weights' device at apply time.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from wanrender.errors import ModelFileError
from wanrender.models.common import Linear, RuntimeAdapter, is_fp8, quantize_fp8, set_tensor
from wanrender.models.dit import _DIFFUSERS_BLOCK_RENAMES, _DIFFUSERS_TOP_RENAMES, official_key_from_diffusers
from wanrender.models.safetensors_io import open_checkpoint

# Stripped repeatedly, longest first, so ``base_model.model.transformer.`` also works.
_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "pipe.dit.",
    "dit.",
    "unet.",
    "model.",
    "lora_unet__",  # Wan-Fun LoRAs
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
)
# LoRA key suffix -> role.
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_B.bias", "bias_b"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
    (".diff", "diff"),
)
# Adapter types whose maths differs from W += s * up @ down: applying them as plain
# LoRA would be silently wrong, so they are refused.
_UNSUPPORTED = re.compile(
    r"\.(hada_\w+|lokr_\w+|dora_scale|lora_magnitude_vector(\.\w+)*|lora_mid\.weight|set_weight|w_norm|b_norm)$"
)
_WAN21_IMAGE = re.compile(
    r"(^|[._])(k_img|v_img|norm_k_img|img_emb|add_k_proj|add_v_proj|norm_added_k|image_embedder)([._]|$)"
)
_MODEL_SIZES = {1536: "Wan 2.1 T2V-1.3B", 3072: "Wan 2.2 TI2V-5B", 5120: "a Wan 14B model"}
_KIND_ORDER = ("lora", "diff", "diff_b", "diff_m")


@dataclass(frozen=True)
class LowRank:
    """``delta = scale * up @ down`` (up ``[out, r, ...]``, down ``[r, in, ...]``)."""

    key: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    kind: str = "lora"

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.scale


@dataclass(frozen=True)
class Diff:
    """A dense difference: ``diff`` (a weight), ``diff_b`` (a bias), ``diff_m`` (a modulation)."""

    key: str
    tensor: torch.Tensor
    kind: str
    scale: float = 1.0

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        return self.tensor.to(device=device, dtype=torch.float32).reshape(shape) * self.scale


Patch = LowRank | Diff
# (old e4m3fn weight, its scale or None, fp32 delta, seed) -> (new weight, new 0-d scale)
Fp8MergeFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LoraReport:
    """What a LoRA changed (or would change) in one model."""

    source: str
    num_keys: int
    matched: tuple[str, ...]  # our parameter names that get a patch
    kinds: tuple[tuple[str, int], ...]  # (patch kind, count)
    expected_misses: tuple[str, ...]  # Wan 2.1 image-branch keys: absent from Wan 2.2
    unmatched: tuple[str, ...]
    mode: str | None = None
    strength: float | None = None
    merged: tuple[str, ...] = ()
    runtime: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.kinds)
        parts = [f"{Path(self.source).name}: {len(self.matched)} tensors patched ({kinds})"]
        if self.expected_misses:
            parts.append(f"{len(self.expected_misses)} Wan 2.1 image-branch keys skipped (not in Wan 2.2)")
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} keys unmatched (e.g. {self.unmatched[0]})")
        if self.mode is not None:
            if self.strength == 0:
                parts.append("strength 0: nothing applied")
            elif self.mode == "merge":
                parts.append(f"merged at strength {self.strength:g}")
            else:
                parts.append(
                    f"unmerged at strength {self.strength:g}: {len(self.runtime)} at run time, "
                    f"{len(self.merged)} merged"
                )
        return "; ".join(parts)


@dataclass(frozen=True)
class Lora:
    source: str
    patches: Mapping[str, tuple[Patch, ...]]  # our parameter name -> patches
    report: LoraReport


# ----------------------------------------------------------------------------- names


def _diffusers_name(official: str) -> str | None:
    """The diffusers name of one official owner/parameter name (inverse of dit's table)."""
    if official.startswith("blocks."):
        parts = official.split(".", 2)
        if len(parts) < 3:
            return None
        head, table = f"blocks.{parts[1]}.", _DIFFUSERS_BLOCK_RENAMES
        rest = parts[2] + "."
    else:
        head, table, rest = "", _DIFFUSERS_TOP_RENAMES, official + "."
    for old, new in table:
        if rest.startswith(new):
            cand = (head + old + rest[len(new) :]).rstrip(".")
            # dit.py stays the single source of truth: keep only names it maps back.
            if official_key_from_diffusers(cand + ".weight") == official + ".weight":
                return cand
    return None


def _alias_table(model: nn.Module) -> dict[str, str | None]:
    """LoRA module name (official/diffusers, dotted/underscored) -> official name; None if ambiguous."""
    official: list[str] = []
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            if p_name in ("weight", "bias"):
                official.append(mod_name)
            else:  # modulation: addressed as ``<owner>.diff_m`` or ``<owner>.modulation.diff``
                official += [mod_name, f"{mod_name}.{p_name}" if mod_name else p_name]
    table: dict[str, str | None] = {}

    def add(alias: str, target: str, override: bool) -> None:
        if alias not in table:
            table[alias] = target
        elif override and table[alias] != target:
            table[alias] = None

    for name in dict.fromkeys(official):
        add(name, name, True)
        add(name.replace(".", "_"), name, True)
    for name in dict.fromkeys(official):
        d = _diffusers_name(name)
        if d is None:
            continue
        # ComfyUI also accepts diffusers' ``to_out`` without its ``.0``.
        for alias in {d, d.removesuffix(".0") if d.endswith(".to_out.0") else d}:
            add(alias, name, False)
            add(alias.replace(".", "_"), name, False)
    return table


def _split_key(key: str) -> tuple[str, str | None]:
    """(module stem without prefixes, role or None)."""
    stem, changed = key, True
    while changed:
        changed = False
        for p in _PREFIXES:
            if stem.startswith(p) and len(stem) > len(p):
                stem, changed = stem[len(p) :], True
                break
    for suffix, role in _SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)], role
    return stem, None


def _guess_family(keys: list[str]) -> str:
    text = " ".join(keys[:4000])
    if any(s in text for s in ("down_blocks", "up_blocks", "input_blocks", "output_blocks", "mid_block")):
        return "SDXL" if ("lora_te2" in text or "text_encoder_2" in text) else "Stable Diffusion (a UNet)"
    if "double_blocks" in text or "single_blocks" in text or "single_transformer_blocks" in text:
        return "HunyuanVideo" if "token_refiner" in text else "Flux"
    if "adaln_single" in text or "caption_projection" in text or "patchify_proj" in text:
        return "LTX-Video"
    if "img_mlp" in text and "txt_mlp" in text:
        return "Qwen-Image"
    if "vace_blocks" in text:
        return "Wan VACE"
    if "transformer_blocks" in text:
        return "another diffusion transformer (transformer_blocks.*)"
    if "lora_te" in text or "text_model" in text or "encoder.block" in text:
        return "a text encoder"
    if "self_attn" in text and "blocks" in text:
        return "a Wan model with other layer names or more blocks"
    return "an unknown model"


# ----------------------------------------------------------------------------- parsing


def _peft_config(meta: Mapping[str, str]) -> dict:
    """diffusers' ``lora_adapter_metadata`` header (keys bare or ``transformer.``-prefixed)."""
    try:
        conf = json.loads(meta.get("lora_adapter_metadata") or "{}")
    except (ValueError, TypeError, RecursionError):  # a hostile header string is ignored like a bad one
        return {}
    if not isinstance(conf, dict):
        return {}
    return {k.removeprefix("transformer."): v for k, v in conf.items()}


def _peft_scale(conf: dict, rank: int) -> float:
    # PEFT files carry no alpha tensors; without a header diffusers uses alpha = r (scale 1).
    alpha = conf.get("lora_alpha")
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if conf.get("use_rslora") else rank)


def parse_lora(source: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module) -> Lora:
    """Read a LoRA (a path or a name -> tensor mapping) and map it onto ``model``'s parameters.

    Raises ``ModelFileError`` when most keys fit nothing in the model (a LoRA for another
    model family), when an adapter type is unsupported, or when a shape does not fit.
    """
    if isinstance(source, Mapping):
        sd, name = source, str(getattr(source, "path", "<state dict>"))
    else:
        sd, name = open_checkpoint(source), str(source)
    peft = _peft_config(getattr(sd, "metadata", None) or {})
    params = dict(model.named_parameters())
    aliases = _alias_table(model)
    keys = list(sd)

    groups: dict[str, dict[str, str]] = {}  # official stem -> role -> LoRA key
    expected, unmatched, unsupported = [], [], []
    for key in keys:
        stem, role = _split_key(key)
        target = aliases.get(stem) if role else None
        if role is None and _UNSUPPORTED.search(key):
            unsupported.append(key)
        if target is None or role in groups.get(target, {}):
            (expected if _WAN21_IMAGE.search(stem) else unmatched).append(key)
            continue
        groups.setdefault(target, {})[role] = key

    patches: dict[str, list[Patch]] = {}
    for stem, roles in groups.items():
        weight = f"{stem}.weight" if f"{stem}.weight" in params else stem
        scale = 1.0
        if "down" in roles and "up" in roles:
            down, up = sd[roles["down"]], sd[roles["up"]]
            rank = down.shape[0]
            if "alpha" in roles:
                scale = float(sd[roles["alpha"]].float().item()) / rank
            else:
                scale = _peft_scale(peft, rank)
            patches.setdefault(weight, []).append(LowRank(roles["up"], down, up, scale))
        else:
            unmatched += [roles[r] for r in ("down", "up", "alpha") if r in roles]
        for role, kind, target in (
            ("diff", "diff", weight),
            ("diff_b", "diff_b", f"{stem}.bias"),
            ("bias_b", "diff_b", f"{stem}.bias"),
            ("diff_m", "diff_m", f"{stem}.modulation"),
        ):
            if role not in roles:
                continue
            if target not in params or (role == "bias_b" and "up" not in roles):
                unmatched.append(roles[role])
                continue
            # PEFT's lora_bias is the bias of lora_B, so the adapter's scaling applies to it.
            s = scale if role == "bias_b" else 1.0
            patches.setdefault(target, []).append(Diff(roles[role], sd[roles[role]], kind, s))

    _refuse_unsupported(name, unsupported, aliases)
    considered = len(keys) - len(expected)
    if not patches or len(unmatched) > 0.5 * considered:
        if not keys:
            what = "the file holds no tensors"
        elif considered == 0:
            what = "it holds only Wan 2.1 image-branch keys"
        else:
            what = f"it looks like {_guess_family(unmatched or keys)}"
        raise ModelFileError(
            name,
            f"not a LoRA for the Wan 2.2 DiT — {what} ({len(unmatched)} of {len(keys)} keys fit nothing, "
            f"e.g. {(unmatched or keys or ['<none>'])[0]})",
            "use a LoRA made for Wan 2.2 (or Wan 2.1 14B)",
        )
    for target, plist in patches.items():
        for p in plist:
            _check_shape(name, p, target, params[target])

    kinds = Counter(p.kind for plist in patches.values() for p in plist)
    notes = []
    if peft.get("alpha_pattern") or peft.get("rank_pattern"):
        notes.append("per-module alpha/rank patterns in the metadata are ignored; the global lora_alpha is used")
    report = LoraReport(
        source=name,
        num_keys=len(keys),
        matched=tuple(sorted(patches)),
        kinds=tuple((k, kinds[k]) for k in _KIND_ORDER if kinds[k]),
        expected_misses=tuple(expected),
        unmatched=tuple(unmatched),
        notes=tuple(notes),
    )
    return Lora(name, {k: tuple(v) for k, v in patches.items()}, report)


def _refuse_unsupported(source: str, keys: list[str], aliases: dict[str, str | None]) -> None:
    for key in keys:
        m = _UNSUPPORTED.search(key)
        # Only adapters aimed at this model: a foreign LyCORIS file gets the family message.
        if m and aliases.get(_split_key(key[: m.start()])[0]):
            raise ModelFileError(
                source,
                f"uses a LyCORIS/DoRA adapter ({m.group(1).split('.')[0]}, e.g. {key}) that wanrender does not apply",
                "use a plain LoRA (lora_down/lora_up or lora_A/lora_B) for Wan 2.2",
            )


def _check_shape(source: str, p: Patch, target: str, param: torch.Tensor) -> None:
    shape = tuple(param.shape)
    if isinstance(p, LowRank):
        down, up = tuple(p.down.shape), tuple(p.up.shape)
        ok = (
            len(down) >= 2
            and len(up) >= 2
            and up[1] == down[0]
            and math.prod(up[2:]) == 1
            and len(shape) >= 2
            and up[0] == shape[0]
            and math.prod(down[1:]) == math.prod(shape[1:])
        )
        got = f"an update of {up[0] if up else '?'}×{math.prod(down[1:]) if down else '?'} (up {up}, down {down})"
    else:
        ok = tuple(p.tensor.shape) == shape
        got = f"shape {tuple(p.tensor.shape)}"
    if ok:
        return
    theirs = p.tensor if isinstance(p, Diff) else p.up
    dims = [d for d in theirs.shape if d in _MODEL_SIZES and d not in shape]
    hint = f"; it looks made for {_MODEL_SIZES[dims[0]]}" if dims else ""
    raise ModelFileError(
        source,
        f"LoRA tensor {p.key} has {got}, but the model's {target} has shape {shape}{hint}",
        "use a LoRA made for this model (Wan 2.2 A14B)",
    )


# ----------------------------------------------------------------------------- applying


def _set_param(mod: nn.Module, attr: str, value: torch.Tensor) -> None:
    # A new Parameter, never an in-place write: the old tensor may be a view of the user's file.
    set_tensor(mod, attr, value)


def _merge(mod: nn.Module, attr: str, delta: torch.Tensor, target: str, fp8_merge: Fp8MergeFn | None = None) -> None:
    old = mod._parameters[attr]
    assert old is not None
    if isinstance(mod, Linear) and attr == "weight" and is_fp8(old.dtype):
        # Per-tensor requantisation (a LoRA changes the range, the old scale may clip),
        # rounded stochastically as ComfyUI does when it patches fp8 weights: e4m3
        # has 3 mantissa bits, so round-to-nearest would drop most of a small delta.
        # Seeded by the tensor's name: the same LoRA merges to the same weights every run.
        seed = zlib.crc32(target.encode())
        if fp8_merge is not None and old.dtype == torch.float8_e4m3fn and old.is_cuda:
            q, s = fp8_merge(old.detach(), mod.weight_scale, delta, seed)  # the same bytes, fused (kernels.fp8_merge)
        else:
            q, s = quantize_fp8(mod.dequantized_weight(torch.float32) + delta, old.dtype, seed=seed)
        _set_param(mod, attr, q)
        mod.weight_scale = s.to(old.device)
    else:
        _set_param(mod, attr, (old.detach().float() + delta).to(old.dtype))


@dataclass
class LoraUndo:
    """What unmerged applications replaced (non-Linear targets are merged even then),
    kept by the caller so that ``remove_lora`` can put it back."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)


def apply_lora(
    model: nn.Module,
    lora: Lora,
    strength: float,
    mode: str = "merge",
    undo: LoraUndo | None = None,
    fp8_merge: Fp8MergeFn | None = None,
) -> LoraReport:
    """Apply ``lora`` to ``model`` at ``strength``; returns the report of what was done.

    ``merge``: ``W += strength * delta`` computed in fp32, then stored in the weight's
    dtype (fp8: requantised with a fresh per-tensor scale). Cannot be undone but costs
    nothing per step. ``unmerged``: Linear weights stay untouched and the LoRA runs as
    an extra low-rank matmul (``remove_lora`` undoes it). Strength 0 touches nothing.
    ``fp8_merge``: a faster twin of the fp8 requantisation for e4m3fn weights on a CUDA
    device, giving the same bytes (``kernels.fp8_merge``; this layer cannot import it).
    """
    if mode not in ("merge", "unmerged"):
        raise ValueError(f"mode must be 'merge' or 'unmerged', not {mode!r}")
    base = replace(lora.report, mode=mode, strength=float(strength))
    if strength == 0:
        return base
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for target, plist in lora.patches.items():
        if target not in params:
            raise ValueError(f"{lora.source} was parsed for another model: it has no {target}")
        for p in plist:
            _check_shape(lora.source, p, target, params[target])
    originals = undo.originals if undo is not None else {}
    merged, runtime = [], []
    for target, plist in lora.patches.items():
        mod_name, _, attr = target.rpartition(".")
        mod = modules[mod_name]
        param = params[target]
        if mode == "unmerged" and isinstance(mod, Linear) and attr == "weight":
            extra = [
                RuntimeAdapter(p.down.flatten(1).to(param.device), p.up.flatten(1).to(param.device), strength * p.scale)
                if isinstance(p, LowRank)
                else RuntimeAdapter(p.tensor.to(param.device), None, strength * p.scale)
                for p in plist
            ]
            mod.adapters = (*mod.adapters, *extra)
            runtime.append(target)
            continue
        if mode == "unmerged":
            originals.setdefault(target, param)
        delta = plist[0].delta(param.shape, param.device)
        for p in plist[1:]:
            delta = delta + p.delta(param.shape, param.device)
        _merge(mod, attr, strength * delta, target, fp8_merge)
        merged.append(target)
    notes = list(base.notes)
    if mode == "unmerged" and merged:
        notes.append(f"{len(merged)} non-Linear targets (biases, modulation, norms, convs) were merged")
    return replace(base, merged=tuple(merged), runtime=tuple(runtime), notes=tuple(notes))


def remove_lora(model: nn.Module, undo: LoraUndo | None = None) -> int:
    """Undo every ``unmerged`` application: drop run-time adapters, restore the side
    tensors recorded in ``undo``.

    Merged (``mode="merge"``) LoRAs stay: reload the model to drop them. Returns the
    number of layers restored.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, Linear) and mod.adapters:
            mod.adapters = ()
            n += 1
    originals = undo.originals if undo is not None else {}
    modules = dict(model.named_modules())
    restored = len(originals)
    for target, t in originals.items():
        mod_name, _, attr = target.rpartition(".")
        _set_param(modules[mod_name], attr, t)
    originals.clear()
    return n + restored
