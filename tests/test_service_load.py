"""A bounded load test on loopback: 200 submissions from 8 concurrent clients within
60 s, against `wanrender serve` plus one more `wanrender worker` (two CPU workers).

What it exercises, honestly: the whole service path for every one of the 200 jobs
(multipart upload checked and stored, KV record, JetStream publish with a message id,
routing, a worker's fetch), with many clients at once. Real renders on 2 shared cores
are too slow for 200 in a minute (a 1-frame render takes 0.1 s on an idle core and
several seconds when other processes load the machine), so one job in ten (20) is
rendered for real with the demo models at the tiniest size (1 frame at 64x64, 1 step)
and the other 180 are canceled by their client right after submitting (queued: the
worker drops it when delivered; running: it stops at the next step boundary). One in
ten is also retried with the same Idempotency-Key and must return the same job. Every
job must reach a terminal state, none lost (200 distinct records, 200 job folders),
none duplicated (each job rendered at most once: attempt 1, one published result, and
the workers' render count equals the succeeded jobs).
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import env, start_serve, stop, wait  # noqa: E402

N, CLIENTS = 200, 8
SPECK = {"preset": "demo", "frames": 1, "width": 64, "height": 64, "steps": 1}


@pytest.mark.slow
def test_200_submissions_from_concurrent_clients_all_end_none_lost_or_duplicated(demo_set, tmp_path: Path) -> None:
    import re

    from wanrender.service.client import Client

    home, _, image = demo_set
    data = tmp_path / "data"
    proc, client = start_serve(env(home), data)
    log = (data / "nats" / "nats-server.log").read_text()
    nats_url = "nats://" + re.findall(r"Listening for client connections on (\S+)", log)[-1]
    extra = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "worker", "--nats", nats_url, "--creds",
                              str(data / "nats" / "worker.creds"), "--data", str(data), "--device", "cpu"],
                             env=env(home), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait(lambda: len(client.workers()) == 2, 60, 0.2)

        def one(i: int) -> tuple[int, str, bool]:
            c = Client(client.server)
            job = c.submit(image, {"prompt": f"load {i}", **SPECK, "seed": i}, idempotency_key=f"load-{i}")
            if i % 10 == 3:
                assert c.submit(image, {"prompt": f"load {i}", **SPECK, "seed": i}, f"load-{i}")["id"] == job["id"]
            canceled = i % 10 != 0
            if canceled:
                c.cancel(job["id"])
            return i, job["id"], canceled

        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            submitted = list(pool.map(one, range(N)))
        assert time.monotonic() - t0 < 60, "the submissions took over 60 s"
        ids = [job_id for _, job_id, _ in submitted]
        assert len(set(ids)) == N  # one job per key, a retry returns the same one

        def all_done():
            states = {i: client.job(i) for i in ids}
            return states if all(s["state"] in ("succeeded", "failed", "canceled") for s in states.values()) else None

        states = wait(all_done, 100, 1.0)
        for _, job_id, canceled in submitted:
            s = states[job_id]
            if canceled:
                assert s["state"] in ("canceled", "succeeded"), s  # a cancel can come after the render ended
            else:
                assert s["state"] == "succeeded", s
            if s["state"] == "succeeded":
                assert s["attempt"] == 1, s  # rendered once
                assert sorted(p.name for p in (data / "jobs" / job_id / "result").iterdir()) == ["result.json",
                                                                                                 "result.mp4"]  # fmt: skip
        assert sum(w["jobs_done"] for w in client.workers()) == sum(s["state"] == "succeeded" for s in states.values())
        assert sorted(p.name for p in (data / "jobs").iterdir()) == sorted(ids)  # nothing else stored
    finally:
        stop(extra)
        stop(proc)
