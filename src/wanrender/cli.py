"""The ``wanrender`` command line. Logging is set up here, once; imports stay lazy
so that ``wanrender --help`` is instant and nothing touches a GPU until asked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from wanrender.errors import WanrenderError

DEBUG_ENV = "WANRENDER_DEBUG"


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past click (which would exit 130 without a word) to ``main``."""


class _Group(TyperGroup):
    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None


# typer's own exception printer would show a traceback before main() could say one line.
app = typer.Typer(add_completion=False, no_args_is_help=True, help=(
                      "Fast Wan 2.2 image-to-video rendering. An error is one line that says what to do (exit 2: bad "
                      "input; 1: the environment or an internal error; 130: interrupted); --debug adds the traceback."),
                  cls=_Group, pretty_exceptions_enable=False)  # fmt: skip
models_app = typer.Typer(no_args_is_help=True, help="Inspect and fetch model files.")
app.add_typer(models_app, name="models")
console = Console(stderr=True)


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    debug: bool = typer.Option(
        False,
        "--debug",
        help=f"Show the Python traceback of an error (also {DEBUG_ENV}=1, which child processes inherit).",
    ),
) -> None:
    import os

    from wanrender.log import setup_logging

    if debug:
        os.environ[DEBUG_ENV] = "1"
    if ctx.invoked_subcommand in ("serve", "worker"):  # long-lived processes that share their cores
        from wanrender.service.cpu import share_cores

        share_cores()  # before torch loads (runtime.plan, below)
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
    from wanrender.cli_errors import fail

    fail(err)  # one copy of the error line: markup escaped, --debug's traceback


@app.command()
def version() -> None:
    """Print the version."""
    from wanrender import __version__

    typer.echo(__version__)


# generate, demo and interpolate: the commands that render and write videos.
from wanrender.cli_render import register as _register_render  # noqa: E402

_register_render(app)

# batch: several videos with the models loaded once (sequential, or the two-GPU expert pipeline).
from wanrender.cli_batch import register as _register_batch  # noqa: E402

_register_batch(app)

# serve, worker and submit: the render service (its packages are the serve extra).
from wanrender.cli_serve import register as _register_serve  # noqa: E402

_register_serve(app)

# workflow show|export: ComfyUI workflow files (generate --workflow renders them).
from wanrender.cli_workflow import register as _register_workflow  # noqa: E402

_register_workflow(app)


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
    gpus: int = typer.Option(
        1, "--gpus", help="GPUs of this kind sharing each video (sequence parallel; must divide the 40 heads)."
    ),
    interconnect: Optional[str] = typer.Option(
        None, "--interconnect", help="nvlink or pcie between the GPUs (default: nvlink for A100/H100/H200)."
    ),
) -> None:
    """Predict peak VRAM and time for a render and list a frame-count guide, for this GPU or a named one.

    With --gpus N the figures are per GPU with N GPUs sharing the video (the all-to-all bandwidth is an
    assumption until measured); --gpus 2 also predicts the two-GPU expert pipeline's videos per hour.
    Exits 1 when the request asked about does not fit (the report says what would), 2 on bad input."""
    from wanrender.cli_plan import plan_command

    try:
        out = plan_command(size, frames, gpu, vram, reserve_vram, preset, memory, precision, compile, models, ram,
                           profile, ctx, gpus, interconnect)  # fmt: skip
    except WanrenderError as e:
        _fail(e)
        return
    for r in out.renderables:
        Console().print(r, highlight=False)
    if out.refused is not None:
        raise typer.Exit(1)


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


@models_app.command("random")
def models_random(
    folder: Path = typer.Option(..., "--dir", help="Where to write the files (created if needed)."),
    size: str = typer.Option("full", "--size", help="full (the real sizes, ~37 GB) or tiny (seconds, for tests)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the values (the two experts and two LoRAs differ)."),
    device: str = typer.Option(
        "auto",
        "--device",
        help="auto (cuda if present), cpu or cuda: where values are generated. A file's bytes depend on the seed "
        "and on the device kind (CUDA's random stream differs from the CPU's); both are recorded in the file.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace files under the standard names that differ (never done otherwise)."
    ),
) -> None:
    """Write RANDOM-weight stand-ins for the standard file set: the names and formats of
    'models fetch' (fp8_scaled experts and UMT5, rank-64 4-step LoRAs, bf16 VAE, tokenizer),
    so 'generate --models DIR' runs and times the user's whole path without the real weights.

    Streamed tensor by tensor; identical files already there are skipped, different ones
    (e.g. real weights) are refused unless --overwrite. The video made from them is noise."""
    from wanrender.cli_random import random_command

    try:
        random_command(folder, size, seed, device, overwrite, console)
    except WanrenderError as e:
        _fail(e)


def main() -> None:  # pragma: no cover - console entry (tests run it as a subprocess)
    """The catch-all: whatever a command raises becomes one line and an exit code."""
    from wanrender.cli_errors import install_interrupt_handler, leave

    install_interrupt_handler()
    try:
        app()
    except SystemExit as e:
        leave(e.code)
        raise
    except BaseException as e:  # noqa: BLE001 - the one place every error is turned into a line
        import os

        from rich.markup import escape

        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            import traceback

            traceback.print_exc()
        code, line = _one_line(e)
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(code)


def _one_line(e: BaseException) -> tuple[int, str]:
    """(exit code, message) for an error that reached ``main``."""
    import errno

    from wanrender.errors import shown

    def flat(text: str) -> str:
        return " ".join(shown(text).split())[:500]

    from wanrender.cli_errors import interrupted

    if interrupted() or isinstance(e, (_Interrupted, KeyboardInterrupt)):
        return 130, "interrupted — outputs are written only when complete, so earlier files are as they were"
    if isinstance(e, WanrenderError):
        from wanrender.cli_errors import flagged

        return 2, flat(flagged(e))
    if isinstance(e, OSError):
        advice = {
            errno.ENOSPC: "free disk space and retry",
            errno.EDQUOT: "free disk space (quota) and retry",
            errno.EACCES: "check the permissions, or choose another path",
            errno.EPERM: "check the permissions, or choose another path",
            errno.EROFS: "the filesystem is read-only: choose another path",
            errno.ENAMETOOLONG: "use a shorter name",
            errno.ENOENT: "check the path",
            errno.EFBIG: "the file grew past the allowed size (ulimit -f or the filesystem): free space or raise the limit",
        }.get(e.errno, "check the path and the disk, then retry")
        where = f"{shown(e.filename)}: " if e.filename else ""
        return 1, flat(f"{where}{e.strerror or e} — {advice}")
    if isinstance(e, MemoryError):
        return 1, "the host ran out of memory (RAM) — close other programs, or use fewer frames or a smaller size"
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda's, without importing torch here
        return 1, "the GPU ran out of memory — free GPU memory, or use fewer frames, a smaller size or --memory stream"
    return 1, flat(f"internal error ({type(e).__name__}: {e}) — rerun with --debug for the traceback and report it")


if __name__ == "__main__":  # pragma: no cover
    main()
