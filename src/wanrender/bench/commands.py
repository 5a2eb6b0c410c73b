"""The benchmark lab's commands: ``bench run|compare|report``, ``env``, ``tune``.

They live here, not in ``cli.py``, to keep that file small; ``cli.py`` calls
``register`` once. Only typer and rich are imported at module level, so
``wanrender --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from wanrender.errors import WanrenderError

console = Console(stderr=True)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA —"
    seconds = int(seconds)
    return f"ETA {seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def bench_run(
    matrix: Path = typer.Argument(..., help="Matrix YAML (see benchmarks/matrices/)."),
    resume: bool = typer.Option(
        False, "--resume", help="Skip cases already in OUT/results.jsonl for this environment."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="With --resume: run again cases whose last row is not ok."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Results folder, relative to the current one (default: bench-results/MATRIX_NAME)."
    ),
    only: Optional[str] = typer.Option(
        None, "--only", help="Run only the cases whose label matches, e.g. '81f-*,sage8-*'."
    ),
) -> None:
    """Run every case of MATRIX in its own process (timeout, telemetry); append rows to OUT/results.jsonl.

    MATRIX and --out are relative to the current folder (paths inside MATRIX to its own folder). An oom,
    a timeout or an error is a case's result: the sweep records it and goes on. Exit status: 0 when the sweep ran; 1 when a case
    crashed (its process died without a result: a segfault, a kill, or the harness could not start it)
    or when no case that ran finished ok — failures a case's inject test hook asks for count as
    results; 2 for bad input; 130 when interrupted (finished cases are kept: continue with --resume).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wanrender.bench import matrix as mx
    from wanrender.bench.runner import run_sweep

    try:
        m = mx.load(matrix).only(only)
        out_dir = out or Path("bench-results") / m.name
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[case]}"), console=console)  # fmt: skip
        durations: list[float] = []
        state = {"pending": len(m.cases)}
        task = bar.add_task(m.name, total=len(m.cases), eta="ETA —", case="")

        def events(kind: str, d: dict) -> None:
            bar.start()  # at the first case: a check that fails before it leaves only its one line
            # ETA from the cases measured so far: skipped cases cost nothing.
            if kind == "skip":
                state["pending"] -= 1
                bar.update(task, advance=1, case=f"skip {d['label']} ({d['status']})")
            elif kind == "start":
                eta = sum(durations) / len(durations) * state["pending"] if durations else None
                bar.update(task, case=d["label"], eta=_fmt_eta(eta))
            elif kind == "done":
                row = d["row"]
                state["pending"] -= 1
                durations.append(row["wall_s"])
                eta = sum(durations) / len(durations) * state["pending"]
                bar.update(task, advance=1, eta=_fmt_eta(eta), case="")
                p = (row.get("total") or {}).get("p50")
                bar.console.print(f"  {row['status']:<7} {d['label']}  {f'{p:.3f} s (p50)' if p is not None else row.get('message', '')}",
                                  highlight=False, markup=False)  # fmt: skip

        try:
            result = run_sweep(m, out_dir, resume=resume, retry_failed=retry_failed, events=events)
        finally:
            bar.stop()
    except WanrenderError as e:
        _fail(e)
        return
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished cases are saved; continue with --resume", highlight=False)
        raise typer.Exit(130) from None
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts().items())) or "nothing run"
    skipped = f", {len(result.skipped)} skipped (already done)" if result.skipped else ""
    Console().print(f"{counts}{skipped}\nresults: {result.results}", highlight=False)
    why = result.failure()
    if why:
        console.print(f"[bold red]error:[/] {why}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def bench_compare(
    new: Path = typer.Argument(..., help="New results: OUT/results.jsonl of 'bench run', or its OUT folder."),
    base: Path = typer.Argument(..., help="Baseline results: a results file or a 'bench run' folder."),
    max_slowdown: str = typer.Option(
        "5%", "--max-slowdown", help="Largest accepted p50 slowdown per case (0% or more, e.g. 5% or 0.05)."
    ),
    limit: Optional[list[str]] = typer.Option(
        None,
        "--limit",
        help="Absolute limit on NEW, e.g. pass=85s, total=180s, vram=40GiB, nvml_timed=31GiB (repeatable).",
    ),
    metric: str = typer.Option(
        "total", "--metric", help="Metrics held to --max-slowdown: total, pass, pass1, s_per_step, a stage..."
    ),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Pass although cases of BASE are missing from NEW (a partial run)."
    ),
) -> None:
    """Per case: p50 ratio NEW/BASE and absolute limits, cases matched by configuration.

    Exit status: 0 when every case of BASE was compared and none regressed; 1 when a case regressed
    (slower than --max-slowdown, over a --limit, or ok in BASE and not in NEW), when nothing was compared,
    or when cases of BASE are missing from NEW (unless --allow-missing); 2 for bad input (an invalid
    option, or a file that is missing, unreadable or not the results of 'bench run').
    """
    from rich.table import Table

    from wanrender.bench.compare import compare_files

    try:
        cmp = compare_files(new, base, max_slowdown, limit or [], metric)
    except WanrenderError as e:
        _fail(e)
        return
    gate = cmp.gate_failure(allow_missing)
    table = Table(title=f"{new} vs {base}", title_justify="left")
    for col in ("case", "engine", "status", "base p50 s", "new p50 s", "ratio", "verdict"):
        table.add_column(col)
    for v in cmp.verdicts:
        m = "total"
        b, n, r = v.base_p50.get(m), v.new_p50.get(m), v.ratios.get(m)
        table.add_row(v.label, v.engine, f"{v.base_status or '—'} -> {v.new_status}", f"{b:.3f}" if b is not None else "—",
                      f"{n:.3f}" if n is not None else "—", f"{r:.3f}x" if r is not None else "—",
                      "[bold red]REGRESSION[/]" if v.problems else "[green]ok[/]")  # fmt: skip
    out = Console()
    out.print(table)
    for v in cmp.regressions:  # one line per problem: too long for a table cell
        for p in v.problems:
            out.print(f"[red]REGRESSION[/] {v.label}: {p}", highlight=False)
    if cmp.pairs:
        out.print(_engines_table(cmp.pairs, new))
    for note in cmp.notes:
        out.print(f"note: {note}", highlight=False)
    bad = bool(cmp.regressions or gate)
    out.print(("[bold red]" if bad else "[bold green]") + cmp.summary() + "[/]", highlight=False)
    if gate:
        console.print(f"[bold red]error:[/] {gate}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


def _engines_table(pairs, new: Path):
    """NEW's wanrender and ComfyUI rows of the same render: p50s and ComfyUI/wanrender."""
    from rich.table import Table

    from wanrender.bench.peers import METRICS

    table = Table(title=f"wanrender and ComfyUI in {new} (ratio: ComfyUI / wanrender)", title_justify="left")
    for col in ("render", "wanrender case", "ComfyUI case") + tuple(f"{m} w / C / ratio" for m in METRICS):
        table.add_column(col)
    for p in pairs:
        cells = []
        for m in METRICS:
            w, c, r = p.value(p.wanrender, m), p.value(p.comfyui, m), p.ratio(m)
            cells.append(" / ".join(["—" if w is None else f"{w:.3f}", "—" if c is None else f"{c:.3f}",
                                     "—" if r is None else f"{r:.2f}x"]))  # fmt: skip
        table.add_row(p.render, f"{p.wanrender.get('label')} ({p.wanrender['status']})",
                      f"{p.comfyui.get('label')} ({p.comfyui['status']})", *cells)  # fmt: skip
    return table


def bench_report(
    results: Path = typer.Argument(..., help="Results from 'bench run': OUT/results.jsonl, or the OUT folder."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="Output HTML file (replaced if it exists)."),
) -> None:
    """One static, offline HTML report: tables, stage breakdown, scaling, telemetry, failures.

    Exits 2, writing nothing, when RESULTS is missing, unreadable or not the results of 'bench run'.
    """
    from wanrender.bench.report import write_report

    try:
        path = write_report(results, out)
    except WanrenderError as e:
        _fail(e)
        return
    Console().print(f"wrote {path}", highlight=False)


def env(out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON to this file.")) -> None:
    """Print the environment snapshot (GPUs, driver, CUDA, cuDNN, torch, packages, env vars, CPU, RAM, OS) as JSON."""
    from wanrender.bench.env import snapshot

    text = json.dumps(snapshot(), indent=1, default=str)
    if out:
        from wanrender.media.atomic import atomic_write_text

        atomic_write_text(out, text + "\n")
    sys.stdout.write(text + "\n")


def tune(
    budget: str = typer.Option(
        "20m", "--budget", help="Time budget, e.g. 20m, 1h, 90s (a running candidate finishes)."
    ),
    buckets: Optional[str] = typer.Option(
        None, "--buckets", help="FRAMESxWIDTHxHEIGHT list (default: 3 production buckets on a GPU, 5x80x64 on CPU)."
    ),
    attention: Optional[str] = typer.Option(
        None, "--attention", help="Backends to try (comma list; default: all that can run)."
    ),
    precision: Optional[str] = typer.Option(None, "--precision", help="Precisions to try (default fp8,bf16 on a GPU)."),
    compile: Optional[str] = typer.Option(None, "--compile", help="Compile modes to try (default off,default)."),
    memory_plan: Optional[str] = typer.Option(None, "--memory-plan", help="Memory plans to try (default auto)."),
    repeats: int = typer.Option(2, "--repeats", help="Timed renders per candidate (after one warm-up)."),
    models: Optional[Path] = typer.Option(
        None,
        "--models",
        help="Model folder, or 'random' for full-size random weights on a GPU (default: the demo models on CPU).",
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: cuda if present)."),
    work: Optional[Path] = typer.Option(
        None, "--work", help="Folder for measurements and logs (default: bench-results/tune-DEVICE)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Profile YAML (default: $WANRENDER_HOME/profiles/DEVICE.yaml)."
    ),
    gpus: int = typer.Option(
        1, "--gpus", help="Measure every candidate on N GPUs per video (generate --gpus N; cpu: N processes)."
    ),
) -> None:
    """Search attention, precision, compile and memory plan on this device; write a GPU profile that generate uses.

    With --gpus N the profile is written as DEVICE-xN.yaml and applies only when named (--profile FILE)."""
    import torch

    from wanrender.bench import tune as tn
    from wanrender.bench.matrix import Case, parse_seconds
    from wanrender.runtime.hardware import device_name

    try:
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = dev.startswith("cuda")
        if on_gpu and models is None:
            raise WanrenderError(
                "tune on a GPU needs models — pass --models DIR ('wanrender models fetch' gets them) "
                "or --models random (full-size random weights: speed and memory only)"
            )
        random_models = models is not None and str(models) == "random" and not models.exists()
        if random_models and not on_gpu:
            raise WanrenderError("--models random builds two full-size 14B experts — it needs a CUDA GPU")
        if repeats < 1:
            raise WanrenderError(f"--repeats {repeats} is invalid — use 1 or more")
        space = tn.parse_space(tn.default_space(dev), {"attention": attention, "precision": precision,
                                                       "compile": compile, "memory_plan": memory_plan})  # fmt: skip
        if random_models:
            base = Case(models="random", preset="turbo", repeats=repeats, timeout_s=1800.0)
        else:
            base = Case(models=str(models.resolve()) if models else "demo", models_path=str(models.resolve()) if models else None,
                        preset="turbo" if models else "demo", repeats=repeats, timeout_s=1800.0 if on_gpu else 300.0)  # fmt: skip
        if gpus < 1:
            raise WanrenderError(f"--gpus {gpus} is invalid — use 1 or more")
        base = replace(base, gpus=gpus)
        wanted = tn.parse_buckets(buckets) if buckets else tn.default_buckets(dev)
        dname = device_name(dev)
        work_dir = work or Path("bench-results") / f"tune-{tn._slug(dname)}"
        console.print(f"tuning on {dname}: buckets {', '.join('x'.join(map(str, b)) for b in wanted)}; "
                      f"budget {budget}; results in {work_dir}", highlight=False)  # fmt: skip

        def events(kind: str, d: dict) -> None:
            if kind == "start":
                console.print(f"  [{time.strftime('%H:%M:%S')}] {d['label']} ...", highlight=False, markup=False)
            elif kind == "done":
                p = d.get("p50")
                console.print(f"    {d['status']}" + (f" {p:.3f} s (p50)" if p is not None else ""), highlight=False)
            elif kind == "skip":
                console.print(f"  skip {d['knobs']}: {d['why']}", highlight=False, markup=False)

        doc = tn.tune(dev, base, wanted, space, parse_seconds(budget, "--budget"), work_dir, events)
        path = out or tn.default_output(dname, gpus)
        header = (f"GPU profile written by `wanrender tune` on {dname}, {doc['provenance']['measured']}.\n"
                  "Knobs per bucket are the fastest candidates that finished ok (p50 of the timed renders).")  # fmt: skip
        tn.write_profile(path, doc, header)
    except WanrenderError as e:
        _fail(e)
        return
    for b in doc["buckets"]:
        knobs = ", ".join(f"{k} {v}" for k, v in b["knobs"].items())
        Console().print(f"{b['name']}: {knobs} — {b['measured']['total_p50_s']:.3f} s p50", highlight=False)
    if not doc["provenance"]["complete"]:
        console.print("[yellow]budget exhausted:[/] the profile covers what was measured", highlight=False)
    Console().print(f"wrote {path}", highlight=False)


def profile_for_generate(req, profile: str, device: Optional[str], ctx: Optional[typer.Context]):
    """``generate --profile``: the profile's knobs for those not given on the command line."""
    from wanrender.runtime.profiles import apply_profile

    req, line = apply_profile(req, profile, device, explicit_knobs(ctx))
    if line:
        console.print(f"[dim]{line}[/]", highlight=False)
    return req


def explicit_knobs(ctx: Optional[typer.Context]) -> set[str]:
    """The profile knobs given on the command line (a profile fills only the others);
    ``generate`` and ``plan`` both ask this. A knob the command has no flag for is not set."""
    from wanrender.runtime.profiles import REQUEST_KNOBS

    if ctx is None:  # a direct call: every knob counts as set, nothing is overridden
        return set(REQUEST_KNOBS)
    return {k for k in REQUEST_KNOBS if k in ctx.params and ctx.get_parameter_source(k).name != "DEFAULT"}


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("run")(bench_run)
    bench_app.command("compare")(bench_compare)
    bench_app.command("report")(bench_report)
    app.command("env")(env)
    app.command("tune")(tune)
