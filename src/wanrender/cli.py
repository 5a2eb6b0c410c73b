"""The ``wanrender`` command line. Logging is set up here, once; imports stay lazy
so that ``wanrender --help`` is instant and nothing touches a GPU until asked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from wanrender.errors import WanrenderError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fast Wan 2.2 image-to-video rendering.")
models_app = typer.Typer(no_args_is_help=True, help="Inspect and fetch model files.")
app.add_typer(models_app, name="models")
console = Console(stderr=True)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    from wanrender.log import setup_logging
    from wanrender.runtime.memory import default_allocator_config

    setup_logging(verbose)
    # Before any command touches CUDA; bench children inherit it, and the bench's
    # environment fingerprint records it.
    default_allocator_config()
    _default_compile_cache()


def _default_compile_cache() -> None:
    """Keep Inductor's cache between runs (the first compile of a shape is the slow one),
    unless the user chose a folder: process set-up, done here once, not by the library."""
    import os

    from wanrender.runtime.plan import compile_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache_dir())


def _fail(err: Exception) -> None:
    from wanrender.cli_errors import flagged

    console.print(f"[bold red]error:[/] {flagged(err)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def version() -> None:
    """Print the version."""
    from wanrender import __version__

    typer.echo(__version__)


def _progress_printer():
    """A rich progress display driven by the engine's (stage, step, total, detail) events."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console, transient=False,
    )  # fmt: skip
    tasks: dict[str, int] = {}

    def on_event(stage: str, step: int | None, total: int | None, detail: str) -> None:
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
    for k, v in result.timings.items():
        t.add_row(k, f"{v:.2f}")
    t.add_row("[bold]total[/]", f"{sum(v for k, v in result.timings.items() if k != 'sampling'):.2f}")
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


def _run_render(req, files, device) -> None:
    from wanrender.runner import Runner

    bar, on_event = _progress_printer()
    with bar:
        result = Runner(device).render(req, files, progress=on_event)
    _summary(result, req)


@app.command()
def generate(
    image: Path = typer.Argument(..., help="Start image (PNG, JPEG, WebP)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What should happen in the video."),
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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .mp4 (default: outputs/...)."),
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
) -> None:
    """Render a video from IMAGE and a prompt."""
    from wanrender.models.inventory import resolve_files
    from wanrender.request import from_preset

    try:
        from wanrender.spec import parse_size

        width, height = parse_size(size, "--size") if size else (None, None)
        sh, sl = _pair(shift, "--shift")
        lh, ll = _pair(lora_strength, "--lora-strength")
        req = from_preset(
            preset, image, prompt, negative=negative, frames=frames, width=width, height=height, steps=steps,
            switch=switch, cfg=cfg, shift_high=sh, shift_low=sl, sampler=sampler, seed=seed, fit=fit, fps=fps,
            interpolate=interpolate, boundary=boundary, precision=precision, attention=attention, compile=compile,
            memory=memory, reserve_vram=reserve_vram, crf=crf, save_frames=save_frames, out=out, lora_strength_high=lh, lora_strength_low=ll,
        )  # fmt: skip
        from wanrender.bench.commands import profile_for_generate

        req = profile_for_generate(req, profile, device, ctx)
        files = resolve_files(models, high, low, vae, text_encoder, tokenizer, lora_high, lora_low)
        _run_render(req, files, device)
    except WanrenderError as e:
        _fail(e)


def _pair(value: Optional[str], flag: str) -> tuple[Optional[float], Optional[float]]:
    if value is None:
        return None, None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise WanrenderError(f"{flag} {value!r} is invalid — use a number or two separated by a comma") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise WanrenderError(f"{flag} {value!r} is invalid — use a number or two separated by a comma")


