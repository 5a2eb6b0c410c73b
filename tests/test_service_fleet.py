"""The fleet: routing by capability (emulated VRAM: `serve --vram`, `worker --vram`) and
the overlap of one job's encode/publish with the next job's render, with a real
nats-server and real renders with the demo models on the CPU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import TINY, env, final, start_serve, stop, wait  # noqa: E402

# With the demo models, the planner fits this on a 3 GiB card but not on a 2 GiB one.
BIG = {"preset": "demo", "frames": 9, "width": 160, "height": 128}


def _post(client, params: dict, image: Path) -> tuple[int, dict]:
    from wanrender.errors import WanrenderError

    try:
        return 201, client.submit(image, params)
    except WanrenderError as e:
        code = int(str(e).split("(")[1].split(")")[0])
        return code, {"error": str(e)}


def test_a_small_vram_worker_never_receives_a_job_its_plan_refuses(demo_set, tmp_path: Path) -> None:
    home, _, image = demo_set
    data = tmp_path / "data"
    proc, client = start_serve(env(home), data, "--vram", "2GiB")  # its one worker: an emulated 2 GiB card
    big = None
    try:
        (small,) = client.workers()
        cap = small["capability"]
        assert cap["tier"] == 2 and cap["gpu"] == "emulated 2 GiB" and cap["guide"]["832x480"] == 0
        # No registered worker could ever run it: refused at submit with the planner's reason.
        status, body = _post(client, {"prompt": "big", **BIG}, image)
        assert status == 422, body
        assert "no registered worker could ever run it" in body["error"] and "9 frames at 160x128" in body["error"]
        assert "does not fit" in body["error"]
        assert not (data / "jobs").exists()  # nothing stored
        # A job for model files no worker holds is refused too.
        status, body = _post(client, {"prompt": "x", **TINY, "models": "0123456789ab"}, image)
        assert status == 422 and "no registered worker holds this model set" in body["error"]
        # A bigger (emulated 8 GiB) worker joins: the job now goes to it, never to the small one.
        big = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "worker", "--nats", _nats_url(data), "--creds",
                                str(data / "nats" / "worker.creds"), "--data", str(data), "--device", "cpu",
                                "--vram", "8GiB"], env=env(home),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait(lambda: len(client.workers()) == 2, 60, 0.2)
        big_name = next(w["name"] for w in client.workers() if w["capability"]["tier"] == 8)
        tiny = client.submit(image, {"prompt": "small one", **TINY})  # fits both
        job = client.submit(image, {"prompt": "big", **BIG})
        assert job["route"].endswith(".t3"), job
        end = final(client, job["id"], 120)
        assert end["state"] == "succeeded" and end["worker"] == big_name and end["attempt"] == 1, end
        assert final(client, tiny["id"])["state"] == "succeeded"
        by_name = {w["name"]: w for w in client.workers()}
        assert by_name[small["name"]]["job"] is None
        # The big worker leaves: a big job waits (its class has no live worker), it is not refused.
        stop(big)
        big = None
        wait(lambda: len(client.workers()) == 1, 30, 0.2)
        waiting = client.submit(image, {"prompt": "big again", **BIG})
        assert waiting["waiting"] == "no capable worker online"
        time.sleep(2)  # the small worker is idle and polling: it still does not take it
        now = client.job(waiting["id"])
        assert now["state"] == "queued" and now["attempt"] == 0 and now["waiting"] == "no capable worker online"
        assert client.cancel(waiting["id"])["state"] == "canceled"
    finally:
        if big is not None:
            big.kill()
            big.wait()
        stop(proc)


def _nats_url(data: Path) -> str:
    import re

    log = (data / "nats" / "nats-server.log").read_text()
    return "nats://" + re.findall(r"Listening for client connections on (\S+)", log)[-1]


async def _enqueue_all(url: str, data: Path, image: Path, n: int) -> list[str]:
    from wanrender.service.broker import QueueConfig, connect, ensure_jetstream
    from wanrender.service.intake import Limits, check_image, check_params, submit
    from wanrender.service.jobs import JobStore

    nc = await connect(url, "test")
    try:
        js = nc.jetstream()
        jobs_kv, _ = await ensure_jetstream(js, QueueConfig(ack_wait_s=5.0))
        store = JobStore(jobs_kv)
        blob = image.read_bytes()
        ids = []
        for i in range(n):
            p = check_params(json.dumps({"prompt": f"overlap {i}", **TINY, "frames": 17, "seed": i}), Limits())
            record, _ = await submit(js, store, data, p, blob, check_image(blob, Limits()), None)
            ids.append(record.id)
        return ids
    finally:
        await nc.close()


def _run_worker(url: str, data: Path, files, ids: list[str], overlap: bool):
    from wanrender.service.broker import QueueConfig
    from wanrender.service.worker import Worker

    async def main():
        stop = asyncio.Event()
        worker = Worker(url, data, files, "cpu", queue=QueueConfig(ack_wait_s=5.0), overlap=overlap)
        task = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if hasattr(worker, "store"):
                    got = [await worker.store.get(i) for i in ids]
                    if all(g and g[0].terminal for g in got):
                        return [g[0] for g in got]
            raise AssertionError("the jobs did not finish")
        finally:
            stop.set()
            await task

    return asyncio.run(main())


@pytest.mark.parametrize("overlap", [True, False])
def test_back_to_back_jobs_overlap_the_encode_and_publish_with_the_next_render(
    demo_set, tmp_path: Path, overlap: bool, monkeypatch
) -> None:
    """Two jobs queued before the worker starts: with the overlap, the second starts
    rendering before the first is published (its MP4 encoded, its record succeeded);
    without it, strictly after. The encoder's end is held 0.5 s (the one stand-in here):
    the demo's 17 small frames encode in milliseconds, which would make the order a race
    instead of a property of the worker."""
    from wanrender.media.video import StreamingWriter, read_video
    from wanrender.service.broker import EmbeddedBroker

    close = StreamingWriter.close

    def slow_close(self):
        time.sleep(0.5)
        return close(self)

    monkeypatch.setattr(StreamingWriter, "close", slow_close)
    _, files, image = demo_set
    with EmbeddedBroker(tmp_path / "nats") as b:
        ids = asyncio.run(_enqueue_all(b.url, tmp_path, image, 2))
        first, second = _run_worker(b.url, tmp_path, files, ids, overlap)
    for r in (first, second):
        assert r.state.value == "succeeded" and r.attempt == 1, r
        assert r.started_at < r.rendered_at <= r.finished_at
        frames, _ = read_video(tmp_path / r.result["video"])
        assert frames.shape[0] == 17
        side = json.loads((tmp_path / r.result["sidecar"]).read_text())
        assert side["timings_s"]["video_encode"] > 0  # the encode ran (on the finishing thread with the overlap)
        # the overlap's sidecar is made before its encoder ends: no tail to report there
        assert (side["tail_s"] is None) == overlap
    if overlap:
        assert second.started_at < first.finished_at, (second.started_at, first.finished_at)
    else:
        assert second.started_at > first.finished_at


def test_a_high_job_of_a_class_is_taken_before_normal_ones_of_any_class(demo_set, tmp_path: Path) -> None:
    """Priorities x routing at the JetStream level, with the worker's real Puller and the
    API's submit path: a worker of tier 8 holds normal jobs in its own class (t8), a
    normal job in a lower class (t3) and a high one in that lower class; it takes the
    high one first, then normal ones by tier, highest first. queue_position counts the
    class's high job for a normal one."""
    from wanrender.service.broker import EmbeddedBroker, QueueConfig, connect, ensure_jetstream
    from wanrender.service.intake import Limits, check_image, check_params, submit
    from wanrender.service.jobs import JobStore
    from wanrender.service.priority import queue_ahead
    from wanrender.service.routing import Puller, Route, capability_of, ensure_class_consumer, route_name

    _, files, image = demo_set
    cap = capability_of(files, "cpu", 8.0)  # an emulated 8 GiB card: tier 8
    top, low = route_name(cap.models, cap.tier), route_name(cap.models, 3)
    blob = image.read_bytes()
    suffix = check_image(blob, Limits())

    async def scenario():
        nc = await connect(b.url, "test")
        try:
            js = nc.jetstream()
            jobs_kv, _ = await ensure_jetstream(js, QueueConfig())
            store = JobStore(jobs_kv)
            queued = {}
            for name, route, priority in (("n-top-1", top, "normal"), ("n-top-2", top, "normal"),
                                          ("n-low", low, "normal"), ("h-low", low, "high")):  # fmt: skip
                await ensure_class_consumer(js, route, QueueConfig())
                params = check_params(json.dumps({"prompt": name, **TINY, "priority": priority}), Limits())
                record, _ = await submit(js, store, tmp_path, params, blob, suffix, None, route=Route(route))
                assert record.route == route
                queued[record.id] = name
            by_name = {v: k for k, v in queued.items()}
            low_normal = (await store.get(by_name["n-low"]))[0]
            ahead = {n: await queue_ahead(js, (await store.get(by_name[n]))[0]) for n in ("h-low", "n-top-2")}
            assert ahead == {"h-low": 0, "n-top-2": 1}, ahead
            assert await queue_ahead(js, low_normal) == 1  # the class's high job goes first
            puller = Puller(nc, js, cap, QueueConfig())
            await puller.start()
            order = []
            for _ in range(4):
                msg = await puller.next(asyncio.Event(), 2.0)
                order.append((queued[msg.data.decode()], msg.metadata.consumer))
                await msg.ack()
            await puller.stop()
            return order
        finally:
            await nc.close()

    with EmbeddedBroker(tmp_path / "nats") as b:
        order = asyncio.run(scenario())
    low_c, top_c = low.replace(".", "-"), top.replace(".", "-")
    assert order == [("h-low", f"wh-{low_c}"), ("n-top-1", f"w-{top_c}"), ("n-top-2", f"w-{top_c}"),
                     ("n-low", f"w-{low_c}")], order  # fmt: skip
