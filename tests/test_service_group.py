"""`wanrender worker --parallel N` (issue #17): one service worker whose every job is
rendered by N processes together (sequence-parallel DiT, split decode), here two CPU
processes over gloo with the demo models against a real nats-server (`serve --workers
0`: the API and NATS alone). The same code runs on N GPUs with NCCL; nothing of it
has run on several GPUs yet."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import TINY, cli, demo_home, env, final, nats_url, one_line_error, wait  # noqa: E402

home = pytest.fixture(scope="module", name="home")(demo_home)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _serve(e: dict, data: Path, log: Path, *args: str):
    from wanrender.service.broker import free_port
    from wanrender.service.client import Client

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "serve", "--data", str(data), "--listen",
                                 f"127.0.0.1:{port}", "--device", "cpu", "--workers", "0", "--lease", "10", *args], env=e,
                                stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        try:
            client.workers()
            return True
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    wait(up, 90, 0.2)
    return proc, client


def _worker(e: dict, data: Path, log: Path, *where: str) -> subprocess.Popen:
    """`wanrender worker --parallel 2` on CPU processes, joined to the serve of ``data``
    (its storage: ``where``, default that data folder)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "wanrender.cli", "worker", "--nats", nats_url(data),
                                 *(where or ("--data", str(data))), "--device", "cpu", "--parallel", "2"], env=e,
                                stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@contextlib.contextmanager
def _group(e: dict, tmp_path: Path, *storage: str):
    """serve with no local worker, and a `worker --parallel 2` beside it: (client, worker, its log).
    ``storage``: serve's and the worker's storage flags (--s3 URL --bucket B), default a data folder."""
    data = tmp_path / "data"
    serve, client = _serve(e, data, tmp_path / "serve.log", *storage)
    worker = None
    try:
        worker = _worker(e, data, tmp_path / "worker.log", *storage)
        yield client, worker, tmp_path / "worker.log"
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        serve.send_signal(signal.SIGINT)
        serve.wait(60)


def test_a_two_process_worker_renders_cancels_and_stops_with_its_ranks(home, tmp_path: Path) -> None:
    from wanrender.demo import demo_image, ensure_demo_models
    from wanrender.media.video import read_video

    e = env(home, OMP_NUM_THREADS="1")
    with _group(e, tmp_path) as (client, worker, worker_log):
        (w,) = wait(lambda: worker.poll() is None and client.workers(), 120, 0.2)
        assert w["gpus"] == 2 and w["device"] == "cpu" and w["name"].endswith("cpux2"), w
        ranks = _children(worker.pid)
        assert len(ranks) >= 2, ranks  # the two rank processes (and multiprocessing's helper)
        image = demo_image()

        # A job renders on both ranks, as one process renders it.
        job = client.submit(image, {"prompt": "slow dolly-in", **TINY, "seed": 3})
        end = final(client, job["id"], 120)
        assert end["state"] == "succeeded", (end, worker_log.read_text()[-3000:])
        side = json.loads(client.download(job["id"], tmp_path / "job.json", "sidecar").read_text())
        assert side["plan"]["parallel"]["gpus"] == 2 and side["plan"]["parallel"]["mode"] == "ulysses"
        got, _ = read_video(client.download(job["id"], tmp_path / "job.mp4"))
        one = cli(e, "generate", str(image), "-p", "slow dolly-in", "--preset", "demo", "--frames", "5", "--size",
                  "80x64", "--seed", "3", "--device", "cpu", "--models", str(ensure_demo_models().high.parent), "-o",
                  str(tmp_path / "one.mp4"))  # fmt: skip
        assert one.returncode == 0, one.stderr[-2000:]
        want, _ = read_video(tmp_path / "one.mp4")
        # The frames agree within rounding (tests/test_parallel_cli.py); after x264 on both, the
        # decoded videos stay within a level or two on average.
        assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).mean() < 1.0

        # A cancel mid-render stops both ranks at the same step; the group then renders the next job.
        slow = client.submit(image, {"prompt": "slow", **TINY, "steps": 200})
        wait(lambda: (j := client.job(slow["id"]))["state"] == "running" and (j["progress"] or {}).get("step"), 120)
        client.cancel(slow["id"])
        stopped = final(client, slow["id"], 60)
        assert stopped["state"] == "canceled" and stopped["progress"]["step"] < 200, stopped
        after = client.submit(image, {"prompt": "after", **TINY, "seed": 4})
        assert final(client, after["id"], 120)["state"] == "succeeded", worker_log.read_text()[-3000:]
        assert _children(worker.pid) == ranks  # the same ranks, still warm

        # SIGTERM: the worker leaves, its ranks end with it, nothing is left behind.
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker_log.read_text()[-3000:]
        text = worker_log.read_text()
        assert "Traceback" not in text and "stopped" in text, text[-3000:]
        assert "and 1 more (--parallel 2) joined" in text
        wait(lambda: not any(_alive(p) for p in ranks), 20)
        wait(lambda: client.workers() == [], 30, 0.5)  # it deregistered


