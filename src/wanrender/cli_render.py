"""The commands that render and write videos: ``generate``, ``demo``, ``interpolate``.

They live here, not in ``cli.py``, to keep that file small; ``cli.py`` calls
``register`` once. Every check that needs no model runs before the first byte of
weights is read, and nothing already on disk is replaced unless ``--overwrite``
says so: a refused or failed render leaves earlier files exactly as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from wanrender.cli_errors import check_interrupted
from wanrender.cli_errors import fail as _fail
from wanrender.cli_errors import pair as _pair
from wanrender.errors import WanrenderError, shown

console = Console(stderr=True)

OVERWRITE_HELP = "Replace an existing output (without it, an existing file is refused before any work)."
DETERMINISM = (
    "Same seed and settings give bit-identical frames (the sidecar's frames_sha256 proves it); the MP4 bytes "
    "may still differ between runs, at the encoder level."
)


def _check_outputs(req, overwrite: bool) -> None:
    """What cannot be written is refused first (--overwrite would not help), then
    earlier files: replacing them is a choice the user makes with --overwrite."""
    from wanrender.outputs import check_out

    check_out(req)
    _refuse_existing(req.output.out, req.output.save_frames, overwrite)


def _refuse_existing(out: Path, save_frames: bool, overwrite: bool, flag: str = "--out") -> None:
    from wanrender.outputs import existing_outputs

    found = existing_outputs(out, save_frames)
    if found and not overwrite:
        raise WanrenderError(
            f"{shown(found[0])} exists — pass --overwrite to replace it (a failed run keeps it), "
            f"or choose another {flag}"
        )


def _progress_printer():
    """A rich progress display driven by the engine's (stage, step, total, detail) events."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console, transient=False,
    )  # fmt: skip
    tasks: dict[str, int] = {}

    def on_event(stage: str, step: int | None, total: int | None, detail: str) -> None:
        check_interrupted()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or 1, detail="")
        tid = tasks[stage]
        if step is None:
            done = detail != "start"
            bar.update(tid, completed=1 if done else 0, detail=detail if done else "…")
        else:
            bar.update(tid, total=total, completed=step, detail=detail)

    return bar, on_event


def _summary(result, req) -> None:
    from rich.table import Table

    t = Table(title="Render summary", title_justify="left", show_header=True)
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    early = result.during_load  # conditioned while the experts loaded
    for k, v in result.timings.items():
        t.add_row(f"{k} (during the load)" if k in early else k, f"{v:.2f}")
    t.add_row("[bold]total[/]" + (" (after the load)" if early else ""), f"{result.render_seconds():.2f}")
    Console().print(t)
    steps = result.meta.get("step_seconds") or []
    out = Console()
    if steps:
        out.print(f"s/step: {sum(steps) / len(steps):.3f} over {len(steps)} steps", highlight=False)
    if result.peak_vram_bytes is not None:
        out.print(f"peak VRAM: {result.peak_vram_bytes / 2**30:.2f} GiB", highlight=False)
    from wanrender.runtime.gpus import peak_rss_bytes

    mem = result.meta.get("memory")
    out.print(
        f"peak host RSS: {peak_rss_bytes() / 2**30:.2f} GiB" + (f"; memory plan: {mem['describe']}" if mem else ""),
        highlight=False,
    )
    out.print(f"[bold green]video:[/] {result.video}  [dim](sidecar {result.sidecar})[/]", highlight=False)


def _run_render(req, files, device, gpus: int = 1) -> None:
    from wanrender.runner import Runner

    if gpus > 1:
        from wanrender.parallel.render import render_parallel

        console.print(f"rendering on {gpus} {'GPUs' if device.type == 'cuda' else 'CPU processes'} "
                      "(sequence parallel); rank 0 reports:", highlight=False)  # fmt: skip
        _summary(render_parallel(req, files, device, gpus), req)
        return
    bar, on_event = _progress_printer()
    with bar:
        result = Runner(device, one_shot=True).render(req, files, progress=on_event)
    _summary(result, req)
    if device.type == "cuda":
        from wanrender.cli_errors import skip_teardown

        skip_teardown()


