"""The two-GPU expert pipeline: a stream of jobs through two processes, each holding
one expert, so no weights move at the switch (``wanrender batch --pipeline experts``).

- Process A (rank 0) holds the high-noise expert, the text encoder and the VAE (for
  the encode). Per job it encodes prompt and image, runs pass 1, and hands B what
  pass 2 needs (latent, noise, image conditioning, text embeddings) with a
  non-blocking send; then it starts the next job while B works.
- Process B (rank 1) holds the low-noise expert and the VAE (for the decode). Per
  job it receives, runs pass 2, decodes and writes the outputs (all or nothing, the
  sidecar recording the pipeline and both sides' timestamps).

A holds at most one hand-off in flight (it waits for job k's before sending k+1),
so the two sides run at the pace of the slower one. Each side computes exactly what
the one-process render computes for its half (``pipeline.i2v``: the same passes,
the same seeded noise, LoRAs merged and precision applied as the engine does), so
the videos are the one-process ones within the rounding of different thread counts.
torch.compile is not applied here (eager blocks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wanrender.errors import WanrenderError
from wanrender.models.inventory import ModelFiles
from wanrender.parallel.launch import World, check_world, launch
from wanrender.pipeline import i2v
from wanrender.pipeline.sampling import cfg_velocity, run_pass
from wanrender.spec import RenderRequest

MODE = "experts"
HEADER = 40  # int64 slots: the tensor count, per tensor (5 at most) its rank and dims, side A's start and end (µs)


@dataclass
class Side:
    """What one process of the pipeline has loaded."""

    expert: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    lora: str | None = None
    attention: str = ""


def load_side(files: ModelFiles, which: str, device: torch.device, req: RenderRequest) -> Side:
    """One expert (LoRA merged, precision and attention as the engine applies them)
    and the VAE; for the high side also the text encoder and tokenizer."""
    from wanrender.kernels import attention as attn
    from wanrender.models import loading
    from wanrender.models.lora import apply_lora, parse_lora
    from wanrender.runtime.plan import apply_precision, make_plan

    cuda = device.type == "cuda"
    act = torch.bfloat16 if cuda else torch.float32
    k = req.knobs
    plan, _ = make_plan(device, k.precision, k.attention, "off")
    expert = loading.load_dit(getattr(files, which), device=device, compute_dtype=act)
    lora_path = getattr(files, f"lora_{which}")
    strength = getattr(req.render, f"lora_strength_{which}")
    report = None
    if lora_path is not None and strength:
        report = apply_lora(expert, parse_lora(lora_path, expert), strength, mode="merge").summary()
    apply_precision([expert], plan.precision)
    choice = attn.select(plan.attention, attn.Target.of(device, act, expert.cfg.head_dim),
                         eight_bit=plan.precision == "fp8")  # fmt: skip
    expert.attention = choice.fn
    vae = loading.load_vae(files.vae, device=device, dtype=torch.bfloat16 if cuda else None)
    stage = Side(expert, vae, lora=report, attention=plan.attention)
    if which == "high":
        stage.text_encoder = loading.load_text_encoder(files.text_encoder, device=device)
        stage.tokenizer = loading.load_tokenizer(files.tokenizer)
    return stage


def check_jobs(reqs: list[RenderRequest], files: ModelFiles, device: torch.device) -> list[RenderRequest]:
    """Every one-process check of every job (inputs, files, outputs), before a process
    starts; returns the jobs with their output names filled in."""
    from wanrender.runner import Runner

    if not reqs:
        raise WanrenderError("the jobs file lists no jobs — add at least one {image, prompt}")
    if device.type == "cuda" and device.index is not None:
        raise WanrenderError(f"--device {device} names one GPU; the expert pipeline uses two — use --device cuda")
    check_world(2, None, device.type)
    runner = Runner(device)
    out = [runner.prepare(r, files).req for r in reqs]
    seen: dict = {}
    for i, r in enumerate(out):
        if r.output.out in seen:
            raise WanrenderError(f"jobs {seen[r.output.out] + 1} and {i + 1} write the same output {r.output.out} "
                                 "— give each job its own out")  # fmt: skip
        seen[r.output.out] = i
    return out


def render_pipelined(reqs: list[RenderRequest], files: ModelFiles, device: torch.device) -> list[dict]:
    """Render the jobs through the two-process pipeline; one summary per job (video,
    sidecar, both sides' timestamps), in job order."""
    reqs = check_jobs(reqs, files, device)
    return launch(_pipeline_rank, 2, device.type, args=(reqs, files))[1]


def _pipeline_rank(world: World, reqs: list[RenderRequest], files: ModelFiles) -> list[dict] | None:
    if world.rank == 0:
        _side_a(world.device, reqs, files)
        return None
    return _side_b(world.device, reqs, files)


def _side_a(device: torch.device, reqs: list[RenderRequest], files: ModelFiles) -> None:
    from wanrender.media import image as imagemod
    from wanrender.models.text_encoder import encode_text
    from wanrender.request import negative_prompt

    stage = load_side(files, "high", device, reqs[0])
    in_flight: list = []  # the sends of the last hand-off, and their buffers (alive until waited for)
    for req in reqs:
        t0 = time.time()
        r, s = req.render, req.sampling
        image = imagemod.fit_image(imagemod.load_image(r.image), r.width, r.height, r.fit)
        prompts = [r.prompt] if s.cfg == 1.0 else [r.prompt, negative_prompt(req)]
        with torch.no_grad():
            text = encode_text(stage.text_encoder, stage.tokenizer, prompts, text_len=stage.expert.cfg.text_len)
        text = text.to(device)
        ctx, neg = text[:1], (text[1:] if s.cfg != 1.0 else None)
        cond = i2v.image_condition(stage.vae, image, r.frames).to(device)
        noise = i2v.initial_noise(r.seed, i2v.latent_shape(r.frames, r.width, r.height)).to(device)
        high, _ = i2v.passes(s)
        velocity = cfg_velocity(stage.expert, ctx, cond, s.cfg, neg)
        latent = run_pass(velocity, torch.zeros_like(noise), noise, high)
        t1 = time.time()
        _wait(in_flight)  # the previous hand-off must be through before the next one
        tensors = [latent, noise, cond, ctx] + ([neg] if neg is not None else [])
        header, payload = _pack(tensors, (t0, t1), device)
        in_flight = [(dist.isend(header, dst=1), header), (dist.isend(payload, dst=1), payload)]
    _wait(in_flight)


def _wait(in_flight: list) -> None:
    for work, _ in in_flight:
        work.wait()


def _side_b(device: torch.device, reqs: list[RenderRequest], files: ModelFiles) -> list[dict]:
    from wanrender.media.sidecar import FileHashes
    from wanrender.outputs import write_outputs

    stage = load_side(files, "low", device, reqs[0])
    hashes = FileHashes(files.as_dict())
    done = []
    for k, req in enumerate(reqs):
        header = torch.zeros(HEADER, dtype=torch.int64, device=device)
        dist.recv(header, src=0)
        shapes, (a0, a1) = _shapes(header)
        payload = torch.empty(sum(_numel(sh) for sh in shapes), dtype=torch.float32, device=device)
        dist.recv(payload, src=0)
        t0 = time.time()
        parts = _unpack(payload, shapes)
        latent, noise, cond, ctx = parts[:4]
        neg = parts[4] if len(parts) > 4 else None
        _, low = i2v.passes(req.sampling)
        velocity = cfg_velocity(stage.expert, ctx, cond, req.sampling.cfg, neg)
        latent = run_pass(velocity, latent, noise, low)
        t_pass = time.time()
        frames = i2v.decode(stage.vae, latent)
        timings = {"pass2_low": t_pass - t0, "vae_decode": time.time() - t_pass}
        record = {"gpus": 2, "mode": MODE, "job": k + 1, "jobs": len(reqs),
                  "side_a": {"holds": "high-noise expert, text encoder, VAE encode", "start": a0, "end": a1},
                  "side_b": {"holds": "low-noise expert, VAE decode", "start": t0}}  # fmt: skip
        video, sidecar = write_outputs(req, frames, frames, timings,
                                       lambda: _sidecar(req, stage, device, frames, timings, record, hashes))  # fmt: skip
        record["side_b"]["end"] = time.time()
        done.append({"video": video, "sidecar": sidecar, "timings": timings, **{k2: record[k2] for k2 in
                     ("side_a", "side_b")}})  # fmt: skip
    return done


def _sidecar(req, stage: Side, device, frames, timings: dict, record: dict, hashes) -> dict:
    from wanrender.media.sidecar import versions
    from wanrender.runner import frames_sha256

    record["side_b"]["end"] = time.time()
    return {
        "request": req.to_json(),
        "plan": {
            "device": str(device),
            "compute_dtype": str(stage.expert.compute_dtype).replace("torch.", ""),
            "attention": stage.attention,
            "passes": [p.__dict__ for p in i2v.passes(req.sampling)],
            "lora": {"low": stage.lora} if stage.lora else {},
            "parallel": record,
        },  # fmt: skip
        "models": hashes.describe(),
        "seed": req.render.seed,
        "frames": int(frames.shape[0]),
        "frames_sha256": frames_sha256(frames),
        "frames_sha256_of": "the rendered uint8 RGB frames [T,H,W,3], before video encoding",
        "size": [int(frames.shape[2]), int(frames.shape[1])],
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "versions": versions(),
    }


# --- the hand-off: one int64 header (shapes, side A's timestamps) and one fp32 payload


def _pack(tensors: list[torch.Tensor], times: tuple[float, float], device) -> tuple[torch.Tensor, torch.Tensor]:
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0] = len(tensors)
    for i, t in enumerate(tensors):
        header[1 + 6 * i] = t.dim()
        header[2 + 6 * i : 2 + 6 * i + t.dim()] = torch.tensor(t.shape)
    header[-4:-2] = torch.tensor([round(x * 1e6) for x in times])
    # fp32 holds every tensor here exactly (latents and conditioning are fp32, bf16 widens losslessly)
    payload = torch.cat([t.float().reshape(-1) for t in tensors])
    return header.to(device), payload


def _shapes(header: torch.Tensor) -> tuple[list[tuple[int, ...]], tuple[float, float]]:
    h = header.cpu().tolist()
    shapes = [tuple(h[2 + 6 * i : 2 + 6 * i + h[1 + 6 * i]]) for i in range(h[0])]
    return shapes, (h[-4] / 1e6, h[-3] / 1e6)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _unpack(payload: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, at = [], 0
    for sh in shapes:
        n = _numel(sh)
        out.append(payload[at : at + n].reshape(sh))
        at += n
    return out
