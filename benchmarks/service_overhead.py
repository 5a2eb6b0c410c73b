"""Service overhead per job against a direct render of the same request (issue #15's benchmarks).

1. Per job: the same request rendered directly by a warm ``Runner`` (what ``generate``
   runs) and through the service (HTTP submit, JetStream, a warm worker, publish,
   SSE until succeeded); the difference is the service's overhead.
2. Time to first progress event: submit until the first SSE record with progress.
3. Cold against warm: the first job of a fresh worker (models loaded) against the next ones.
4. Throughput of one worker with and without the overlap (encode/publish of job N on a
   second thread while job N+1 renders), on jobs queued before it starts.

Two modes:

- default: the CPU demo models, 5 frames at 80x64 (target: at most 0.3 s added per job)
      PYTHONPATH=src python benchmarks/service_overhead.py [--jobs 8]
- ``--full --models DIR``: the files of DIR (``wanrender models random --dir DIR --size
  full`` writes them under the users' names) on the GPU, the turbo preset at 81 frames
  832x1216 (``generate --size 832x1216``: 832 wide, 1216 high, as in docs/benchmarks.md);
  target: at most 2% added per job. Each side renders a warm-up job (it pays the load
  and the kernels' first launches), then ``--jobs`` jobs (default 1: about a minute
  each). Both sides render the request as the service builds it (``build_request``)
  with the GPU profile a worker applies (``serve --profile auto``, as ``generate``
  does), so they compare. The direct runner is closed (its GPU memory
  released) before ``serve`` starts. Besides
  service wall - direct wall, it reports service wall - the stages the worker itself
  timed (its sidecar's ``render_s``), which also counts the runner's own untimed work
  (checks, planning, the sidecar), so it is an upper bound of the service's share.
      PYTHONPATH=src python benchmarks/service_overhead.py --full --models DIR [--jobs 1] [--skip-throughput]
  ``--warmup-frames 5`` makes job 0 short (it still loads the models and launches the
  kernels once) where the device time is tight. ``--device cpu --frames 5 --size 64x64``
  runs the same code on tiny files (``models random --size tiny``: a CPU check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TINY = {"preset": "demo", "frames": 5, "width": 80, "height": 64}
FULL = {"preset": "turbo", "frames": 81, "width": 832, "height": 1216}
TERMINAL = ("succeeded", "failed", "canceled", "expired")


class BenchError(Exception):
    """A failed measurement: main prints it on one line and exits 1."""


@dataclass(frozen=True)
class Setup:
    home: Path  # WANRENDER_HOME of both sides (serve reads the checksums the direct side cached)
    files: object  # engine.ModelFiles
    image: Path
    device: str
    params: dict  # the request's fields besides prompt and seed, by JobParams name
    models: Path | None  # serve --models DIR; None: the demo models
    serve_timeout_s: float = 90.0
    event_timeout_s: float = 120.0  # the longest silence on a job's SSE stream (a cold load sends nothing)
    lease_s: float = 5.0
    warmup_frames: int | None = None  # job 0 with fewer frames: it still loads the models, in less time

    def job_params(self, i: int) -> dict:
        if i or self.warmup_frames is None:
            return self.params
        return {**self.params, "frames": self.warmup_frames}


@dataclass
class Job:
    wall_s: float
    stages_s: float | None = None  # the sidecar's render_s: the stages the renderer timed
    first_progress_s: float | None = None
    server_s: float | None = None  # the job record: created -> finished, on the server's clock
    plan: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)  # the sidecar's stages, to see where two sides differ


def say(line: str) -> None:
    """Results as they come: a run cut short by its time limit still shows the jobs it finished."""
    print(line, flush=True)


def _sidecar(job: Job, path: Path) -> None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    runtime = (doc.get("plan") or {}).get("runtime") or {}
    job.stages_s, job.timings_s = doc.get("render_s"), doc.get("timings_s") or {}
    job.plan = {k: runtime.get(k) for k in ("precision", "attention", "compile")}


def _stages_line(job: Job) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in job.timings_s.items() if isinstance(v, (int, float)))


def direct(setup: Setup, n: int) -> list[Job]:
    """Job 0 (the warm-up: it loads the models), then n jobs; the runner is closed after."""
    from wanrender.runner import Runner
    from wanrender.runtime.profiles import apply_resolved
    from wanrender.service.jobs import JobParams, build_request
    from wanrender.service.worker import worker_profile

    # The knobs a service worker gives the same job (serve's default --profile auto), so the
    # two sides render alike: on an H200, fp8 + sage8 rather than the request's defaults.
    prof = worker_profile("auto", setup.device)
    runner = Runner(setup.device)
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(n + 1):
                req = build_request(JobParams(prompt="bench", seed=i, **setup.job_params(i)), setup.image,
                                    Path(tmp) / f"d{i}.mp4")  # fmt: skip
                if prof is not None:
                    req, _ = apply_resolved(req, prof, setup.device, set(), strict=False)
                t0 = time.perf_counter()
                result = runner.render(req, setup.files)
                job = Job(time.perf_counter() - t0)
                _sidecar(job, result.sidecar)
                out.append(job)
                if setup.models is not None:
                    say(f"direct job {i}: {job.wall_s:.2f} s (stages {job.stages_s} s: {_stages_line(job)})")
    finally:
        runner.close()
    return out


def _serve_env(home: Path) -> dict:
    from helpers_service import SRC, env

    # The caller's PYTHONPATH stays behind src: a machine may carry packages there.
    return env(home, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def through_service(setup: Setup, n: int) -> dict:
    from helpers_service import start_serve, stop

    with tempfile.TemporaryDirectory() as tmp:
        extra = ("--models", str(setup.models)) if setup.models is not None else ()
        t0 = time.perf_counter()
        try:
            proc, client = start_serve(_serve_env(setup.home), Path(tmp) / "data", *extra, device=setup.device,
                                       lease=setup.lease_s, timeout=setup.serve_timeout_s)  # fmt: skip
        except AssertionError as e:  # start_serve: the process ended, or its worker never listed
            got = e.args[0] if e.args else None
            why = _last_line(got[1]) if isinstance(got, tuple) else str(e)
            raise BenchError(f"wanrender serve did not come up: {why}") from None
        up = time.perf_counter() - t0
        jobs = []
        try:
            for i in range(n + 1):
                t0 = time.perf_counter()
                job = client.submit(setup.image, {"prompt": "bench", "seed": i, **setup.job_params(i)})
                seen, state = None, job["state"]
                for record in client.events(job["id"], timeout=setup.event_timeout_s):
                    state = record["state"]
                    if seen is None and record.get("progress"):
                        seen = time.perf_counter() - t0
                    if state in TERMINAL:
                        break
                done = Job(time.perf_counter() - t0, first_progress_s=seen)
                record = client.job(job["id"])
                if record["state"] != "succeeded":
                    raise BenchError(f"service job {i} ended {record['state']} (SSE said {state}): "
                                     f"{record.get('error') or record.get('last_reason')}")  # fmt: skip
                if record.get("finished_at") and record.get("created_at"):
                    done.server_s = record["finished_at"] - record["created_at"]
                sidecar = client.download(job["id"], Path(tmp) / f"s{i}.json", "sidecar")
                _sidecar(done, sidecar)
                jobs.append(done)
                if setup.models is not None:
                    say(f"service job {i}: {done.wall_s:.2f} s (first progress {seen and round(seen, 2)} s, "
                        f"worker stages {done.stages_s} s: {_stages_line(done)})")  # fmt: skip
        finally:
            stop(proc, timeout=120)
    return {"startup_s": up, "jobs": jobs}


def throughput(setup: Setup, params: dict, n: int, overlap: bool) -> float:
    from wanrender.runner import Runner
    from wanrender.service.broker import EmbeddedBroker, QueueConfig, connect, ensure_jetstream
    from wanrender.service.intake import Limits, check_image, check_params, submit
    from wanrender.service.jobs import JobStore
    from wanrender.service.worker import Worker

    runner = Runner(setup.device)  # ours, so that its GPU memory is released before the next part

    async def main(url: str, data: Path) -> float:
        nc = await connect(url, "bench")
        js = nc.jetstream()
        jobs_kv, _ = await ensure_jetstream(js, QueueConfig())
        store = JobStore(jobs_kv)
        blob = setup.image.read_bytes()
        ids = []
        for i in range(n + 1):
            p = check_params(json.dumps({"prompt": "tp", "seed": i, **params}), Limits())
            ids.append((await submit(js, store, data, p, blob, check_image(blob, Limits()), None))[0].id)
        await nc.close()
        stop = asyncio.Event()
        worker = Worker(url, data, setup.files, setup.device, overlap=overlap, runner=runner)
        task = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + setup.event_timeout_s * (n + 2)
        while True:
            await asyncio.sleep(0.05)
            if task.done():
                await task  # the worker's own error, if it ended early
                raise BenchError("the throughput worker stopped before its jobs ended")
            if time.monotonic() > deadline:
                stop.set()
                await task
                raise BenchError(f"the throughput jobs did not end within {setup.event_timeout_s * (n + 2):.0f} s")
            if hasattr(worker, "store"):
                got = [(await worker.store.get(i))[0] for i in ids]
                if all(g.terminal for g in got):
                    break
        stop.set()
        await task
        bad = [g for g in got if g.state.value != "succeeded"]
        if bad:
            raise BenchError(f"a throughput job ended {bad[0].state.value}: {bad[0].error}")
        # From the first job's end (the models are loaded) to the last job's end: n jobs.
        return n / (got[-1].finished_at - got[0].finished_at)

    try:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp) / "nats") as b:
            return asyncio.run(main(b.url, Path(tmp)))
    finally:
        runner.close()


def machine_line(device: str) -> str:
    if device.startswith("cuda"):
        from wanrender.bench.env import snapshot

        s = snapshot()
        return (f"machine: {s.get('gpu')} ({s.get('gpu_memory_gib')} GiB), driver {s.get('driver')}, torch "
                f"{s['torch']} (CUDA {s.get('cuda')}, cuDNN {s.get('cudnn')}), {os.cpu_count()} CPU cores, "
                f"device {device}")  # fmt: skip
    import torch

    load = os.getloadavg()
    return (f"machine: {os.cpu_count()} CPU cores, load average {load[0]:.1f} at the start; "
            f"{subprocess.run(['uname', '-srm'], capture_output=True, text=True).stdout.strip()}; "
            f"torch {torch.__version__}, device {device}")  # fmt: skip


def free_gpu_line(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return f"; GPU memory free after closing the direct runner: {free / 2**30:.1f} of {total / 2**30:.1f} GiB"


def full_setup(args) -> Setup:
    """Everything --full needs, checked before a model is loaded: the files, the device,
    the request, the service's packages and nats-server."""
    import importlib.util

    from wanrender.demo import demo_image
    from wanrender.models.inventory import resolve_files
    from wanrender.runner import check_lora_needs, resolve_device
    from wanrender.service.broker import find_nats_server
    from wanrender.service.jobs import JobParams, build_request
    from wanrender.spec import parse_size

    if not args.models.is_dir():
        raise BenchError(f"--models {args.models}: not a folder — pass the folder that "
                         "'wanrender models random --dir DIR --size full' wrote")  # fmt: skip
    missing = [m for m in ("fastapi", "uvicorn", "multipart", "nats", "prometheus_client", "bcrypt")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        raise BenchError(f"the service needs {', '.join(missing)} — install them (pip install 'wanrender[serve]')")
    find_nats_server()
    device = str(resolve_device(args.device or "cuda"))
    files = resolve_files(args.models)
    params = dict(FULL)
    if args.frames is not None:
        params["frames"] = args.frames
    if args.size is not None:
        params["width"], params["height"] = parse_size(args.size, "--size")
    image = demo_image()
    for frames in {params["frames"], args.warmup_frames or params["frames"]}:  # refuses bad values now
        req = build_request(JobParams(prompt="bench", **{**params, "frames": frames}), image, Path("check.mp4"))
    check_lora_needs(req, files)
    home = Path(os.environ.get("WANRENDER_HOME") or tempfile.mkdtemp(prefix="wanrender-bench-home-"))
    os.environ["WANRENDER_HOME"] = str(home)
    # A full-size job sends nothing while it loads 37 GB; leases and waits are sized for minutes.
    return Setup(home, files, image, device, params, args.models.resolve(), serve_timeout_s=300.0,
                 event_timeout_s=900.0, lease_s=60.0, warmup_frames=args.warmup_frames)  # fmt: skip


def report_full(setup: Setup, d: list[Job], s: dict, n: int, freed: str) -> None:
    med = statistics.median
    p = setup.params
    plan = s["jobs"][-1].plan or d[-1].plan
    say(f"request: {p['preset']}, {p['frames']} frames at {p['width']}x{p['height']} (WxH), seed = job number, "
        f"{setup.image.name}; plan: precision {plan.get('precision')}, attention {plan.get('attention')}, "
        f"compile {plan.get('compile')}; {n} job(s) each way after a warm-up job (job 0"
        f"{f', {setup.warmup_frames} frames' if setup.warmup_frames else ''})")  # fmt: skip
    say(f"serve start to worker listed: {s['startup_s']:.1f} s{freed}")
    head = ("job", "direct s", "direct stages", "service s", "1st progress", "worker stages", "server s",
            "svc - direct", "svc - worker stages")  # fmt: skip
    say(" | ".join(head))

    def num(x):
        return "-" if x is None else f"{x:.2f}"

    for i, (a, b) in enumerate(zip(d, s["jobs"])):
        over_stage = None if b.stages_s is None else b.wall_s - b.stages_s
        say(" | ".join([str(i), num(a.wall_s), num(a.stages_s), num(b.wall_s), num(b.first_progress_s),
                        num(b.stages_s), num(b.server_s), f"{b.wall_s - a.wall_s:+.2f}",
                        "-" if over_stage is None else f"{over_stage:+.2f}"]))  # fmt: skip
    dw, sw = [j.wall_s for j in d[1:]], [j.wall_s for j in s["jobs"][1:]]
    over = med(sw) - med(dw)
    stages = [j.wall_s - j.stages_s for j in s["jobs"][1:] if j.stages_s is not None]
    verdict = "met" if over <= 0.02 * med(dw) else "NOT met"
    say(f"service overhead per warm job: median {over:+.2f} s = {over / med(dw) * 100:+.2f}% of the direct render "
        f"(target <= 2%: {verdict}); service wall - worker stages: median "
        f"{med(stages) if stages else float('nan'):+.2f} s")  # fmt: skip


def report_demo(setup: Setup, d: list[Job], s: dict, n: int) -> None:
    med = statistics.median
    dw = [j.wall_s for j in d[1:]]
    w = [j.wall_s for j in s["jobs"][1:]]
    say(f"request: demo models, {TINY['frames']} frames at {TINY['width']}x{TINY['height']}, {n} jobs each")
    say(f"direct warm Runner.render: median {med(dw):.3f} s (min {min(dw):.3f})")
    say(f"through the service (submit -> SSE succeeded), warm worker: median {med(w):.3f} s (min {min(w):.3f})")
    say(f"service overhead per job: median {med(w) - med(dw):+.3f} s, best case {min(w) - min(dw):+.3f} s")
    fp = [j.first_progress_s for j in s["jobs"][1:] if j.first_progress_s is not None]
    cold = s["jobs"][0]
    say(f"time to first progress event (warm): median {med(fp):.3f} s; cold: {cold.first_progress_s:.3f} s")
    say(f"cold first job (models loaded by the fresh worker): {cold.wall_s:.3f} s, warm median {med(w):.3f} s; "
        f"serve start to ready: {s['startup_s']:.1f} s")  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=None, help="jobs after the warm-up, each way (8; 1 with --full)")
    ap.add_argument("--full", action="store_true", help="the files of --models on the GPU, full-size turbo")
    ap.add_argument("--models", type=Path, help="with --full: the folder of model files")
    ap.add_argument("--device", help="with --full: cuda (default), cuda:N or cpu (a check on tiny files)")
    ap.add_argument("--frames", type=int, help="with --full: frames instead of 81")
    ap.add_argument("--size", help="with --full: WIDTHxHEIGHT instead of 832x1216")
    ap.add_argument("--warmup-frames", type=int, help="with --full: the warm-up job's frames (default: the same)")
    ap.add_argument("--skip-throughput", action="store_true", help="leave out part 4 (one worker's jobs/s)")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    if args.full and args.models is None:
        raise BenchError("--full needs --models DIR — 'wanrender models random --dir DIR --size full' writes one")
    given = [f"--{k.replace('_', '-')}" for k in ("models", "device", "frames", "size", "warmup_frames")
             if getattr(args, k) is not None]  # fmt: skip
    if given and not args.full:
        raise BenchError(f"{given[0]} goes with --full — add --full, or leave it out for the CPU demo")
    if args.jobs is None:
        args.jobs = 1 if args.full else 8
    if args.jobs < 1:
        raise BenchError(f"--jobs {args.jobs} is invalid — use 1 or more")
    return args


