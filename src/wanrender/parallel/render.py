"""``wanrender generate --gpus N``: N processes (one per GPU; CPU processes with gloo
in tests) render one video together.

- Before any process starts, the parent runs every check a one-GPU render runs
  (``Runner.prepare``: inputs, model files, outputs, the memory plan for N GPUs) and
  the ones of several processes: N divides the DiT's head count (read from the high
  expert's header), the device can run several processes, N GPUs are present.
- Every rank loads all models (both experts replicated) and checks that the ranks
  hold the same ones (``check_replicas``). Every rank encodes the prompt and the
  image; rank 0's conditioning is broadcast so that all ranks denoise exactly the
  same inputs.
- The DiT runs sequence-parallel (``SequenceParallel``); every rank gets the whole
  output of each step, so the samplers stay in step without further exchange.
- The VAE decode is split by rows over the ranks (``parallel/decode.py``; a tiled
  decode, planned for small cards, stays on rank 0). Rank 0 gathers the frames and
  writes the outputs all or nothing, with the sidecar recording ``gpus``, the mode and
  how the decode ran. A rank that fails ends the run as one line (``launch``) and no
  output is written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wanrender.errors import WanrenderError
from wanrender.models.inventory import ModelFiles
from wanrender.parallel.launch import World, check_world, launch
from wanrender.parallel.ulysses import SequenceParallel, check_replicas
from wanrender.spec import RenderRequest

MODE = "ulysses"


@dataclass(frozen=True)
class Ranks:
    """What the engine needs to be one rank of a sequence-parallel render."""

    world: World
    # Called by every rank before each DiT forward (parallel/group.py: where a long-lived
    # group stops a render on all ranks together); None for a one-video run.
    gate: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        return self.world.size

    def decode(self, vae, latent: torch.Tensor, tiled: bool, on_frames=None):
        """The frames on rank 0 (an empty array on the others): a band of rows per rank
        where the latent has a row per rank; a tiled decode on rank 0 alone."""
        import numpy as np

        from wanrender.parallel.decode import can_split, split_decode
        from wanrender.pipeline import i2v

        # Rank 0's plan decides for all: each rank planned against its own free memory, and
        # ranks that chose differently would wait in the split decode's gathers for ever.
        tiled = bool(self.share(torch.tensor([int(tiled)], device=latent.device)).item())
        if not tiled and can_split(latent.shape[-2], self.size):
            return split_decode(vae, latent, on_frames)
        if self.world.rank == 0:
            return i2v.decode(vae, latent, tiled=tiled, on_frames=on_frames)
        s = vae.config.spatial_stride
        return np.zeros((0, latent.shape[-2] * s, latent.shape[-1] * s, 3), np.uint8)

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (same shape everywhere)."""
        t = t.contiguous()
        dist.broadcast(t, src=0)
        return t

    def wrap(self, model) -> SequenceParallel:
        return SequenceParallel(model, gate=self.gate)

    def describe(self) -> dict:
        return {"gpus": self.size, "mode": MODE, "encode": "every rank, rank 0's result broadcast",
                "decode": f"rows split over {self.size} ranks (rank 0 alone for a tiled decode)"}  # fmt: skip


def dit_heads(files: ModelFiles) -> int:
    from wanrender.models.loading import dit_config

    return dit_config(files.high).num_heads


def check_parallel(device: torch.device, gpus: int, files: ModelFiles | None, memory: str = "auto") -> int | None:
    """The checks of several processes that need no process; returns the head count."""
    from wanrender.runtime.planner import check_parallel_memory

    check_parallel_memory(memory, gpus)
    if device.type == "cuda" and device.index is not None and gpus > 1:
        raise WanrenderError(
            f"--device {device} names one GPU but --gpus {gpus} asks for several — use --device cuda and choose the "
            "GPUs with CUDA_VISIBLE_DEVICES"
        )
    heads = dit_heads(files) if files is not None else None
    check_world(gpus, heads, device.type)
    return heads


