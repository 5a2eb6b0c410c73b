"""``wanrender batch JOBS``: several videos with the models loaded once, one after the
other (``--pipeline sequential``) or through the two-GPU expert pipeline
(``--pipeline experts``, parallel/experts.py).

The jobs file (YAML or JSON) is a list of mappings: ``image`` and ``prompt``
(required), ``out`` (default ``outputs/<jobs file name>_<n>.mp4``), ``seed`` (0),
``negative``. Paths are relative to the jobs file. Every job is checked (inputs,
model files, outputs) before any model is loaded or process started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from wanrender.errors import WanrenderError, shown

PIPELINES = ("sequential", "experts")
JOB_KEYS = ("image", "prompt", "out", "seed", "negative")


def read_jobs(path: Path) -> list[dict]:
    """The jobs file's entries, checked key by key (one-line errors naming the job)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WanrenderError(f"{shown(path)}: cannot read the jobs file ({e.strerror}) — check the path") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise WanrenderError(f"{shown(path)}: not a YAML or JSON list of jobs — see 'wanrender batch --help'") from None
    if not isinstance(doc, list) or not doc:
        raise WanrenderError(f"{shown(path)}: expected a non-empty list of jobs, e.g. - {{image: a.png, prompt: ...}}")
    base = path.parent
    jobs = []
    for i, job in enumerate(doc, 1):
        if not isinstance(job, dict):
            raise WanrenderError(f"{shown(path)}: job {i} is not a mapping — write {{image: ..., prompt: ...}}")
        unknown = sorted(set(job) - set(JOB_KEYS))
        if unknown:
            raise WanrenderError(f"{shown(path)}: job {i} has unknown key {unknown[0]!r} — use {', '.join(JOB_KEYS)}")
        missing = [k for k in ("image", "prompt") if not job.get(k)]
        if missing:
            raise WanrenderError(f"{shown(path)}: job {i} has no {missing[0]} — every job needs image and prompt")
        seed = job.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise WanrenderError(f"{shown(path)}: job {i} seed {seed!r} is not a whole number")
        out = Path(job["out"]) if job.get("out") else Path("outputs") / f"{path.stem}_{i}.mp4"
        jobs.append({"image": base / str(job["image"]), "prompt": str(job["prompt"]), "seed": seed,
                     "negative": job.get("negative"), "out": out if out.is_absolute() or not job.get("out")
                     else base / out})  # fmt: skip
    return jobs


def batch(
    jobs: Path = typer.Argument(..., help="YAML/JSON list of jobs: image, prompt, and optionally out, seed, negative."),
    pipeline: str = typer.Option(
        "sequential",
        "--pipeline",
        help="sequential (one process, models loaded once) or experts (two GPUs, one expert each: GPU A runs "
        "pass 1 of the next job while GPU B finishes the last).",
    ),
    models: Path = typer.Option(..., "--models", help="Folder with the model files."),
    preset: str = typer.Option("turbo", "--preset", help="turbo, quality (or demo, for the demo models)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames, 4k+1, for every job."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT for every job."),
    device: Optional[str] = typer.Option(
        None, "--device", help="cuda or cpu (default: cuda if present); experts with cpu: two CPU processes (tests)."
    ),
    save_frames: bool = typer.Option(False, "--frames-png", help="Also save PNG frames."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (a failed job keeps them)."),
) -> None:
    """Render every job of JOBS with the models loaded once.

    --pipeline experts needs two GPUs (or --device cpu): each holds one expert, so no weights move at the
    switch; the videos equal sequential ones within rounding, and each sidecar records both sides' timestamps."""
    from wanrender.cli_render import _check_outputs, _fail

    try:
        from wanrender.models.inventory import resolve_files
        from wanrender.request import from_preset
        from wanrender.runner import resolve_device
        from wanrender.spec import parse_size

        if pipeline not in PIPELINES:
            raise WanrenderError(f"--pipeline {pipeline!r} is invalid — use {' or '.join(PIPELINES)}")
        dev = resolve_device(device)
        if pipeline == "experts" and device is None and dev.type == "cpu":
            raise WanrenderError("--pipeline experts needs two CUDA GPUs and none is visible — run on a GPU "
                                 "machine, or pass --device cpu to run two CPU processes (tests)")  # fmt: skip
        width, height = parse_size(size, "--size") if size else (None, None)
        reqs = [from_preset(preset, j["image"], j["prompt"], negative=j["negative"], seed=j["seed"], out=j["out"],
                            frames=frames, width=width, height=height, save_frames=save_frames)
                for j in read_jobs(jobs)]  # fmt: skip
        files = resolve_files(models)
        for req in reqs:
            _check_outputs(req, overwrite)
        done = _run(reqs, files, dev, pipeline)
    except WanrenderError as e:
        _fail(e)
        return
    out = Console()
    for i, d in enumerate(done, 1):
        out.print(f"job {i}: {d['video']}  [dim](sidecar {d['sidecar']})[/]", highlight=False)


def _run(reqs, files, dev, pipeline: str) -> list[dict]:
    if pipeline == "experts":
        from wanrender.parallel.experts import render_pipelined

        return render_pipelined(reqs, files, dev)
    from wanrender.runner import Runner

    runner = Runner(dev)
    done = []
    for req in reqs:
        r = runner.render(req, files)
        done.append({"video": r.video, "sidecar": r.sidecar})
    return done


def register(app: typer.Typer) -> None:
    app.command()(batch)
