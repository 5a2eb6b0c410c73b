"""``wanrender models random``: random-weight stand-ins for the users' model files.

The standard file set (``wanrender models fetch``) with its names and formats —
ComfyUI fp8_scaled experts and text encoder, lightx2v rank-64 LoRAs, the bf16 Wan
2.1 VAE, the umt5 tokenizer — but seeded random values, so a machine without the
real weights can run and time the user's whole path (``generate --models DIR``:
the real loaders, LoRA merge, sidecar) at full size. ``tiny`` writes the same
formats at the demo's sizes, for tests.

Files are streamed tensor by tensor (``safetensors_write``): host memory never
holds an expert. Each tensor has its own generator, seeded from the seed and a
CRC of the file's tag and tensor name, so values do not depend on the order of
work; they do depend on the device kind (CUDA's random stream is not the CPU's),
which the file's ``__metadata__`` records with the seed and size. A file with the
same header therefore has the same contents, and is skipped; a different file
under one of the names (real weights!) is never replaced without ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wanrender.errors import WanrenderError
from wanrender.models.common import Linear, quantize_fp8
from wanrender.models.dit import DiTConfig, WanDiT
from wanrender.models.random_init import is_gain, train_tokenizer
from wanrender.models.safetensors_write import Layout, TensorSpec, plan_layout, read_header, write_streaming
from wanrender.models.text_encoder import TextEncoderConfig, UMT5Encoder
from wanrender.models.vae import VAEConfig, WanVAE

SIZES = ("full", "tiny")
META_KEY = "wanrender_random"
VERSION = 1
DIT_PREFIX = "model.diffusion_model."  # as in ComfyUI's repackaged experts
LORA_PREFIX = "diffusion_model."  # as in the lightx2v LoRAs
# The Linear layers the lightx2v 4-step LoRAs train, per block.
LORA_LAYERS = tuple(f"{a}.{x}" for a in ("self_attn", "cross_attn") for x in "qkvo") + ("ffn.0", "ffn.2")
# Values: normal, never zero (speed tests must not time zeros); the LoRA's up
# matrices make the merged delta about 5% of a weight's spread.
STD = 0.02
BIAS_STD = 0.01
LORA_DELTA = 0.05
TOKENIZER_VOCAB = 1000  # ids stay below every encoder's vocabulary, the demo's 1000 included
_WORDS = (
    "slow dolly in pan tilt zoom orbit camera motion gentle soft warm cold light shadow snow rain wind sea wave "
    "forest tree leaf river mountain sky cloud sun moon night city street neon car walk run dance smile face eyes "
    "hair portrait bear cub fox bird cat dog fur breathing blink turn look close wide shot cinematic natural crisp "
    "detail smooth calm subtle golden hour dawn dusk fog mist sparkle glow red blue green white black bright dark"
).split()


@dataclass(frozen=True)
class SetSizes:
    """The networks whose shapes the files take."""

    dit: DiTConfig
    text: TextEncoderConfig
    vae: VAEConfig
    lora_rank: int


def set_sizes(size: str) -> SetSizes:
    if size == "full":
        return SetSizes(
            DiTConfig.preset("i2v-A14B"), TextEncoderConfig.preset("umt5-xxl"), VAEConfig.preset("wan2.1"), 64
        )
    if size == "tiny":  # the demo's sizes: the pipeline runs them on a CPU in seconds
        return SetSizes(DiTConfig.preset("demo"), TextEncoderConfig.preset("demo"), VAEConfig.preset("demo"), 4)
    raise WanrenderError(f"--size {size!r} is invalid — choose full (the real sizes, ~37 GB) or tiny (for tests)")


@dataclass(frozen=True)
class RandomFile:
    """One file of the set: a safetensors ``layout`` whose tensors ``values`` makes,
    or plain ``content`` (the tokenizer)."""

    dest: str  # path under the folder, as 'models fetch' lays it out
    role: str
    layout: Layout | None = None
    content: bytes = b""
    values: Callable[[TensorSpec], torch.Tensor] | None = None
    order: tuple[str, ...] = ()  # the order tensors are made in (scales after their weights)

    @property
    def total_bytes(self) -> int:
        return self.layout.total_bytes if self.layout is not None else len(self.content)


@dataclass(frozen=True)
class Outcome:
    file: RandomFile
    path: Path
    status: str  # written | skipped
    seconds: float = 0.0


class _Values:
    """Makes a file's tensors on ``device``: seeded normals, fp8 with a per-tensor absmax
    scale for the quantised Linear weights, constants where the format has them."""

    def __init__(self, tag: str, seed: int, device: torch.device, fp8: set[str], consts: dict, up_std: float) -> None:
        self.tag, self.seed, self.device = tag, seed, device
        self.fp8, self.consts, self.up_std = fp8, consts, up_std
        self.scales: dict[str, torch.Tensor] = {}

    def __call__(self, spec: TensorSpec) -> torch.Tensor:
        name = spec.name
        if name in self.consts:
            return self.consts[name]()
        if name.endswith(".scale_weight"):
            return self.scales.pop(name[: -len(".scale_weight")] + ".weight")
        g = torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, self.tag, name))
        x = torch.randn(spec.shape, generator=g, device=self.device, dtype=torch.float32)
        if name.endswith(".lora_up.weight"):
            x = self.up_std * x
        elif is_gain(name):
            x = 1.0 + STD * x
        else:
            x = (BIAS_STD if name.endswith(".bias") else STD) * x
        if name in self.fp8:
            q, scale = quantize_fp8(x)
            self.scales[name] = scale.reshape(())
            return q
        return x.to(spec.dtype)


def tensor_seed(seed: int, tag: str, name: str) -> int:
    """One generator seed per tensor: independent of the order tensors are made in."""
    return (seed << 32) | zlib.crc32(f"{tag}:{name}".encode())


def _meta(seed: int, size: str, rng: str) -> dict[str, str]:
    info = {"version": VERSION, "seed": seed, "size": size, "rng": rng, "note": "random weights, not a trained model"}
    return {META_KEY: json.dumps(info, sort_keys=True)}


def _scaled_fp8_specs(model: nn.Module, prefix: str, other: torch.dtype) -> tuple[list[TensorSpec], set[str]]:
    """ComfyUI fp8_scaled: every Linear weight e4m3fn with 0-d float32 ``scale_weight`` and
    ``scale_input`` (1.0), everything else in ``other``, and the empty ``scaled_fp8`` marker."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    specs: list[TensorSpec] = []
    for name, t in model.state_dict().items():
        key = prefix + name
        if name in linear:
            layer = key[: -len(".weight")]
            specs += [TensorSpec(key, torch.float8_e4m3fn, tuple(t.shape)),
                      TensorSpec(layer + ".scale_weight", torch.float32, ()),
                      TensorSpec(layer + ".scale_input", torch.float32, ())]  # fmt: skip
        else:
            specs.append(TensorSpec(key, other, tuple(t.shape)))
    specs.append(TensorSpec(prefix + "scaled_fp8", torch.float8_e4m3fn, (0,)))
    return specs, {s.name for s in specs if s.dtype == torch.float8_e4m3fn and s.shape != (0,)}


