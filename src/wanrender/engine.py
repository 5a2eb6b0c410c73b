"""The Engine owns the loaded models on one device and renders any number of specs.

It is long-lived: ``Engine.load(files, device, config)`` reads the checkpoints once;
``engine.configure(config)`` changes precision, attention backend, compile mode,
memory plan or LoRA strengths between renders; ``engine.render(req, image)`` runs
the numbered pipeline steps and times each stage. The engine is the only writer of
its models' run-time settings, and ``config`` records all of them, so a change is
applied against a known state and undone exactly:

- attention, compile, fp8 kernels on fp8-stored weights, the memory runtime: swapped
  in place;
- LoRA strengths on unmerged adapters (swap/stream plans): adapters removed and
  applied again;
- anything that changed weight values (a merged LoRA, fp8 conversion of wider
  weights) or where models load (a memory plan with other load devices): the models
  concerned are loaded again from their files (the page cache keeps that cheap), so a
  reconfigured engine holds the same weights as a freshly loaded one, bit for bit.

Writing outputs is the runner's job (``runner.py``), not the engine's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wanrender.errors import WanrenderError
from wanrender.models import loading
from wanrender.models.inventory import ModelFiles
from wanrender.pipeline import i2v
from wanrender.spec import RenderRequest, Stage

log = logging.getLogger(__name__)

# (stage, step, total, detail) -> None. step/total are None outside the sampling loop.
Progress = Callable[[str, int | None, int | None, str], None]


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine has applied to its models: the one record of their state."""

    plan: object  # runtime.plan.RenderPlan: resolved precision, attention, compile
    memory: object | None = None  # runtime.planner.MemoryPlan (None: models stay where loaded)
    lora_high: float = 0.0
    lora_low: float = 0.0


@dataclass
class RenderResult:
    video: Path | None
    sidecar: Path | None
    frames: np.ndarray
    latent: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    peak_vram_bytes: int | None = None
    meta: dict = field(default_factory=dict)
    # Runner.render(write=False, encode=True): the MP4 encoder fed during the decode and
    # not yet closed; the caller ends it through outputs.write_outputs(stream=...) or abort().
    encoder: object | None = field(default=None, repr=False, compare=False)

    @property
    def during_load(self) -> tuple[str, ...]:
        """Stages computed while the models loaded (``Engine.condition_early``)."""
        return tuple(self.meta.get("during_load") or ())

    def render_seconds(self) -> float:
        """The render's own time: every stage but the sampling total (the sum of its passes)
        and those run during the load, which the load's time already holds."""
        skip = {Stage.SAMPLING.value, *self.during_load}
        return sum(v for k, v in self.timings.items() if k not in skip)