def run(args) -> None:
    if args.full:
        setup = full_setup(args)
    else:
        home = Path(tempfile.mkdtemp(prefix="wanrender-bench-home-"))
        os.environ["WANRENDER_HOME"] = str(home)
        from wanrender.demo import demo_image, ensure_demo_models

        setup = Setup(home, ensure_demo_models(), demo_image(), "cpu", TINY, None)
    say(machine_line(setup.device))
    d = direct(setup, args.jobs)
    freed = free_gpu_line(setup.device)
    s = through_service(setup, args.jobs)
    if args.full:
        report_full(setup, d, s, args.jobs, freed)
    else:
        report_demo(setup, d, s, args.jobs)
    results = {"params": setup.params, "device": setup.device, "direct": [asdict(j) for j in d],
               "service": {"startup_s": s["startup_s"], "jobs": [asdict(j) for j in s["jobs"]]}}  # fmt: skip
    if not args.skip_throughput:
        tp_params = setup.params if args.full else {**TINY, "frames": 17}
        tp_on = throughput(setup, tp_params, args.jobs, True)
        tp_off = throughput(setup, tp_params, args.jobs, False)
        say(f"one worker, {tp_params['frames']} frames at {tp_params['width']}x{tp_params['height']}: {tp_on:.3f} "
            f"jobs/s with the overlap, {tp_off:.3f} jobs/s without ({(tp_on / tp_off - 1) * 100:+.0f}%)")  # fmt: skip
        results["throughput_jobs_per_s"] = {"overlap": tp_on, "no_overlap": tp_off}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


def main(argv=None) -> None:
    from wanrender.errors import WanrenderError

    try:
        run(parse_args(argv))
    except (BenchError, WanrenderError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
