"""Service overhead on the CPU demo at a tiny size (issue #15's benchmarks).

1. Per job: the same request rendered directly by a warm ``Runner`` (what ``generate``
   runs) and through the service (HTTP submit, JetStream, a warm worker, publish,
   SSE until succeeded); the difference is the service's overhead.
2. Time to first progress event: submit until the first SSE record with progress.
3. Cold against warm: the first job of a fresh worker (models loaded) against the next ones.
4. Throughput of one worker with and without the overlap (encode/publish of job N on a
   second thread while job N+1 renders), on jobs queued before it starts.

    PYTHONPATH=src python benchmarks/service_overhead.py [--jobs 8]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TINY = {"preset": "demo", "frames": 5, "width": 80, "height": 64}


def direct(files, image, n: int) -> list[float]:
    from wanrender.runner import Runner
    from wanrender.service.jobs import JobParams, build_request

    runner = Runner("cpu")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n + 1):
            req = build_request(JobParams(prompt="bench", seed=i, **TINY), image, Path(tmp) / f"d{i}.mp4")
            t0 = time.perf_counter()
            runner.render(req, files)
            out.append(time.perf_counter() - t0)
    return out[1:]  # the first loads the models


def through_service(home: Path, image, n: int) -> dict:
    from helpers_service import env, start_serve, stop

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc, client = start_serve(env(home), Path(tmp) / "data")
        up = time.perf_counter() - t0
        per_job, first_progress = [], []
        try:
            for i in range(n + 1):
                t0 = time.perf_counter()
                job = client.submit(image, {"prompt": "bench", "seed": i, **TINY})
                seen = None
                for record in client.events(job["id"], timeout=120):
                    if seen is None and record.get("progress"):
                        seen = time.perf_counter() - t0
                    if record["state"] in ("succeeded", "failed", "canceled"):
                        break
                per_job.append(time.perf_counter() - t0)
                first_progress.append(seen)
        finally:
            stop(proc)
    return {"startup_s": up, "cold_s": per_job[0], "warm_s": per_job[1:], "first_progress_s": first_progress[1:],
            "cold_first_progress_s": first_progress[0]}  # fmt: skip


def throughput(files, image, n: int, overlap: bool) -> float:
    from wanrender.service.broker import EmbeddedBroker, QueueConfig, connect, ensure_jetstream
    from wanrender.service.intake import Limits, check_image, check_params, submit
    from wanrender.service.jobs import JobStore
    from wanrender.service.worker import Worker

    async def main(url: str, data: Path) -> float:
        nc = await connect(url, "bench")
        js = nc.jetstream()
        jobs_kv, _ = await ensure_jetstream(js, QueueConfig())
        store = JobStore(jobs_kv)
        blob = image.read_bytes()
        ids = []
        for i in range(n + 1):
            p = check_params(json.dumps({"prompt": "tp", "seed": i, **TINY, "frames": 17}), Limits())
            ids.append((await submit(js, store, data, p, blob, check_image(blob, Limits()), None))[0].id)
        await nc.close()
        stop = asyncio.Event()
        worker = Worker(url, data, files, "cpu", overlap=overlap)
        task = asyncio.create_task(worker.run(stop))
        while True:
            await asyncio.sleep(0.05)
            if hasattr(worker, "store"):
                got = [(await worker.store.get(i))[0] for i in ids]
                if all(g.terminal for g in got):
                    break
        stop.set()
        await task
        # From the first job's end (the models are loaded) to the last job's end: n jobs.
        return n / (got[-1].finished_at - got[0].finished_at)

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp) / "nats") as b:
        return asyncio.run(main(b.url, Path(tmp)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="wanrender-bench-home-"))
    os.environ["WANRENDER_HOME"] = str(home)
    from wanrender.demo import demo_image, ensure_demo_models

    files, image = ensure_demo_models(), demo_image()
    load = os.getloadavg()
    d = direct(files, image, args.jobs)
    s = through_service(home, image, args.jobs)
    tp_on = throughput(files, image, args.jobs, True)
    tp_off = throughput(files, image, args.jobs, False)
    med = statistics.median
    print(f"machine: {os.cpu_count()} CPU cores, load average {load[0]:.1f} at the start; "
          f"{subprocess.run(['uname', '-srm'], capture_output=True, text=True).stdout.strip()}")  # fmt: skip
    print(f"request: demo models, {TINY['frames']} frames at {TINY['width']}x{TINY['height']}, {args.jobs} jobs each")
    print(f"direct warm Runner.render: median {med(d):.3f} s (min {min(d):.3f})")
    w = s["warm_s"]
    print(f"through the service (submit -> SSE succeeded), warm worker: median {med(w):.3f} s (min {min(w):.3f})")
    print(f"service overhead per job: median {med(w) - med(d):+.3f} s, best case {min(w) - min(d):+.3f} s")
    fp = [x for x in s["first_progress_s"] if x is not None]
    print(f"time to first progress event (warm): median {med(fp):.3f} s; cold: {s['cold_first_progress_s']:.3f} s")
    print(f"cold first job (models loaded by the fresh worker): {s['cold_s']:.3f} s, warm median {med(w):.3f} s; "
          f"serve start to ready: {s['startup_s']:.1f} s")  # fmt: skip
    print(f"one worker, 17 frames at 80x64: {tp_on:.2f} jobs/s with the overlap, {tp_off:.2f} jobs/s without "
          f"({(tp_on / tp_off - 1) * 100:+.0f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