@app.command("plan")
def plan_cmd(
    size: str = typer.Option("832x1216", "--size", help="WIDTHxHEIGHT."),
    frames: int = typer.Option(81, "--frames", help="Frames of the request to plan (the guide lists others too)."),
    gpu: Optional[str] = typer.Option(
        None, "--gpu", help="rtx4090, rtx5090, a100-40g, a100-80g, h100, h200 (default: this GPU)."
    ),
    vram: Optional[str] = typer.Option(
        None,
        "--vram",
        help="Plan for this much GPU memory, e.g. 24GiB or 23.5 (GB = 10^9 bytes, GiB = 2^30 bytes; a bare number is GiB). With --gpu: that GPU's speed.",
    ),
    reserve_vram: float = typer.Option(0.5, "--reserve-vram", help="GiB to leave free."),
    preset: str = typer.Option("turbo", "--preset", help="turbo or quality (steps and cfg)."),
    memory: str = typer.Option("auto", "--memory", help="auto, resident, swap or stream."),
    precision: str = typer.Option("auto", "--precision"),
    compile: str = typer.Option("off", "--compile"),
    models: Optional[Path] = typer.Option(
        None, "--models", help="Read weight sizes from these files (default: the standard fp8 set)."
    ),
    ram: Optional[str] = typer.Option(
        None,
        "--ram",
        help="Host RAM to plan for, e.g. 64GiB (GB = 10^9 bytes, GiB = 2^30 bytes; a bare number is GiB; default: this machine's).",
    ),
    profile: str = typer.Option(
        "auto", "--profile", help="auto (the GPU's profile, as generate uses), off, or a profile YAML."
    ),
    ctx: typer.Context = None,  # which knobs were given (a profile fills only the others, as in generate)
) -> None:
    """Predict peak VRAM and time for a render and list a frame-count guide, for this GPU or a named one.

    Exits 1 when the request asked about does not fit (the report says what would), 2 on bad input."""
    from wanrender.cli_plan import plan_command

    try:
        out = plan_command(size, frames, gpu, vram, reserve_vram, preset, memory, precision, compile, models, ram,
                           profile, ctx)  # fmt: skip
    except WanrenderError as e:
        _fail(e)
        return
    for r in out.renderables:
        Console().print(r, highlight=False)
    if out.refused is not None:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Path = typer.Option(Path("outputs/demo.mp4"), "--out", "-o", help="Output .mp4."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Render the embedded demo: a real photo through the real pipeline with tiny RANDOM-weight models."""
    from wanrender.demo import demo_image, ensure_demo_models
    from wanrender.request import from_preset

    console.print(
        "[yellow]Demo:[/] tiny models of the Wan 2.2 architecture with [bold]random weights[/] — the video is "
        "structured noise, not a real animation. For real renders: 'wanrender models fetch --dir models' then "
        "'wanrender generate IMAGE --prompt ... --models models'.",
        highlight=False,
    )
    try:
        files = ensure_demo_models()
        req = from_preset("demo", demo_image(), "slow dolly-in, gentle camera motion, soft light", seed=seed, out=out)
        _run_render(req, files, device)
    except WanrenderError as e:
        _fail(e)


@models_app.command("check")
def models_check(folder: Path = typer.Argument(..., help="Folder with model files.")) -> None:
    """List what FOLDER holds (role, format, dtype, size) and what a render still needs."""
    from rich.table import Table

    from wanrender.models.inventory import human_size, scan

    try:
        ms = scan(folder)
    except WanrenderError as e:
        _fail(e)
        return
    table = Table(title=f"Model files in {folder}", title_justify="left")
    for col in ("file", "role", "format", "dtypes", "size"):
        table.add_column(col, overflow="fold")  # full file names, wrapped, never cut
    for e in ms.entries:
        rel = str(e.path.relative_to(folder)) if e.path.is_relative_to(folder) else str(e.path)
        if e.info is None:
            table.add_row(rel, "[red]unreadable[/]", e.error or "", "", "")
            continue
        i = e.info
        role = i.role + (f" ({i.expert})" if i.expert else "")
        if i.role == "text_encoder" and i.has_tokenizer:
            role += " + tokenizer"
        fmt = ", ".join(x for x in (i.variant, i.layout, i.precision, i.scale_style or "") if x)
        dts = ", ".join(f"{k}×{v}" for k, v in sorted(i.dtypes.items(), key=lambda kv: -kv[1])[:3])
        table.add_row(rel, role, fmt, dts, human_size(i.size_bytes))
    Console().print(table)
    out = Console()
    for label, path in (
        ("high-noise expert", ms.high),
        ("low-noise expert", ms.low),
        ("VAE", ms.vae),
        ("text encoder", ms.text_encoder),
        ("tokenizer", ms.tokenizer),
        ("4-step LoRA (high)", ms.lora_high),
        ("4-step LoRA (low)", ms.lora_low),
    ):
        mark = "[green]✓[/]" if path else ("[yellow]–[/]" if "LoRA" in label else "[red]✗[/]")
        out.print(f"{mark} {label}: {path.name if path else 'not found'}", highlight=False)
    for note in ms.notes:
        out.print(f"  note: {note}", highlight=False)
    missing = ms.missing()
    if missing:
        out.print("[bold]A render still needs:[/] " + "; ".join(missing), highlight=False)
        raise typer.Exit(1)
    if not (ms.lora_high and ms.lora_low):
        out.print("Ready for the quality preset; the turbo preset also needs the two 4-step LoRAs.")
    else:
        out.print("[bold green]Ready to render.[/]")


@app.command()
def interpolate(
    src: Path = typer.Argument(..., help="Input video."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .mp4."),
    multiplier: int = typer.Option(2, "-x", help="Frame-rate multiplier (2..16)."),
    method: str = typer.Option("rife", "--method", help="rife (needs 'models fetch rife'), dis, blend or repeat."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Raise a video's frame rate by MULTIPLIER (16 fps Wan output -> 32 fps with -x 2)."""
    from rich.progress import Progress

    from wanrender.interp import interpolate_video

    try:
        with Progress(console=console) as bar:
            task = bar.add_task(f"interpolate x{multiplier}", total=None)
            info = interpolate_video(
                src, out, multiplier, method, device, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )  # fmt: skip
    except WanrenderError as e:
        _fail(e)
        return
    Console().print(
        f"{info['frames_in']} -> {info['frames_out']} frames, {info['fps_in']:g} -> {info['fps_out']:g} fps "
        f"({method} on {info['device']}): {info['seconds_total']:.2f} s total, {info['seconds_model']:.2f} s interpolating; "
        f"scene cuts at {info['scene_cuts'] or 'none'}\nwrote {out}",
        highlight=False,
    )


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")
# The benchmark lab (bench run|compare|report, env, tune) lives in its own module.
from wanrender.bench.commands import register as _register_bench_lab  # noqa: E402

_register_bench_lab(app, bench_app)


@bench_app.command("dit")
def bench_dit(
    shapes: str = typer.Option("832x1216,480x832,720x1280", "--shapes", help="WIDTHxHEIGHT list at 81 frames."),
    repeats: int = typer.Option(3, "--repeats"),
    compile: str = typer.Option(
        "default", "--compile", help="Compile mode of the fp8 path (off, default, max-autotune)."
    ),
    attention: str = typer.Option("auto", "--attention"),
    peer: bool = typer.Option(True, "--peer/--no-peer", help="Time diffusers' WanTransformer3DModel too."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="Time our bf16 path too."),
    bf16_variants: str = typer.Option(
        "auto:off",
        "--bf16-variants",
        help="bf16 path variants, ATTENTION:COMPILE list (auto = exact attention), e.g. sdpa-cudnn:default,sage8:default.",
    ),
    fp8: bool = typer.Option(True, "--fp8/--no-fp8", help="Time our fp8 path."),
    record: Optional[Path] = typer.Option(None, "--record", help="Append the table to this markdown file."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers as JSON."),
    sage8_options: Optional[str] = typer.Option(
        None, "--sage8-options", help="JSON of sage8 kernel options to time, e.g. '{\"block_n\": 64}'."
    ),
) -> None:
    """Full-size DiT forward with random weights: the diffusers peer, our bf16 and fp8 paths, attention backends."""
    import json

    import torch

    from wanrender.bench import dit as bd
    from wanrender.bench.env import snapshot

    try:
        variants = bd.parse_variants(bf16_variants)  # bad input is reported before the GPU check
        if not torch.cuda.is_available():
            raise WanrenderError(
                "bench dit needs a CUDA GPU (it builds two full-size 14B experts) — run it on a GPU machine"
            )
        names = [s.strip() for s in shapes.split(",") if s.strip()]
        unknown = [s for s in names if s not in bd.SHAPES]
        if unknown:
            raise WanrenderError(f"unknown shape {unknown[0]!r} — choose from {', '.join(bd.SHAPES)}")
        opts = None
        if sage8_options:
            from wanrender.kernels import attention as attn

            try:
                opts = dict(json.loads(sage8_options))
            except (ValueError, TypeError) as e:
                raise WanrenderError(
                    f"--sage8-options {sage8_options!r} is not a JSON object ({e}) — e.g. '{{\"block_n\": 64}}'"
                ) from None
            try:  # checked before minutes of peer timing, not inside the kernel
                attn.freeze_options("sage8", opts)
            except WanrenderError as e:
                raise WanrenderError(f"--sage8-options: {e}") from None
        env = snapshot()
        result = bd.run(names, repeats, compile, attention, peer, log=lambda m: console.print(m, highlight=False), bf16=bf16,
                        bf16_variants=variants, fp8=fp8, sage8_options=opts)  # fmt: skip
    except WanrenderError as e:
        _fail(e)
        return
    text = bd.markdown(result, env)
    Console().print(text, highlight=False)
    if record:
        with open(record, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    if json_out:
        json_out.write_text(json.dumps({"env": env, **result}, indent=1, default=str))


@bench_app.command("interp")
def bench_interp(
    video: Optional[Path] = typer.Option(None, "--video", help="Also score this video (every other frame rebuilt)."),
    methods: str = typer.Option("rife,dis,blend,repeat", "--methods"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Interpolation quality (PSNR/SSIM on held-out frames) and speed per method."""
    from rich.table import Table

    from wanrender.interp.quality import run_quality_bench

    try:
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        rows = run_quality_bench(wanted, video=video, device=device)
    except WanrenderError as e:
        _fail(e)
        return
    table = Table(title="Interpolation quality (held-out middle frames)", title_justify="left")
    for col in ("method", "sequence", "PSNR dB", "SSIM", "frames/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], r["sequence"], f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r.get('fps') or 0:.1f}")
    Console().print(table)


@models_app.command("fetch")
def models_fetch(
    what: str = typer.Argument(
        "standard", help="standard (the turbo file set, ~37 GB) or rife (interpolation weights)."
    ),
    folder: Path = typer.Option(Path("models"), "--dir", help="Where to put the files."),
) -> None:
    """Download model files (only when asked; resumable and checksummed)."""
    try:
        if what == "rife":
            from wanrender.interp.weights import fetch_rife

            path = fetch_rife()
            Console().print(f"RIFE weights: {path}", highlight=False)
            return
        if what != "standard":
            raise WanrenderError(f"unknown file set {what!r} — choose standard or rife")
        from wanrender.fetch import STANDARD_SET, fetch

        total = sum(f.approx_gb for f in STANDARD_SET)
        console.print(
            f"{len(STANDARD_SET)} files (~{total:.0f} GB) into {folder}; complete ones are skipped, partial ones resume",
            highlight=False,
        )

        def report(f, state: str) -> None:
            console.print(f"  {f.role:<20} {f.dest}: {state}", highlight=False)

        fetch(folder, progress=report)
        Console().print(f"[bold green]Done.[/] Check with: wanrender models check {folder}", highlight=False)
    except WanrenderError as e:
        _fail(e)


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except WanrenderError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