def render_parallel(req: RenderRequest, files: ModelFiles, device: torch.device, gpus: int,
                    show_progress: bool = True):  # fmt: skip
    """Render ``req`` on ``gpus`` ranks; returns rank 0's ``RenderResult`` (without frames)."""
    import numpy as np

    from wanrender.engine import RenderResult
    from wanrender.runner import Runner

    heads = check_parallel(device, gpus, files, req.knobs.memory)
    prep = Runner(device, gpus=gpus).prepare(req, files)  # every one-GPU check, before a process starts
    # The ranks' Runner.prepare repeats the plan; the parent's CUDA probe is done by then.
    out = launch(_rank_render, gpus, device.type, args=(prep.req, files, show_progress), heads=heads)[0]
    result = RenderResult(out["video"], out["sidecar"], np.zeros((0, 0, 0, 3), np.uint8), torch.empty(0),
                          out["timings"], out["peak_vram_bytes"], out["meta"])  # fmt: skip
    return result


def _print_progress(stage: str, step: int | None, total: int | None, detail: str) -> None:
    where = f" {step}/{total}" if step is not None else ""
    print(f"{stage}{where} {detail}", file=sys.stderr, flush=True)


def _rank_render(world: World, req: RenderRequest, files: ModelFiles, show_progress: bool) -> dict | None:
    from wanrender.runner import Runner

    # No step-down after an out-of-memory error: a leaner plan would stream or chunk
    # the blocks, which sequence parallelism does not do; the error ends the run.
    runner = Runner(world.device, one_shot=True, step_down=False, parallel=Ranks(world))
    prep = runner.prepare(req, files)
    runner.ensure_engine(prep.config, files)
    check_replicas([runner.engine.high, runner.engine.low])
    progress = _print_progress if world.rank == 0 and show_progress else None
    result = runner.render(req, files, progress, write=world.rank == 0)
    if world.rank != 0:
        return None
    meta = {k: result.meta[k] for k in ("step_seconds", "memory") if k in result.meta}
    return {"video": result.video, "sidecar": result.sidecar, "timings": result.timings,
            "peak_vram_bytes": result.peak_vram_bytes, "meta": meta}  # fmt: skip


def render_repeats(req: RenderRequest, files: ModelFiles, device: torch.device, gpus: int, repeats: int,
                   warmup: bool) -> dict:  # fmt: skip
    """The bench lab's case on ``gpus`` ranks: load, an untimed warm-up render, then
    ``repeats`` timed renders (nothing written); rank 0's numbers, as bench/child.py
    records them for one GPU."""
    heads = check_parallel(device, gpus, files, req.knobs.memory)
    return launch(_rank_repeats, gpus, device.type, args=(req, files, repeats, warmup), heads=heads)[0]


def _rank_repeats(world: World, req: RenderRequest, files: ModelFiles, repeats: int, warmup: bool) -> dict:
    import time

    from wanrender.runner import Runner

    cuda = world.device.type == "cuda"
    runner = Runner(world.device, step_down=False, parallel=Ranks(world))
    t = time.time()
    prep = runner.prepare(req, files)
    runner.ensure_engine(prep.config, files)
    check_replicas([runner.engine.high, runner.engine.low])
    out: dict = {"memory_plan": prep.memory.plan.describe(), "load_s": round(time.time() - t, 3),
                 "plan": runner.engine.plan.to_json(), "windows": [], "repeats": [], "gpus": world.size,
                 "notes": [f"{world.size} ranks, sequence parallel; the numbers are rank 0's"]}  # fmt: skip
    for i in range(-1 if warmup else 0, repeats):
        dist.barrier()  # every rank starts together: the wall time is the slowest rank's
        if cuda:
            torch.cuda.reset_peak_memory_stats(world.device)
        t = time.time()
        result = runner.render(req, files, write=False)
        t_end = time.time()
        if i < 0:
            out["windows"].append(("warmup", t, t_end))
            out["warmup_s"] = round(t_end - t, 3)
            continue
        steps = result.meta.get("step_seconds") or []
        out["windows"].append((f"repeat {i + 1}", t, t_end))
        out["repeats"].append({
            "wall_s": round(t_end - t, 4), "timings": {k: round(v, 4) for k, v in result.timings.items()},
            "s_per_step": round(sum(steps) / len(steps), 4) if steps else None, "steps": len(steps),
            "torch_allocated_peak": int(torch.cuda.max_memory_allocated(world.device)) if cuda else None,
            "torch_reserved_peak": int(torch.cuda.max_memory_reserved(world.device)) if cuda else None,
        })  # fmt: skip
    return out