def test_a_rank_that_dies_mid_render_ends_the_worker_in_one_line(home, tmp_path: Path) -> None:
    """The ranks may be out of step after a failure: the whole worker ends (serve restarts
    it; the job's lease lapses and another attempt renders it), nothing is left running."""
    import os

    from wanrender.demo import demo_image

    e = env(home, OMP_NUM_THREADS="1")
    with _group(e, tmp_path) as (client, worker, worker_log):
        (w,) = wait(lambda: worker.poll() is None and client.workers(), 120, 0.2)
        ranks = sorted(p for p in _children(worker.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())
        assert len(ranks) == 2 and w["pid"] in ranks, (ranks, w)  # rank 0 is the worker that registered
        (follower,) = set(ranks) - {w["pid"]}
        slow = client.submit(demo_image(), {"prompt": "slow", **TINY, "steps": 200})
        wait(lambda: (j := client.job(slow["id"]))["state"] == "running" and (j["progress"] or {}).get("step"), 120)
        os.kill(follower, signal.SIGKILL)
        assert worker.wait(60) == 2
        text = worker_log.read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        # The rank that died is named, not rank 0, which lost it.
        assert len(lines) == 1 and "rank 1 of 2" in lines[0] and "killed by SIGKILL" in lines[0], text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        wait(lambda: not any(_alive(p) for p in ranks), 20)
        assert client.job(slow["id"])["state"] in ("running", "leased", "queued")  # not lost: its lease lapses


def test_a_two_process_worker_on_s3_storage(home, tmp_path: Path) -> None:
    """The storage crosses into rank 0 by its URL (an S3 client does not pickle)."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    from helpers_service import AWS, keys, moto_server, s3_client

    from wanrender.demo import demo_image

    server, url = moto_server()
    try:
        s3c = s3_client(url)
        s3c.create_bucket(Bucket="renders")
        e = env(home, OMP_NUM_THREADS="1", **AWS)
        with _group(e, tmp_path, "--s3", url, "--bucket", "renders") as (client, worker, worker_log):
            wait(lambda: worker.poll() is None and client.workers(), 120, 0.2)
            job = client.submit(demo_image(), {"prompt": "on s3", **TINY})
            assert final(client, job["id"], 120)["state"] == "succeeded", worker_log.read_text()[-3000:]
            assert f"jobs/{job['id']}/attempt-1/result.mp4" in keys(s3c, "renders", f"jobs/{job['id']}/")
    finally:
        server.stop()


def test_rank_0_without_nats_ends_the_worker_in_one_line_and_the_others_with_it(home, tmp_path: Path) -> None:
    e = env(home, OMP_NUM_THREADS="1", WANRENDER_NATS_WAIT="2")
    proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "worker", "--nats", "nats://127.0.0.1:9", "--data",
                             str(tmp_path), "--device", "cpu", "--parallel", "2"], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    ranks = wait(lambda: {p for p in _children(proc.pid)} or proc.poll() is not None, 60, 0.1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot reach NATS at nats://127.0.0.1:9" in lines[0], err
    if isinstance(ranks, set):
        wait(lambda: not any(_alive(p) for p in ranks), 20)


@pytest.mark.parametrize(
    "args,words",
    [
        (["--parallel", "3"], ["3 GPUs cannot share the DiT's", "heads evenly"]),
        (["--parallel", "0"], ["--parallel 0 is invalid"]),
        (["--parallel", "2", "--device", "cuda:0"], ["uses the first 2 visible GPUs"]),
    ],
)
def test_bad_parallel_options_are_one_line_before_any_process(home, tmp_path: Path, args, words) -> None:
    data = tmp_path / "data"
    data.mkdir()
    r = cli(env(home), "worker", "--nats", "nats://127.0.0.1:9", "--data", str(data), *args, timeout=120)
    one_line_error(r, 2, *words)