def generate(
    image: Optional[Path] = typer.Argument(
        None, help="Start image (PNG, JPEG, WebP); with --workflow, default: its LoadImage file in --input-dir."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What should happen in the video."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt (used when cfg != 1)."),
    preset: str = typer.Option("turbo", "--preset", help="turbo (4 steps + LoRAs), quality (20 steps, cfg 3.5)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames, 4k+1 (81 = 5 s at 16 fps)."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16 (e.g. 832x1216)."),
    steps: Optional[int] = typer.Option(None, "--steps"),
    switch: Optional[int] = typer.Option(None, "--switch", help="Step where the low-noise expert takes over."),
    boundary: Optional[float] = typer.Option(
        None, "--boundary", help="Switch by the official rule instead: t >= B x 1000 -> high expert (0.9)."
    ),
    cfg: Optional[float] = typer.Option(None, "--cfg"),
    shift: Optional[str] = typer.Option(None, "--shift", help="S or S_HIGH,S_LOW."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler or dpmpp_2m."),
    seed: int = typer.Option(0, "--seed"),
    fit: str = typer.Option("crop", "--fit", help="crop (fill, like ComfyUI) or pad."),
    interpolate: str = typer.Option("off", "--interpolate", help="off, rife or dis: raise the frame rate to --fps."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Output fps (16; 32 by default with --interpolate)."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality, lower is better."),
    x264_preset: Optional[str] = typer.Option(
        None, "--x264-preset", help="x264 speed: veryfast (default) ... veryslow (smaller files, slower encode)."
    ),
    save_frames: bool = typer.Option(False, "--frames-png", help="Also save PNG frames."),
    models: Optional[Path] = typer.Option(None, "--models", help="Folder with the model files."),
    high: Optional[Path] = typer.Option(None, "--high"),
    low: Optional[Path] = typer.Option(None, "--low"),
    vae: Optional[Path] = typer.Option(None, "--vae"),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer"),
    lora_high: Optional[Path] = typer.Option(None, "--lora-high"),
    lora_low: Optional[Path] = typer.Option(None, "--lora-low"),
    lora_strength: Optional[str] = typer.Option(None, "--lora-strength", help="S or S_HIGH,S_LOW."),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Output .mp4 (default: a new name under outputs/); its sidecar is the same name .json.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: cuda if present)."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp8 (compute capability >= 8.9) or bf16."),
    attention: str = typer.Option(
        "auto", "--attention", help="auto or a backend: sdpa, sdpa-cudnn, sdpa-flash, flash-attn, sage, sage8."
    ),
    compile: str = typer.Option(
        "off", "--compile", help="off, default or max-autotune (regional: the repeated block)."
    ),
    profile: str = typer.Option(
        "auto",
        "--profile",
        help="auto (the GPU profile matching this device fills the knobs you did not set), off, or a profile YAML.",
    ),
    ctx: typer.Context = None,  # which knobs were given on the command line (a profile fills only the others)
    memory: str = typer.Option(
        "auto", "--memory", help="auto, resident, swap or stream: where the weights live (see 'wanrender plan')."
    ),
    reserve_vram: Optional[float] = typer.Option(
        None, "--reserve-vram", help="GiB of GPU memory to leave free (default 0.5)."
    ),
    workflow: Optional[Path] = typer.Option(
        None,
        "--workflow",
        help="Render a ComfyUI workflow file (editor or API format); the flags you give override its values.",
    ),
    comfy_root: Optional[Path] = typer.Option(
        None, "--comfy-root", help="With --workflow: find its model files in this ComfyUI (and its input/ images)."
    ),
    input_dir: Optional[Path] = typer.Option(
        None, "--input-dir", help="With --workflow: where its LoadImage file is (default: COMFY_ROOT/input, or .)."
    ),
    gpus: int = typer.Option(
        1,
        "--gpus",
        help="GPUs sharing this one video (one process each, sequence parallel; N must divide the DiT's heads, "
        "40 for Wan: 2, 4, 5 or 8). With --device cpu: N CPU processes (for tests).",
    ),
) -> None:
    """Render a video from IMAGE and a prompt, or from a ComfyUI workflow (--workflow).

    Writes OUT.mp4 and OUT.json (the sidecar: request, plan, model hashes, timings). Same seed and settings give
    bit-identical frames (the sidecar's frames_sha256 proves it); the MP4 bytes may still differ between runs, at
    the encoder level. An existing output is replaced only with --overwrite; a failed render keeps it. With
    --gpus N the frames match one GPU's within rounding (the sidecar records gpus and the mode)."""
    from wanrender.models.inventory import resolve_files
    from wanrender.request import from_preset, with_fields

    try:
        from wanrender.outputs import default_out
        from wanrender.runner import resolve_device
        from wanrender.spec import parse_size

        dev = resolve_device(device)
        if gpus > 1 and device is None and dev.type == "cpu":
            raise WanrenderError(
                f"--gpus {gpus} needs CUDA GPUs and none is visible — run on a GPU machine, or pass --device cpu "
                "to run that many CPU processes (tests)"
            )
        if workflow is not None:
            from wanrender.cli_workflow import workflow_request

            req, files = workflow_request(ctx)
        else:
            if comfy_root is not None or input_dir is not None:
                raise WanrenderError("--comfy-root and --input-dir go with --workflow — pass --workflow FILE")
            if image is None or prompt is None:
                missing = "IMAGE" if image is None else "--prompt"
                raise WanrenderError(f"missing {missing} — pass IMAGE and --prompt, or a ComfyUI --workflow FILE")
            width, height = parse_size(size, "--size") if size else (None, None)
            sh, sl = _pair(shift, "--shift")
            lh, ll = _pair(lora_strength, "--lora-strength")
            req = from_preset(
                preset, image, prompt, negative=negative, frames=frames, width=width, height=height, steps=steps,
                switch=switch, cfg=cfg, shift_high=sh, shift_low=sl, sampler=sampler, seed=seed, fit=fit, fps=fps,
                interpolate=interpolate, boundary=boundary, precision=precision, attention=attention, compile=compile,
                memory=memory, reserve_vram=reserve_vram, crf=crf, x264_preset=x264_preset, save_frames=save_frames, out=out, lora_strength_high=lh, lora_strength_low=ll,
            )  # fmt: skip
            files = None
        from wanrender.bench.commands import profile_for_generate

        req = profile_for_generate(req, profile, str(dev), ctx)
        if files is None:
            files = resolve_files(models, high, low, vae, text_encoder, tokenizer, lora_high, lora_low)
        if out is None:
            req = with_fields(req, out=default_out(req))
        from wanrender.runtime.plan import make_plan

        make_plan(dev, req.knobs.precision, req.knobs.attention, req.knobs.compile)  # flag errors before "exists"
        if gpus != 1:
            from wanrender.parallel.render import check_parallel

            check_parallel(dev, gpus, files, req.knobs.memory)
        _check_outputs(req, overwrite)
        _run_render(req, files, dev, gpus)
    except WanrenderError as e:
        _fail(e)