def _scaled_consts(specs: list[TensorSpec]) -> dict[str, Callable[[], torch.Tensor]]:
    out: dict[str, Callable[[], torch.Tensor]] = {
        s.name: (lambda: torch.ones((), dtype=torch.float32)) for s in specs if s.name.endswith(".scale_input")
    }
    out.update({s.name: (lambda: torch.empty(0, dtype=torch.float8_e4m3fn)) for s in specs if s.shape == (0,)})
    return out


def _order(layout: Layout) -> tuple[str, ...]:
    names = [s.name for s in layout.specs]
    return tuple(
        [n for n in names if not n.endswith(".scale_weight")] + [n for n in names if n.endswith(".scale_weight")]
    )


def _file(dest: str, role: str, specs: list[TensorSpec], meta: dict[str, str], values: _Values) -> RandomFile:
    layout = plan_layout(specs, meta)
    return RandomFile(dest, role, layout, values=values, order=_order(layout))


def _expert(sizes: SetSizes, which: str, seed: int, device: torch.device, meta: dict[str, str]) -> RandomFile:
    with torch.device("meta"):
        model = WanDiT(sizes.dit)
    specs, fp8 = _scaled_fp8_specs(model, DIT_PREFIX, torch.float16)
    values = _Values(which, seed, device, fp8, _scaled_consts(specs), 0.0)
    return _file(f"wan2.2_i2v_{which}_noise_14B_fp8_scaled.safetensors", f"{which}-noise expert", specs, meta, values)


