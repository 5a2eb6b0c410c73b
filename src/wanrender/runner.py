"""The one render path, for every caller: ``wanrender generate`` and ``demo``, the
bench lab's child process, random-weight engines, the ``benchmarks/`` scripts and
(next) the service worker.

``Runner.render(req, files)``:

1. checks the request's inputs (image, LoRA files, RIFE weights, output names, each
   model file's role from its header, the tokenizer, the experts' order), before any
   model is loaded;
2. plans: the memory plan (``runtime.planner``: refused here when nothing fits) and
   the render plan (``runtime.plan``: precision, attention, compile);
3. loads the models, or reuses the runner's engine and reconfigures only what differs
   (a long-lived runner renders any number of requests without reloading);
4. renders;
5. on an out-of-memory error of a GPU-planned render (another process took memory
   after planning): releases, steps down once to a leaner plan, renders again;
6. writes the outputs all or nothing (``outputs.py``) and returns the result.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from wanrender.engine import Engine, EngineConfig, ModelFiles, Progress, RenderResult
from wanrender.errors import WanrenderError
from wanrender.spec import RenderRequest, SpecError, Stage

log = logging.getLogger(__name__)


@dataclass
class MemoryRecord:
    """The memory plan as decided (a planner Decision on a GPU, a bare MemoryPlan on the
    CPU) and any step-down after an out-of-memory error: what the sidecar reports."""

    decision: object
    fallback: dict | None = None
    after: object | None = None  # the Prediction stepped down to

    @property
    def plan(self):
        if self.after is not None:
            return self.after.plan
        return self.decision.chosen.plan if hasattr(self.decision, "chosen") else self.decision

    def to_json(self, run: dict | None) -> dict:
        entry: dict = {}
        if hasattr(self.decision, "chosen"):
            entry = self.decision.to_json()
        elif self.decision is not None:  # on the CPU: a plan without predictions
            entry = {"mode": "cpu", "plan": self.decision.to_json(), "describe": self.decision.describe()}
        if self.after is not None:
            entry.update(self.after.to_json())
        entry["fallback"] = self.fallback
        entry["run"] = run
        return entry


@dataclass(frozen=True)
class Prepared:
    """A request checked and planned; nothing loaded yet."""

    req: RenderRequest
    image: torch.Tensor
    memory: MemoryRecord = field(compare=False)
    config: EngineConfig


def check_lora_needs(req: RenderRequest, files: ModelFiles | None) -> None:
    """A non-zero LoRA strength with no LoRA file would be silently ignored: refuse it."""
    r = req.render
    for side, strength in (("high", r.lora_strength_high), ("low", r.lora_strength_low)):
        path = getattr(files, f"lora_{side}", None) if files is not None else None
        if strength and path is None:
            what = "the turbo preset needs the two 4-step LoRAs (high and low)" if req.preset == "turbo" else (
                f"a {side}-noise LoRA strength is set but no {side}-noise LoRA file was given")  # fmt: skip
            raise WanrenderError(
                f"{what} — pass --lora-high/--lora-low, put them in --models DIR, or use --preset quality / --lora-strength 0"
            )


def resolve_device(device: str | torch.device | None, present: bool = True) -> torch.device:
    """The render's device, refused here (one line) when it cannot run: an unknown name,
    and with ``present`` CUDA with a CPU-only torch or no GPU, a GPU index this machine
    does not have (the runner itself takes a CUDA device it may only emulate)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SpecError("device", f"device {str(device)!r} is not supported — use cuda, cuda:N (a GPU index) or cpu")
    if dev.type == "cuda" and present:
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SpecError(
                "device", f"device {str(device)!r} cannot be used: {why} — use device cpu, or run on a GPU machine"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SpecError(
                "device", f"device {str(device)!r}: this machine has {count} CUDA GPU(s) — use cuda:0..cuda:{count - 1}"
            )
    return dev


_LOAD_OOM = (
    "the GPU ran out of memory while loading the models — free GPU memory (another process may hold it) "
    "or use --memory stream"
)


class Runner:
    """Renders requests on one device, keeping its engine between them.

    ``engine``: an engine built elsewhere (random weights, tests) to render with;
    ``gpu`` and ``weights``: what the planner assumes instead of probing the device and
    reading file headers (an emulated card, models built in memory). ``step_down``:
    recover from an out-of-memory error on a leaner plan (the bench lab turns it off: a
    case records the plan it was given, or its failure). ``gpus``: the render is planned
    for that many GPUs sharing it (``parallel/``); ``parallel``: this runner is one rank
    of them (a ``parallel.render.Ranks``, passed to the engine; the sidecar records it).
    """

    def __init__(self, device: str | torch.device | None = None, *, engine: Engine | None = None,
                 gpu=None, weights=None, step_down: bool = True, one_shot: bool = False, gpus: int = 1,
                 parallel=None) -> None:  # fmt: skip
        self.device = resolve_device(device, present=False)
        self.parallel = parallel
        self.gpus = parallel.size if parallel is not None else gpus
        self.engine = engine
        self.gpu, self.weights = gpu, weights
        self.step_down = step_down
        # One video and exit (the CLI's generate): a compile chosen by a profile is
        # weighed against what it costs this one job (runtime.plan.compile_pays).
        self.one_shot = one_shot
        # Plans that ran out of memory here -> the plan stepped down to: later renders of
        # a long-lived runner keep to the lower one instead of failing (and reloading) again.
        self._fell_back: dict = {}
        self._hashes = None  # media.sidecar.FileHashes of the files last rendered with

    # --- 1 and 2: check and plan, before anything is loaded
    def prepare(self, req: RenderRequest, files: ModelFiles | None) -> Prepared:
        from wanrender.media import image as imagemod
        from wanrender.outputs import check_out, default_out
        from wanrender.runtime.plan import make_plan

        files = self._files(files)
        check_lora_needs(req, files)
        if files is not None and (self.engine is None or self.engine.files != files):
            from wanrender.models.checks import check_model_files

            for warning in check_model_files(files):  # every file's role, before any weights are read
                log.warning(warning)
        rgb = imagemod.load_image(req.render.image)
        if req.output.interpolate == "rife":
            from wanrender.interp.weights import find_rife_weights

            find_rife_weights()  # missing weights fail now, not after the render
        image = imagemod.fit_image(rgb, req.render.width, req.render.height, req.render.fit)
        if req.output.out is None:
            req = replace(req, output=replace(req.output, out=default_out(req)))
        check_out(req)
        memory = MemoryRecord(self._decide(req, files))
        if memory.plan in self._fell_back:
            memory.after, memory.fallback = self._fell_back[memory.plan]
        k = req.knobs
        plan, _ = make_plan(self.device, k.precision, k.attention, k.compile)
        plan = self._compile_for_job(req, plan)
        lora = (req.render.lora_strength_high, req.render.lora_strength_low)
        return Prepared(req, image, memory, EngineConfig(plan, memory.plan, *lora))

    def _compile_for_job(self, req: RenderRequest, plan):
        """A one-video process drops a compile its GPU profile chose when the compile
        would cost more than it saves in this job (the user's --compile is kept)."""
        from wanrender.runtime.plan import compile_key, compile_pays, compiled_before

        applied = (req.extra.get("profile") or {}).get("applied") or {}
        if not self.one_shot or plan.compile == "off" or "compile" not in applied:
            return plan
        forwards = req.sampling.steps * (1 if req.sampling.cfg == 1.0 else 2)
        cached = compiled_before(compile_key(self.device, req.render.tokens, plan))
        if compile_pays(forwards, cached):
            return plan
        cost = "a compile from the cache" if cached else "the first compile"
        note = (
            f"compile off: {cost} of {req.render.label()} costs more than it saves on {forwards} forwards "
            "(pass --compile default to compile anyway and keep it cached)"
        )
        log.info(note)
        return replace(plan, compile="off", notes=(*plan.notes, note))

    def _files(self, files: ModelFiles | None) -> ModelFiles | None:
        """The request's files, or those of the engine in hand."""
        return files if files is not None or self.engine is None else self.engine.files

    def _decide(self, req: RenderRequest, files: ModelFiles | None):
        from wanrender.runtime.planner import plan_render

        gpu = self.gpu if self.gpu is not None or self.engine is None else self._live_gpu()
        return plan_render(req, files, self.device, gpu=gpu, weights=self.weights, gpus=self.gpus)  # refuses here

    def _live_gpu(self):
        """This GPU as the next render finds it: what the device has free plus what this
        process's allocator holds (the loaded engine, cached blocks), which the render
        may reuse. Planning on free memory alone would count the loaded models against
        themselves and push a second render on a small card to a leaner plan, or refuse it."""
        from wanrender.runtime import gpus

        if self.device.type != "cuda":
            return None
        live = gpus.probe(self.device)
        return replace(live, free_gib=live.free_gib + torch.cuda.memory_reserved(self.device) / 2**30)

    # --- 3: load or reuse
    def ensure_engine(
        self, config: EngineConfig, files: ModelFiles | None, progress: Progress | None = None, early=None
    ) -> dict[str, float]:
        """Load the models for ``config``, or configure the loaded engine; returns seconds spent loading.
        ``early``: (request, fitted image) to condition while a fresh load's experts arrive."""
        if self.engine is not None and (files is None or self.engine.files == files):
            try:
                spent = self.engine.configure(config)
            except torch.cuda.OutOfMemoryError:
                raise WanrenderError(_LOAD_OOM) from None
            if spent and progress:
                progress(Stage.LOAD_MODELS.value, None, None, f"{spent[Stage.LOAD_MODELS.value]:.2f}s")
            return spent
        if files is None:
            raise WanrenderError("no model files and no engine to render with — pass the model files")
        self.close()
        if progress:
            progress(Stage.LOAD_MODELS.value, None, None, "start")
        try:
            self.engine = Engine.load(files, self.device, config, early=early)
        except torch.cuda.OutOfMemoryError:
            raise WanrenderError(_LOAD_OOM) from None
        if progress:
            progress(Stage.LOAD_MODELS.value, None, None, f"{self.engine.load_seconds:.2f}s")
        return {Stage.LOAD_MODELS.value: self.engine.load_seconds}

    def close(self) -> None:
        """Drop the engine and the memory it holds."""
        if self.engine is not None:
            self.engine.release()
            self.engine = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # --- the whole path
    def render(self, req: RenderRequest, files: ModelFiles | None = None, progress: Progress | None = None,
               write: bool = True, swap_experts: bool = False, encode: bool = False) -> RenderResult:  # fmt: skip
        """The request, rendered; with ``write`` the MP4 and the sidecar written. ``encode``
        (with ``write`` off): the encoder still takes the frames as the VAE decodes them, and is
        handed back open in ``result.encoder`` for the caller to finish elsewhere (a service
        worker's finishing thread), so the video costs no full encode after the decode."""
        files = self._files(files)
        prep = self.prepare(req, files)
        req = prep.req
        if write:
            self._hash_in_background(files)
        from wanrender.runtime.gpus import process_seconds

        at_load = process_seconds() if self.one_shot else None
        loading = self.ensure_engine(prep.config, files, progress, early=(req, prep.image))
        stream = None
        try:
            stream = self._stream(req, write or encode)
            try:
                result = self.engine.render(req, prep.image, progress, swap_experts, stream and stream.put,
                                            self.parallel)  # fmt: skip
            except torch.cuda.OutOfMemoryError as e:
                stream = _abort(stream)
                if not self.step_down:  # the allocator's error stays attached: the bench logs its words
                    raise WanrenderError(
                        f"the GPU ran out of memory at {req.render.label()} on plan '{prep.memory.plan.short()}'"
                    ) from e
                if not hasattr(prep.memory.decision, "chosen"):  # not planned against a GPU's memory
                    raise WanrenderError(
                        f"the GPU ran out of memory at {req.render.label()} — try fewer frames, a smaller size or "
                        "--memory stream, or free GPU memory"
                    ) from None
                result = None
            if result is None:
                # Out of memory on an approved plan: another process took memory after planning.
                # Free what the plan placed (outside the except block, so the traceback's
                # tensors go too), step down once, and say so.
                lower = self._step_down(prep.memory, progress)
                loading.update(self.ensure_engine(replace(prep.config, memory=lower.plan), files, progress))
                stream = self._stream(req, write or encode)
                try:
                    result = self.engine.render(req, prep.image, progress, swap_experts, stream and stream.put,
                                                self.parallel)  # fmt: skip
                except torch.cuda.OutOfMemoryError:
                    raise WanrenderError(
                        f"the GPU ran out of memory again after stepping down to '{lower.plan.short()}' — free GPU memory and retry"
                    ) from None
            result.meta["load"] = loading
            result.meta["memory_record"] = prep.memory
            if at_load is not None:  # a one-video process: where its seconds outside the stages went
                result.meta["process_s"] = {"at_load": at_load}
            if self.engine.plan.compile != "off":
                from wanrender.runtime.plan import compile_key, remember_compiled

                remember_compiled(compile_key(self.device, req.render.tokens, self.engine.plan))
        except BaseException:
            _abort(stream)  # no encoder thread or half-written video left behind
            raise
        if write:
            self._write(req, result, prep.memory, progress, stream)
        else:
            result.encoder = stream
        return result

    @staticmethod
    def _stream(req: RenderRequest, write: bool):
        """An encoder fed while the VAE decodes (media.video.StreamingWriter), writing the
        video's temporary file; None when the frames must all exist first (interpolation)."""
        if not write or req.output.interpolate != "off":
            return None
        from wanrender.media.video import StreamingWriter
        from wanrender.outputs import video_partial

        out = req.output.out
        return StreamingWriter(video_partial(out), fps=req.output.fps, crf=req.output.crf,
                               preset=req.output.x264_preset, shown_as=out)  # fmt: skip

    def _step_down(self, memory: MemoryRecord, progress: Progress | None):
        from wanrender.runtime.planner import step_down

        failed = memory.plan
        self.engine.release()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        lower = step_down(memory.decision, failed, self.gpu if self.gpu is not None else self._live_gpu())
        if lower is None:
            raise WanrenderError(
                f"the GPU ran out of memory on plan '{failed.short()}' and no leaner plan fits the memory free now "
                "— free GPU memory (another process took it) and retry"
            )
        msg = f"out of memory on plan '{failed.short()}' (another process took GPU memory?) — stepped down to '{lower.plan.short()}'"
        log.warning(msg)
        memory.fallback = {"from": failed.to_json(), "to": lower.plan.to_json(), "message": msg}
        memory.after = lower
        self._fell_back[failed] = (lower, memory.fallback)
        if progress:
            progress(Stage.MEMORY.value, None, None, msg)
        return lower

    def _hash_in_background(self, files: ModelFiles | None) -> None:
        """Start the sidecar's checksums now, off the critical path (once per file set)."""
        from wanrender.media.sidecar import FileHashes

        wanted = files.as_dict() if files is not None else {}
        if self._hashes is None or not self._hashes.covers(wanted):
            self._hashes = FileHashes(wanted)

    # --- 6: outputs
    def _write(self, req: RenderRequest, result: RenderResult, memory: MemoryRecord, progress: Progress | None,
               stream=None) -> None:  # fmt: skip
        from wanrender.outputs import interpolate, write_outputs

        frames = interpolate(req, result.frames, self.device, result.timings, result.meta, progress)
        result.video, result.sidecar = write_outputs(
            req,
            frames,
            result.frames,
            result.timings,
            # The streamed encoder hashed the rendered frames as they came (the same bytes).
            lambda: sidecar(
                req,
                self.engine,
                result,
                memory,
                self._hashes,
                self._parallel_record(),
                stream.frames_sha256 if stream is not None else None,
            ),  # fmt: skip
            progress,
            stream=stream,
        )

    def _parallel_record(self) -> dict:
        if self.parallel is None:
            return {"gpus": 1, "mode": "none"}
        return self.parallel.describe()


def _abort(stream) -> None:
    if stream is not None:
        stream.abort()


def frames_sha256(frames) -> str:
    import hashlib

    import numpy as np

    a = np.ascontiguousarray(frames, dtype=np.uint8)
    return hashlib.sha256(memoryview(a).cast("B") if a.size else b"").hexdigest()


def sidecar(req: RenderRequest, engine: Engine, result: RenderResult, memory: MemoryRecord | None = None,
            hashes=None, parallel: dict | None = None, frames_digest: str | None = None,
            tail: bool = True) -> dict:  # fmt: skip
    """``hashes``: a media.sidecar.FileHashes already under way for the engine's files;
    ``parallel``: how many GPUs rendered it, and how (one, when not given);
    ``frames_digest``: the frames' SHA-256 when already known (the streamed encoder's);
    ``tail``: record ``tail_s`` (off where the sidecar is made before the encoder ends)."""
    from wanrender.media.sidecar import describe_files, versions

    if engine.files is None:
        models = {}
    elif hashes is not None and hashes.covers(engine.files.as_dict()):
        models = hashes.describe()
    else:
        models = describe_files(engine.files.as_dict())
    from wanrender.pipeline.i2v import passes
    from wanrender.runtime.gpus import peak_rss_bytes, process_seconds

    s = result.meta.get("step_seconds", [])
    runtime = engine.plan.to_json() if engine.plan is not None else None
    if runtime is not None and memory is not None:
        runtime["memory"] = memory.to_json(result.meta.get("memory"))
    return {
        "request": req.to_json(),
        "plan": {
            "device": str(engine.device),
            "compute_dtype": str(engine.high.compute_dtype).replace("torch.", ""),
            "attention": engine.plan.attention if engine.plan is not None else "?",
            "passes": [p.__dict__ for p in passes(req.sampling)],
            "lora": engine.lora_report,
            "runtime": runtime,
            "parallel": parallel or {"gpus": 1, "mode": "none"},
        },
        "models": models,
        "seed": req.render.seed,
        "noise": "torch.randn on the CPU, fp32, torch.Generator().manual_seed(seed), shape [1,16,T,H/8,W/8]",
        "frames": int(result.frames.shape[0]),
        # Same seed and settings -> the same frames, bit for bit; the MP4's bytes may
        # still differ (x264 in a torch process is not reproducible), so compare this.
        "frames_sha256": frames_digest or frames_sha256(result.frames),
        "frames_sha256_of": "the rendered uint8 RGB frames [T,H,W,3], before interpolation and video encoding",
        "interpolation": result.meta.get("interpolation"),
        "size": [int(result.frames.shape[2]), int(result.frames.shape[1])],
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "render_s": round(result.render_seconds(), 3),
        "during_load": list(result.during_load),
        "seconds_per_step": round(sum(s) / len(s), 4) if s else None,
        "step_s": [round(x, 3) for x in s],
        "load_models_s": round(result.meta.get("load", {}).get(Stage.LOAD_MODELS.value, 0.0), 3),
        "load_parts_s": {k: round(v, 3) for k, v in engine.load_parts.items()},
        "peak_vram_bytes": result.peak_vram_bytes,
        "peak_host_rss_bytes": peak_rss_bytes(),
        # A one-video process: seconds since it started, when its load began and now (the
        # sidecar is written last): with the command's wall time, what lies outside the stages.
        "process_s": {**result.meta["process_s"], "at_sidecar": process_seconds()}
        if "process_s" in result.meta
        else None,
        "versions": versions(),
        # From the end of the last DiT step to this sidecar, the last thing before the
        # files take their names: decode, the encoder's end, hashing (issue #13's "tail").
        "tail_s": round(time.perf_counter() - result.meta["sampled_at"], 3)
        if tail and "sampled_at" in result.meta
        else None,
    }