class Engine:
    def __init__(self, high, low, vae, text_encoder, tokenizer, device: torch.device, files: ModelFiles | None,
                 config: EngineConfig | None = None, load_seconds: float = 0.0) -> None:  # fmt: skip
        """Models already loaded (and configured as ``config`` says, if given)."""
        self.high, self.low, self.vae = high, low, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.device = torch.device(device)
        self.files = files
        self.config = config
        self.load_seconds = load_seconds
        self.lora_report: dict[str, str] = {}
        self.memory = None  # runtime.offload.MemoryRuntime of config.memory
        self.loads = 0  # times the experts were read from their files, for tests and the sidecar
        self.load_parts: dict[str, float] = {}  # seconds per model and LoRA of the last load (sidecar)
        self._undo: dict[str, object] = {}
        # Where the models were placed when built in memory (a MemoryPlan; None: on the device).
        self.placed_for = None
        self._broken = False  # a configure failed halfway: only a full reload makes the models known again
        self._converted = False  # fp8 conversion replaced wider weights: bf16 needs a reload
        self._early = None  # condition_early's result, for the first render only

    @property
    def plan(self):
        return self.config.plan if self.config is not None else None

    # --- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, files: ModelFiles, device: str | torch.device, config: EngineConfig,
             dtype: torch.dtype | None = None, early: tuple | None = None) -> Engine:  # fmt: skip
        """Load every model onto ``device`` and apply ``config``. ``dtype`` casts non-fp8
        weights (None keeps the file's); activations run in bf16 on CUDA, fp32 on the CPU.
        ``early``: (request, fitted image) of the first render, whose text and VAE encodings
        are computed while the experts still load (``condition_early``)."""
        t0 = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        from wanrender.kernels.vae_norm import prepare_vae
        from wanrender.runtime.offload import load_devices

        dev = torch.device(device)
        _, te_dev, _ = load_devices(config.memory, dev)
        engine = cls(None, None, None, None, None, dev, files)
        engine._dtype = dtype  # kept for reloads
        # The experts (28 GB of copies and the LoRA merges) load on a second thread while
        # this one loads the VAE and the text encoder, whose first use also imports most
        # of torch's compile stack: measured on an H200, the two took 10.9 s and 6.4 s.
        with ThreadPoolExecutor(1, thread_name_prefix="wanrender-experts") as pool:
            experts = pool.submit(engine._load_experts, config)
            try:
                with _timed(engine.load_parts, "vae", dev):
                    engine.vae = loading.load_vae(
                        files.vae, device=dev, dtype=dtype or (torch.bfloat16 if dev.type == "cuda" else None)
                    )
                    prepare_vae(engine.vae, dev)
                with _timed(engine.load_parts, "text_encoder", te_dev):
                    engine.text_encoder = loading.load_text_encoder(files.text_encoder, device=te_dev, dtype=dtype)
                    engine.tokenizer = loading.load_tokenizer(files.tokenizer)
                if early is not None and _encodes_in_place(config):
                    engine.condition_early(*early)
            finally:
                experts.exception()  # never leave the other thread copying onto the GPU
            experts.result()
        te = engine.text_encoder
        if te.config.dim != engine.high.cfg.text_dim:
            raise WanrenderError(
                f"{files.text_encoder}: text encoder width {te.config.dim} does not fit the DiT ({engine.high.cfg.text_dim}) — use umt5-xxl"
            )
        engine._apply(config, reloaded=True)
        engine.load_seconds = time.perf_counter() - t0
        return engine

    def _load_experts(self, config: EngineConfig) -> None:
        """Read both experts from their files and apply the LoRAs at the config's strengths."""
        files, dev = self.files, self.device
        if files is None:
            raise WanrenderError(
                "this engine's models were built in memory: a change that needs a reload cannot be made"
            )
        self._drop_experts()
        from wanrender.runtime.offload import load_devices

        expert_dev, _, _ = load_devices(config.memory, dev)
        act = torch.bfloat16 if dev.type == "cuda" else torch.float32
        dtype = getattr(self, "_dtype", None)
        with _timed(self.load_parts, "high", expert_dev):
            high = loading.load_dit(files.high, device=expert_dev, dtype=dtype, compute_dtype=act)
        with _timed(self.load_parts, "low", expert_dev):
            low = loading.load_dit(files.low, device=expert_dev, dtype=dtype, compute_dtype=act)
        if high.cfg != low.cfg:
            raise WanrenderError(
                f"{files.low}: the low-noise expert's architecture differs from the high-noise one — use a matching pair"
            )
        self.high, self.low = high, low
        self.lora_report, self._undo, self._converted = {}, {}, False
        self._apply_loras(config)
        self.loads += 1

    def _drop_experts(self) -> None:
        """Free the experts before new ones arrive. Compiled blocks hold their weights in
        reference cycles (the compiled call refers to its module), so the cycles are cut
        and collected before the allocator's cache is emptied."""
        import gc

        from wanrender.runtime.plan import compile_blocks

        for m in (self.high, self.low):
            if m is not None:
                compile_blocks(m, "off")
        self.high = self.low = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _apply_loras(self, config: EngineConfig) -> None:
        from wanrender.kernels.fp8_merge import fp8_merge_for
        from wanrender.models.lora import LoraUndo, apply_lora, parse_lora
        from wanrender.runtime.offload import load_devices

        mode = load_devices(config.memory, self.device)[2]
        fused = fp8_merge_for(self.device)  # one per load: its self-check runs on the first tensor
        for name, model, path, strength in (("high", self.high, self.files and self.files.lora_high, config.lora_high),
                                            ("low", self.low, self.files and self.files.lora_low, config.lora_low)):  # fmt: skip
            if path is None or strength == 0.0:
                continue
            undo = self._undo.setdefault(name, LoraUndo())
            with _timed(self.load_parts, f"lora_{name}", self.device):
                rep = apply_lora(model, parse_lora(path, model), strength, mode=mode, undo=undo, fp8_merge=fused)
            self.lora_report[name] = rep.summary()
            log.info("LoRA %s (strength %g): %s", path.name, strength, rep.summary())

    def _remove_loras(self) -> None:
        from wanrender.models.lora import remove_lora

        for name, model in (("high", self.high), ("low", self.low)):
            remove_lora(model, self._undo.pop(name, None))
        self.lora_report = {}

    # --- configuring ------------------------------------------------------------------
    def configure(self, config: EngineConfig) -> dict[str, float]:
        """Bring the models to ``config`` from the recorded one; returns what it cost
        (``load_models`` seconds when experts had to be read again). A failure halfway
        leaves the engine marked broken: the next configure reloads everything."""
        from wanrender.runtime.offload import load_devices

        old = self.config
        if old is None:  # models as built (in memory, or loaded without a configuration)
            if load_devices(self.placed_for, self.device) != load_devices(config.memory, self.device):
                raise WanrenderError(
                    f"the models were placed for memory plan '{_short(self.placed_for)}' but this render plans "
                    f"'{_short(config.memory)}' — build them for that plan (or ask for memory "
                    f"{self.placed_for.experts if self.placed_for else 'resident'})"
                )
            self._apply(config, reloaded=True)
            return {}
        if old == config and not self._broken:
            if config.memory is not None and self.memory is None:  # released (a step-down that found no plan)
                self._install_memory(config)
            return {}
        was, now = load_devices(old.memory, self.device), load_devices(config.memory, self.device)
        loras_changed = (old.lora_high, old.lora_low) != (config.lora_high, config.lora_low)
        # A merged LoRA changed weight values; merging into weights already converted to
        # fp8 would differ from a fresh load (which merges first, then converts).
        merged = was[2] == "merge" and (bool(old.lora_high or old.lora_low) or self._converted)
        reload = (
            self._broken
            or was != now
            or (loras_changed and merged)
            or (self._converted and config.plan.precision != "fp8")
        )
        if reload and self.files is None:
            raise WanrenderError(
                "this engine's models were built in memory: the change asked for needs a reload from files "
                f"(memory {_short(old.memory)} -> {_short(config.memory)}, LoRA {old.lora_high:g}/{old.lora_low:g} -> "
                f"{config.lora_high:g}/{config.lora_low:g}, precision {old.plan.precision} -> {config.plan.precision})"
            )
        t0 = time.perf_counter()
        self._broken = True  # until the new state is complete
        self._release_memory()
        if reload:
            if was[1] != now[1] or self.text_encoder is None:
                self.text_encoder = None
                self.text_encoder = loading.load_text_encoder(
                    self.files.text_encoder, device=now[1], dtype=getattr(self, "_dtype", None)
                )
            self._load_experts(config)
        elif loras_changed:
            self._remove_loras()
            self._apply_loras(config)
        self._apply(config, reloaded=reload)
        self._broken = False
        return {Stage.LOAD_MODELS.value: time.perf_counter() - t0} if reload else {}

    def _apply(self, config: EngineConfig, reloaded: bool) -> None:
        """Attention, precision, compile and the memory runtime, as ``config`` says."""
        from wanrender.kernels import attention as attn
        from wanrender.kernels.ln_mod import enable_norm_mod
        from wanrender.kernels.qk_norm import enable_norm_rope
        from wanrender.runtime.plan import apply_precision, compile_blocks

        plan, old = config.plan, (None if reloaded else self.config)
        experts = [self.high, self.low]
        choice = attn.select(plan.attention, attn.Target.of(self.device, self.high.compute_dtype, self.high.cfg.head_dim),
                             eight_bit=plan.precision == "fp8")  # fmt: skip
        for m in experts:
            m.attention = choice.fn
            # eager CUDA only: compiled blocks keep the ops, which Inductor fuses
            enable_norm_rope(m, self.device)
            enable_norm_mod(m, self.device)
        if old is None or old.plan.precision != plan.precision:
            self._converted |= apply_precision(experts, plan.precision)
        if old is None or old.plan.compile != plan.compile:
            for m in experts:
                if plan.compile != "off" or old is not None:
                    compile_blocks(m, plan.compile)
        self.config = config
        self._install_memory(config)
        log.info("engine: %s; memory %s", plan, config.memory.short() if config.memory is not None else "as loaded")

    def _install_memory(self, config: EngineConfig) -> None:
        from wanrender.runtime.offload import MemoryRuntime

        if config.memory is not None:
            self.memory = MemoryRuntime(self.high, self.low, self.text_encoder, self.device, config.memory)

    def _release_memory(self) -> None:
        if self.memory is not None:
            self.memory.release()
            self.memory = None

    def release(self) -> None:
        """Drop what the memory runtime placed on the device (before a step-down)."""
        self._release_memory()

    def warm_up(self, frames: int, width: int, height: int, batch: int = 1) -> float:
        """One forward per expert at this shape on seeded random inputs: compiled blocks
        compile here, not inside a timed or user-facing render. Returns the seconds."""
        from wanrender.runtime.plan import compiled_scope

        t0 = time.perf_counter()
        shape = i2v.latent_shape(frames, width, height)
        g = torch.Generator(device=self.device).manual_seed(1)
        x = torch.randn(batch, *shape[1:], generator=g, device=self.device)
        cond = torch.randn(batch, 20, *shape[2:], generator=g, device=self.device)
        ctx = torch.randn(batch, self.high.cfg.text_len, self.high.cfg.text_dim, generator=g, device=self.device) * 0.1
        with (
            torch.no_grad(),
            compiled_scope() if self.plan is not None and self.plan.compile != "off" else nullcontext(),
        ):
            for m in (self.high, self.low):
                m(x, torch.tensor([900.0], device=self.device), ctx, cond)
        self._sync()
        return time.perf_counter() - t0

    # --- rendering --------------------------------------------------------------------
    @contextmanager
    def _stage(self, timings: dict[str, float], name: Stage, progress: Progress | None) -> Iterator[None]:
        if progress:
            progress(name.value, None, None, "start")
        self._sync()
        t0 = time.perf_counter()
        with self.memory.stage(name.value) if self.memory is not None else nullcontext():
            yield
        self._sync()
        timings[name.value] = time.perf_counter() - t0
        if progress:
            progress(name.value, None, None, f"{timings[name.value]:.2f}s")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode_prompts(self, prompt: str, negative: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._encode(prompt, negative, self.high.cfg.text_len)

    def _encode(self, prompt: str, negative: str | None, text_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from wanrender.models.text_encoder import encode_text

        prompts = [prompt] if negative is None else [prompt, negative]
        with torch.no_grad():
            ctx = encode_text(self.text_encoder, self.tokenizer, prompts, text_len=text_len)
        ctx = ctx.to(self.device)
        return (ctx[:1], None) if negative is None else (ctx[:1], ctx[1:])

    def condition_early(self, req: RenderRequest, image: torch.Tensor) -> None:
        """The first render's text and image conditioning, computed during the load: on an
        H200 the experts' thread takes ~14 s, the text encoder and VAE ~8 s, and the two
        encodings (~3 s) fit in the gap. Kept for exactly this request and image object;
        any failure here only means the render computes them itself."""
        from wanrender.request import negative_prompt

        r, s = req.render, req.sampling
        timings: dict[str, float] = {}
        try:
            # The DiT is not loaded yet: its text length is checked when the render uses this.
            text_len = self.text_encoder.config.text_len
            with _timed(timings, Stage.TEXT_ENCODE.value, self.device):
                ctx, neg = self._encode(r.prompt, negative_prompt(req) if s.cfg != 1.0 else None, text_len)
            with _timed(timings, Stage.VAE_ENCODE.value, self.device):
                cond = i2v.image_condition(self.vae, image, r.frames).to(self.device)
        except Exception as e:  # noqa: BLE001 - an optimisation: the render will do it
            log.debug("conditioning during the load skipped: %s", e)
            return
        self._early = (_early_key(req, image), text_len, ctx, neg, cond, timings)

    def _take_early(self, req: RenderRequest, image: torch.Tensor):
        early, self._early = self._early, None
        if early is None or early[0] != _early_key(req, image) or early[1] != self.high.cfg.text_len:
            return None
        return early[2:]

    def render(self, req: RenderRequest, image: torch.Tensor, progress: Progress | None = None,
               swap_experts: bool = False, on_frames: Callable[[Any], None] | None = None,
               parallel=None) -> RenderResult:  # fmt: skip
        """Run the pipeline on an already fitted image [3, H, W] in [0, 1]. ``swap_experts``
        (a benchmark experiment): the low-noise expert takes the high-noise steps.
        ``on_frames`` receives the uint8 frames chunk by chunk as the VAE decodes them (array-likes:
        ``np.asarray`` gives [T, H, W, 3] and, on a GPU, waits for their copy to the host).
        ``parallel``: this process is one rank of several rendering one video
        (``parallel.render.Ranks``: ``share`` makes rank 0's conditioning everyone's,
        ``wrap`` turns an expert into the ranks' joint denoiser, ``decode`` decodes together and
        returns the frames on rank 0, none elsewhere)."""
        from wanrender.request import negative_prompt
        from wanrender.runtime.plan import compiled_scope

        if self.config is None:
            raise WanrenderError("the engine has no configuration yet — load it with Engine.load or call configure")
        if self._broken:
            raise WanrenderError("a reconfiguration of this engine failed halfway — configure it again (it reloads)")
        if swap_experts and self.memory is not None and self.memory.plan.experts != "resident":
            raise WanrenderError("swapping the experts' passes needs both experts resident — use memory resident")
        r, s = req.render, req.sampling
        timings: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        early = self._take_early(req, image)
        if early is not None:  # computed while the experts loaded: its stages are reported as they ran
            ctx, neg, cond, spent = early
            timings.update(spent)
            during_load = sorted(spent)
            if progress:
                for name, sec in spent.items():
                    progress(name, None, None, f"{sec:.2f}s during the load")
        else:
            during_load = []
            with self._stage(timings, Stage.TEXT_ENCODE, progress):
                ctx, neg = self.encode_prompts(r.prompt, negative_prompt(req) if s.cfg != 1.0 else None)
            with self._stage(timings, Stage.VAE_ENCODE, progress):
                cond = i2v.image_condition(self.vae, image, r.frames).to(self.device)
        if parallel is not None:
            ctx, cond = parallel.share(ctx), parallel.share(cond)
            neg = parallel.share(neg) if neg is not None else None
        noise = i2v.initial_noise(r.seed, i2v.latent_shape(r.frames, r.width, r.height)).to(self.device)
        if self.memory is not None:
            timings[Stage.EXPERT_INSTALL.value] = self.memory.begin_sampling()  # swap/stream: the high expert in
        step_times: list[float] = []
        t_pass = [time.perf_counter()]
        current = [Stage.PASS1_HIGH]

        def on_step(i: int, n: int, sigma: float) -> None:
            self._sync()
            now = time.perf_counter()
            step_times.append(now - t_pass[-1])
            t_pass.append(now)
            if progress:
                progress(current[0].value, i + 1, n, f"sigma {sigma:.4f}")
            if self.memory is not None:
                self.memory.after_step(current[0].value, i, n)

        def on_switch() -> None:
            self._sync()
            timings[Stage.PASS1_HIGH.value] = time.perf_counter() - t_pass[0]
            if self.memory is not None and s.switch < s.steps:  # no low pass: nothing to install
                timings[Stage.EXPERT_INSTALL.value] += self.memory.switch()
            current[0] = Stage.PASS2_LOW
            t_pass.append(time.perf_counter())
            t_pass[0] = t_pass[-1]

        first, second = (self.low, self.high) if swap_experts else (self.high, self.low)
        if parallel is not None:
            first, second = parallel.wrap(first), parallel.wrap(second)
        t_start = time.perf_counter()
        if progress:
            progress(Stage.PASS1_HIGH.value, 0, s.switch, "start")
        with compiled_scope() if self.config.plan.compile != "off" else nullcontext():
            latent = i2v.sample(first, second, noise, cond, ctx, s, neg, on_step, on_switch)
        self._sync()
        sampled_at = time.perf_counter()
        timings[Stage.PASS2_LOW.value] = sampled_at - t_pass[0]
        timings[Stage.SAMPLING.value] = sampled_at - t_start
        del cond, noise, ctx, neg
        tiled = self.memory is not None and self.memory.plan.tiled_decode
        with self._stage(timings, Stage.VAE_DECODE, progress):
            if parallel is not None:
                frames = parallel.decode(self.vae, latent, tiled, on_frames)
            else:
                frames = i2v.decode(self.vae, latent, tiled=tiled, on_frames=on_frames)
        result = RenderResult(None, None, frames, latent.cpu(), timings)
        result.meta["step_seconds"] = step_times
        result.meta["during_load"] = during_load
        result.meta["sampled_at"] = sampled_at  # perf_counter: where the "tail" to the files starts
        if self.memory is not None:
            result.meta["memory"] = self.memory.report()
        if self.device.type == "cuda":
            result.peak_vram_bytes = int(torch.cuda.max_memory_allocated(self.device))
        return result


def _encodes_in_place(config: EngineConfig) -> bool:
    """Plans whose text encoder and VAE work where they were loaded (no stage hooks): only
    there can the first render's conditioning run before the memory runtime exists."""
    plan = config.memory  # a MemoryPlan, or None: the models stay where they were loaded
    return plan is None or (plan.experts == "resident" and plan.text_encoder != "release")


def _early_key(req: RenderRequest, image: torch.Tensor) -> tuple:
    r, s = req.render, req.sampling
    return (id(image), tuple(image.shape), r.prompt, r.negative, s.cfg, r.frames)


@contextmanager
def _timed(into: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    into[name] = time.perf_counter() - t0


def _short(memory) -> str:
    return memory.short() if memory is not None else "resident"
