"""The Engine owns the loaded models on one device and renders requests.

``Engine.load(files, ...)`` reads the checkpoints (the real loading code, also for
the demo); ``engine.render(request)`` runs the numbered pipeline steps, times each
stage and writes the video and its sidecar.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wanrender.errors import WanrenderError
from wanrender.models import loading
from wanrender.pipeline import i2v
from wanrender.request import RenderRequest

log = logging.getLogger(__name__)

# (stage, step, total, detail) -> None. step/total are None outside the sampling loop.
Progress = Callable[[str, int | None, int | None, str], None]


@dataclass(frozen=True)
class ModelFiles:
    high: Path
    low: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    lora_high: Path | None = None
    lora_low: Path | None = None

    def as_dict(self) -> dict[str, Path | None]:
        return dict(self.__dict__)


@dataclass
class RenderResult:
    video: Path | None
    sidecar: Path | None
    frames: np.ndarray
    latent: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    peak_vram_bytes: int | None = None
    meta: dict = field(default_factory=dict)


class Engine:
    def __init__(self, high, low, vae, text_encoder, tokenizer, device: torch.device, files: ModelFiles,
                 lora_report: dict | None = None, load_seconds: float = 0.0) -> None:  # fmt: skip
        self.high, self.low, self.vae = high, low, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.device = device
        self.files = files
        self.lora_report = lora_report or {}
        self.load_seconds = load_seconds
        self.plan = None  # the RenderPlan applied by Engine.load (None: models used as given)
        self.memory = None  # runtime.offload.MemoryRuntime: where models sit per stage (None: where loaded)

    @classmethod
    def load(
        cls,
        files: ModelFiles,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lora_strength_high: float = 1.0,
        lora_strength_low: float = 1.0,
        precision: str = "auto",
        attention: str = "auto",
        compile: str = "off",
        memory=None,
    ) -> Engine:
        """Load every model onto ``device``. ``dtype`` casts non-fp8 weights (None keeps
        the file's); activations run in bf16 on CUDA and fp32 on the CPU. ``memory``, a
        runtime.planner.MemoryPlan, keeps what it offloads on the host (mmap views)."""
        from wanrender.runtime.offload import MemoryRuntime, load_devices
        from wanrender.runtime.plan import apply_plan, make_plan

        dev = torch.device(device)
        plan, choice = make_plan(dev, precision, attention, compile)  # refuses bad knobs before loading
        t0 = time.perf_counter()
        act = torch.bfloat16 if dev.type == "cuda" else torch.float32
        expert_dev, te_dev, lora_mode = load_devices(memory, dev)
        high = loading.load_dit(files.high, device=expert_dev, dtype=dtype, compute_dtype=act)
        low = loading.load_dit(files.low, device=expert_dev, dtype=dtype, compute_dtype=act)
        if high.cfg != low.cfg:
            raise WanrenderError(f"{files.low}: the low-noise expert's architecture differs from the high-noise one — use a matching pair")
        report: dict[str, str] = {}
        for name, model, lora_path, strength in (
            ("high", high, files.lora_high, lora_strength_high),
            ("low", low, files.lora_low, lora_strength_low),
        ):
            if lora_path is not None and strength != 0.0:
                from wanrender.models.lora import apply_lora, parse_lora

                rep = apply_lora(model, parse_lora(lora_path, model), strength, mode=lora_mode)
                report[name] = rep.summary()
                log.info("LoRA %s (strength %g): %s", lora_path.name, strength, rep.summary())
        vae = loading.load_vae(files.vae, device=dev, dtype=dtype or (torch.bfloat16 if dev.type == "cuda" else None))
        te = loading.load_text_encoder(files.text_encoder, device=te_dev, dtype=dtype)
        tok = loading.load_tokenizer(files.tokenizer)
        if te.config.dim != high.cfg.text_dim:
            raise WanrenderError(
                f"{files.text_encoder}: text encoder width {te.config.dim} does not fit the DiT ({high.cfg.text_dim}) — use umt5-xxl"
            )
        apply_plan([high, low], plan, choice)
        engine = cls(high, low, vae, te, tok, dev, files, report, time.perf_counter() - t0)
        engine.plan = plan
        if memory is not None:
            engine.memory = MemoryRuntime(high, low, te, dev, memory)
        return engine

    @contextmanager
    def _stage(self, timings: dict[str, float], name: str, progress: Progress | None) -> Iterator[None]:
        if progress:
            progress(name, None, None, "start")
        self._sync()
        t0 = time.perf_counter()
        with self.memory.stage(name) if self.memory is not None else nullcontext():
            yield
        self._sync()
        timings[name] = time.perf_counter() - t0
        if progress:
            progress(name, None, None, f"{timings[name]:.2f}s")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode_prompts(self, prompt: str, negative: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from wanrender.models.text_encoder import encode_text

        prompts = [prompt] if negative is None else [prompt, negative]
        with torch.no_grad():
            ctx = encode_text(self.text_encoder, self.tokenizer, prompts, text_len=self.high.cfg.text_len)
        ctx = ctx.to(self.device)
        return (ctx[:1], None) if negative is None else (ctx[:1], ctx[1:])

    def render(self, req: RenderRequest, image: torch.Tensor, progress: Progress | None = None,
               write: Callable[[RenderResult], None] | None = None) -> RenderResult:  # fmt: skip
        """Run the pipeline on an already fitted image [3, H, W] in [0, 1]."""
        timings: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with self._stage(timings, "text_encode", progress):
            ctx, neg = self.encode_prompts(req.prompt, req.negative_prompt if req.cfg != 1.0 else None)
        with self._stage(timings, "vae_encode", progress):
            cond = i2v.image_condition(self.vae, image, req.frames).to(self.device)
        noise = i2v.initial_noise(req.seed, i2v.latent_shape(req.frames, req.width, req.height)).to(self.device)
        settings = i2v.Sampling(req.steps, req.switch, req.cfg, req.shift_high, req.shift_low, req.sampler)
        if self.memory is not None:
            timings["expert_install"] = self.memory.begin_sampling()  # swap/stream: the high expert in
        step_times: list[float] = []
        t_pass = [time.perf_counter()]
        current = ["pass1_high"]

        def on_step(i: int, n: int, sigma: float) -> None:
            self._sync()
            now = time.perf_counter()
            step_times.append(now - t_pass[-1])
            t_pass.append(now)
            if progress:
                progress(current[0], i + 1, n, f"sigma {sigma:.4f}")
            if self.memory is not None:
                self.memory.after_step(current[0], i, n)

        def on_switch() -> None:
            self._sync()
            timings["pass1_high"] = time.perf_counter() - t_pass[0]
            if self.memory is not None and req.switch < req.steps:  # no low pass: nothing to install
                timings["expert_install"] += self.memory.switch()
            current[0] = "pass2_low"
            t_pass.append(time.perf_counter())
            t_pass[0] = t_pass[-1]

        t_start = time.perf_counter()
        if progress:
            progress("pass1_high", 0, req.switch, "start")
        latent = i2v.sample(self.high, self.low, noise, cond, ctx, settings, neg, on_step, on_switch)
        self._sync()
        timings["pass2_low"] = time.perf_counter() - t_pass[0]
        timings["sampling"] = time.perf_counter() - t_start
        with self._stage(timings, "vae_decode", progress):
            frames = i2v.decode(self.vae, latent, tiled=self.memory is not None and self.memory.plan.tiled_decode)
        result = RenderResult(None, None, frames, latent.cpu(), timings)
        result.meta["step_seconds"] = step_times
        if self.memory is not None:
            result.meta["memory"] = self.memory.report()
        if self.device.type == "cuda":
            result.peak_vram_bytes = int(torch.cuda.max_memory_allocated(self.device))
        if write is not None:
            write(result)
        return result