def demo(
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output .mp4 (default outputs/demo.mp4, replaced by every demo run)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out (the default is always replaced)."
    ),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Render the embedded demo: a real photo through the real pipeline with tiny RANDOM-weight models.

    Writes outputs/demo.mp4 and demo.json, replacing those of the previous demo run; a --out that exists is
    replaced only with --overwrite. A failed run keeps the earlier files."""
    from wanrender.demo import demo_image, ensure_demo_models
    from wanrender.request import from_preset

    console.print(
        "[yellow]Demo:[/] tiny models of the Wan 2.2 architecture with [bold]random weights[/] — the video is "
        "structured noise, not a real animation. For real renders: 'wanrender models fetch --dir models' then "
        "'wanrender generate IMAGE --prompt ... --models models'.",
        highlight=False,
    )
    try:
        from wanrender.runner import resolve_device

        dev = resolve_device(device)
        req = from_preset("demo", demo_image(), "slow dolly-in, gentle camera motion, soft light", seed=seed,
                          out=out or Path("outputs/demo.mp4"))  # fmt: skip
        _check_outputs(req, overwrite or out is None)
        files = ensure_demo_models()
        _run_render(req, files, dev)
    except WanrenderError as e:
        _fail(e)


def interpolate(
    src: Path = typer.Argument(..., help="Input video."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .mp4."),
    multiplier: int = typer.Option(2, "-x", help="Frame-rate multiplier (2..16)."),
    method: str = typer.Option("rife", "--method", help="rife (needs 'models fetch rife'), dis, blend or repeat."),
    device: Optional[str] = typer.Option(None, "--device", help="For rife: cuda, cuda:N or cpu."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality, lower is better."),
    x264_preset: Optional[str] = typer.Option(
        None, "--x264-preset", help="x264 speed: veryfast (default) ... veryslow (smaller files, slower encode)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Raise a video's frame rate by MULTIPLIER (16 fps Wan output -> 32 fps with -x 2).

    The audio track is copied unchanged (a note says when it cannot be); odd frame sizes are padded to even
    ones (H.264 needs them). OUT must not be the input; an existing OUT is replaced only with --overwrite."""
    from rich.progress import Progress

    from wanrender.interp import interpolate_video

    try:
        from wanrender.interp import check_paths
        from wanrender.runner import resolve_device

        if device is not None:
            device = str(resolve_device(device))
        check_paths(src, out)  # the input itself is refused even with --overwrite
        _refuse_existing(out, False, overwrite, "-o")
        bar = Progress(console=console)
        tasks: list = []

        def on_progress(done: int, total: int | None) -> None:
            check_interrupted()
            if not tasks:  # shown from the first frame on: errors found before the work stay one line
                bar.start()
                tasks.append(bar.add_task(f"interpolate x{multiplier}", total=None))
            bar.update(tasks[0], completed=done, total=total)

        try:
            info = interpolate_video(src, out, multiplier, method, device, progress=on_progress, crf=crf,
                                     x264_preset=x264_preset)  # fmt: skip
        finally:
            bar.stop()
    except WanrenderError as e:
        _fail(e)
        return
    for note in (
        f"frames are odd-sized; padded to {info['padded_to'][0]}x{info['padded_to'][1]} (H.264 needs even sides)"
        if info.get("padded_to") else None,
        f"the audio track was dropped: {info['audio'][len('dropped: '):]}" if str(info.get("audio")).startswith("dropped") else None,
    ):  # fmt: skip
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    Console().print(
        f"{info['frames_in']} -> {info['frames_out']} frames, {info['fps_in']:g} -> {info['fps_out']:g} fps "
        f"({method} on {info['device']}): {info['seconds_total']:.2f} s total, {info['seconds_model']:.2f} s interpolating; "
        f"scene cuts at {info['scene_cuts'] or 'none'}; audio: {info.get('audio') or 'none'}\nwrote {shown(out)}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(demo)
    app.command()(interpolate)