def _lora(sizes: SetSizes, which: str, seed: int, device: torch.device, meta: dict[str, str]) -> RandomFile:
    cfg, rank = sizes.dit, sizes.lora_rank
    shapes = {"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    specs: list[TensorSpec] = []
    consts: dict[str, Callable[[], torch.Tensor]] = {}
    for i in range(cfg.num_layers):
        for layer in LORA_LAYERS:
            out_f, in_f = shapes.get(layer, (cfg.dim, cfg.dim))
            key = f"{LORA_PREFIX}blocks.{i}.{layer}"
            specs += [TensorSpec(key + ".lora_down.weight", torch.bfloat16, (rank, in_f)),
                      TensorSpec(key + ".lora_up.weight", torch.bfloat16, (out_f, rank)),
                      TensorSpec(key + ".alpha", torch.float32, ())]  # fmt: skip
            consts[key + ".alpha"] = lambda: torch.tensor(float(rank))  # scale alpha / rank = 1
    # delta = up @ down: spread sqrt(rank) * STD * up_std; LORA_DELTA of the weights' STD.
    values = _Values(f"lora_{which}", seed, device, set(), consts, LORA_DELTA / math.sqrt(rank))
    dest = f"wan2.2_i2v_lightx2v_4steps_lora_v1_{which}_noise.safetensors"
    return _file(dest, f"4-step LoRA ({which})", specs, meta, values)


def _text_encoder(sizes: SetSizes, spiece: bytes, seed: int, device: torch.device, meta: dict[str, str]) -> RandomFile:
    with torch.device("meta"):
        model = UMT5Encoder(sizes.text)
    specs, fp8 = _scaled_fp8_specs(model, "", torch.bfloat16)
    # ComfyUI's umt5 files carry their tokenizer as a uint8 tensor.
    specs.append(TensorSpec("spiece_model", torch.uint8, (len(spiece),)))
    consts = _scaled_consts(specs)
    consts["spiece_model"] = lambda: torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    values = _Values("text_encoder", seed, device, fp8, consts, 0.0)
    return _file("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text encoder", specs, meta, values)


def _vae(sizes: SetSizes, seed: int, device: torch.device, meta: dict[str, str]) -> RandomFile:
    with torch.device("meta"):
        model = WanVAE(sizes.vae)
    specs = [TensorSpec(k, torch.bfloat16, tuple(t.shape)) for k, t in model.state_dict().items()]
    return _file("wan_2.1_vae.safetensors", "VAE", specs, meta, _Values("vae", seed, device, set(), {}, 0.0))


def plan(size: str = "full", seed: int = 0, device: str | torch.device = "cpu") -> list[RandomFile]:
    """The files of the set, in 'models fetch' order; nothing is made until written."""
    if not 0 <= seed < 2**31:
        raise WanrenderError(f"--seed {seed} is invalid — use 0 .. {2**31 - 1}")
    sizes = set_sizes(size)
    dev = torch.device(device)
    meta = _meta(seed, size, dev.type)
    spiece = train_tokenizer(_WORDS, vocab=TOKENIZER_VOCAB, seed=0)
    return [
        _expert(sizes, "high", seed, dev, meta),
        _expert(sizes, "low", seed, dev, meta),
        _lora(sizes, "high", seed, dev, meta),
        _lora(sizes, "low", seed, dev, meta),
        _text_encoder(sizes, spiece, seed, dev, meta),
        _vae(sizes, seed, dev, meta),
        RandomFile("umt5-xxl-tokenizer/spiece.model", "tokenizer", content=spiece),
    ]


def pick_device(device: str) -> torch.device:
    """auto: the GPU when there is one (14 B normals take minutes on a CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise WanrenderError(f"--device {device!r} is invalid — choose auto, cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WanrenderError(f"--device {device}: no CUDA GPU here — use --device cpu (slower) or auto")
    return dev


def existing_state(path: Path, f: RandomFile) -> str | None:
    """None if ``path`` is missing, "same" if it is the file ``f`` would write, else why not."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        return "is not a regular file"
    if f.layout is None:
        return "same" if path.read_bytes() == f.content else "has other contents"
    header = read_header(path)
    if header == f.layout.header:
        size = path.stat().st_size
        return "same" if size == f.total_bytes else f"is incomplete ({size:,} of {f.total_bytes:,} bytes)"
    ours = _random_meta(header)
    if ours is not None:
        return "is a random file with other settings (" + ", ".join(f"{k} {v}" for k, v in ours.items()) + ")"
    return "is not a file this command writes (real weights?)"


def _random_meta(header: bytes | None) -> dict | None:
    try:
        meta = json.loads(header[8:])["__metadata__"][META_KEY] if header else None
        info = json.loads(meta) if meta else None
    except (ValueError, KeyError, TypeError):
        return None
    return {k: info[k] for k in ("seed", "size", "rng") if k in info} if isinstance(info, dict) else None


def check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise WanrenderError(
            f"{folder}: writing these files needs {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free — "
            "free space or choose another --dir"
        )


# (event, file, bytes): "plan" (no file; the bytes to write), then per file "skip" or
# "start", "bytes" (a chunk written, from the writer thread), "done".
Progress = Callable[[str, "RandomFile | None", int], None]


@dataclass
class _Writes:
    todo: list[RandomFile] = field(default_factory=list)
    skip: list[RandomFile] = field(default_factory=list)


def write_random_set(
    folder: str | os.PathLike,
    size: str = "full",
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Write the random set into ``folder``. Everything is checked before the first byte:
    the arguments, what is already there (kept if identical, refused if different
    unless ``overwrite``), and the free space."""
    folder = Path(folder)
    dev = pick_device(device)
    files = plan(size, seed, dev)
    if folder.exists() and not folder.is_dir():
        raise WanrenderError(f"{folder}: exists and is not a folder — pass a folder with --dir")
    plan_ = _Writes()
    for f in files:
        state = existing_state(folder / f.dest, f)
        if state == "same":
            plan_.skip.append(f)
            continue
        if state is not None and not overwrite:
            raise WanrenderError(
                f"{folder / f.dest}: already exists and {state} — left alone; "
                "pass --overwrite to replace it, or choose another --dir"
            )
        plan_.todo.append(f)
    folder.mkdir(parents=True, exist_ok=True)
    need = sum(f.total_bytes for f in plan_.todo)
    check_space(folder, need)
    report = progress or (lambda *_: None)
    report("plan", None, need)
    out: list[Outcome] = []
    for f in files:
        path = folder / f.dest
        if f in plan_.skip:
            report("skip", f, f.total_bytes)
            out.append(Outcome(f, path, "skipped"))
            continue
        t0 = time.perf_counter()
        report("start", f, 0)
        _write_one(path, f, lambda n, f=f: report("bytes", f, n))
        report("done", f, f.total_bytes)
        out.append(Outcome(f, path, "written", time.perf_counter() - t0))
    return out


def _write_one(path: Path, f: RandomFile, on_bytes: Callable[[int], None]) -> None:
    """Into ``<name>.partial``, renamed when complete: the final name never holds half a file,
    and a file being replaced stays whole until the new one is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        if f.layout is None:
            tmp.write_bytes(f.content)
            on_bytes(len(f.content))
        else:
            assert f.values is not None
            write_streaming(tmp, f.layout, f.values, f.order, on_bytes)
        # Not fsynced: stand-ins remade in minutes; the benchmark that follows wants them now.
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WanrenderError(
            f"{path}: writing failed ({e.strerror or e}) — nothing was left under this name; "
            "check the disk and run the command again"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
