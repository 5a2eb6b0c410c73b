"""Storage and expiry: `wanrender serve --s3 URL --bucket B` against a real S3 API on
loopback (moto's server), real NATS, real renders with the demo models at a tiny size."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")
pytest.importorskip("boto3")
pytest.importorskip("moto")

from helpers_service import (  # noqa: E402
    AWS,
    TINY,
    cli,
    env,
    final,
    keys,
    moto_server,
    nats_url,
    one_line_error,
    s3_client,
    start_serve,
    stop,
    wait,
)

BUCKET = "renders"
KEEP_S = 8


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    server, url = moto_server()
    client = s3_client(url)
    client.create_bucket(Bucket=BUCKET)
    yield url, client
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    for k, v in AWS.items():
        mp.setenv(k, v)
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def s3_service(demo_set, s3, tmp_path_factory):
    """serve with its inputs and results in the bucket, results kept KEEP_S seconds."""
    home, _, _ = demo_set
    url, _ = s3
    data = tmp_path_factory.mktemp("s3data")
    proc, client = start_serve(env(home, **AWS), data, "--s3", url, "--bucket", BUCKET, "--keep", f"{KEEP_S}s")
    yield client, data
    stop(proc)


def _watch_messages(url: str, seen: list, ready: threading.Event, done: threading.Event) -> None:
    """Every job message published (a core-NATS subscription beside JetStream's), as received."""

    async def main():
        import nats

        nc = await nats.connect(url)

        async def got(msg) -> None:
            seen.append(msg.data)

        for subject in ("wanrender.jobs.render", "wanrender.jobs.render.>"):
            await nc.subscribe(subject, cb=got)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    asyncio.run(main())


def test_a_job_on_s3_renders_publishes_in_the_bucket_and_downloads_through_the_api(
    s3_service, s3, demo_set, tmp_path: Path
) -> None:
    from wanrender.media.video import read_video

    client, data = s3_service
    _, s3c = s3
    url = nats_url(data)  # the worker user may hear the job subjects
    seen: list[bytes] = []
    ready, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_watch_messages, args=(url, seen, ready, done), daemon=True)
    t.start()
    assert ready.wait(10)
    _, _, image = demo_set
    try:
        job = client.submit(image, {"prompt": "s3", **TINY, "seed": 5})
        end = final(client, job["id"])
    finally:
        done.set()
        t.join(10)
    assert end["state"] == "succeeded" and end["attempt"] == 1, end
    prefix = f"jobs/{job['id']}/"
    # Inputs and outputs are in the bucket, the outputs under the attempt that published them.
    assert keys(s3c, BUCKET, prefix) == [prefix + "attempt-1/result.json", prefix + "attempt-1/result.mp4",
                                         prefix + "input.png"]  # fmt: skip
    assert end["result"] == {"video": prefix + "attempt-1/result.mp4", "sidecar": prefix + "attempt-1/result.json"}
    assert not (data / "jobs").exists()  # nothing of the job on the API's disk
    assert not list((data / "scratch").rglob("*.*")) if (data / "scratch").exists() else True
    # The queue message is the job id: a key, never the payload.
    assert seen == [job["id"].encode()], seen
    out = client.download(job["id"], tmp_path / "clip.mp4")
    frames, fps = read_video(out)
    assert frames.shape == (5, 64, 80, 3) and fps == 16
    side = json.loads(client.download(job["id"], tmp_path / "clip.json", "sidecar").read_text())
    assert side["request"]["seed"] == 5 and side["timings_s"]["video_encode"] >= 0


def test_results_expire_after_keep_then_get_says_expired_and_result_is_410(s3_service, s3, demo_set) -> None:
    from wanrender.errors import WanrenderError

    client, _ = s3_service
    _, s3c = s3
    _, _, image = demo_set
    job = client.submit(image, {"prompt": "expire me", **TINY})
    assert final(client, job["id"])["state"] == "succeeded"
    assert keys(s3c, BUCKET, f"jobs/{job['id']}/")
    gone = wait(lambda: (j := client.job(job["id"]))["state"] == "expired" and j, KEEP_S + 20, 0.25)
    assert gone["result"] is None and "links" not in gone
    # The sweep marks the record first, then deletes: the objects go a moment after the state.
    assert wait(lambda: keys(s3c, BUCKET, f"jobs/{job['id']}/") == [], 10, 0.1)  # the objects are deleted
    with pytest.raises(WanrenderError, match=r"\(410\): job [0-9a-f]{32} expired: results are kept for 8s"):
        client.download(job["id"], Path("/nonexistent/never-written.mp4"))


def test_a_late_attempt_on_s3_is_discarded_and_only_the_current_one_publishes(s3, tmp_path: Path, demo_set) -> None:
    from wanrender.service.broker import EmbeddedBroker, QueueConfig, connect, ensure_jetstream
    from wanrender.service.intake import Limits, check_image, check_params, submit
    from wanrender.service.jobs import JobState, JobStore
    from wanrender.service.storage import S3Storage, attempt_prefix
    from wanrender.service.worker import publish_result

    url, s3c = s3
    _, _, image = demo_set
    storage = S3Storage(url, BUCKET)

    async def scenario(nats_url: str):
        nc = await connect(nats_url, "test")
        try:
            js = nc.jetstream()
            jobs_kv, _ = await ensure_jetstream(js, QueueConfig())
            store = JobStore(jobs_kv)
            blob = image.read_bytes()
            p = check_params(json.dumps({"prompt": "late", **TINY}), Limits())
            record, _ = await submit(js, store, storage, p, blob, check_image(blob, Limits()), None)
            for n in (1, 2):
                for name in ("result.mp4", "result.json"):
                    storage.put_bytes(attempt_prefix(record.id, n) + name, b"attempt %d" % n)
            await store.update(record.id, lambda r: r.touch(state=JobState.RUNNING, attempt=2, worker="w2"))
            late = await publish_result(store, storage, record.id, 1)  # attempt 1 finishes after attempt 2 took over
            assert late is None and (await store.get(record.id))[0].state is JobState.RUNNING
            assert not storage.list(attempt_prefix(record.id, 1))
            won = await publish_result(store, storage, record.id, 2)
            return record.id, won
        finally:
            await nc.close()

    with EmbeddedBroker(tmp_path / "nats") as b:
        job_id, won = asyncio.run(scenario(b.url))
    assert won.state is JobState.SUCCEEDED and won.attempt == 2
    prefix = f"jobs/{job_id}/"
    assert keys(s3c, BUCKET, prefix) == [prefix + "attempt-2/result.json", prefix + "attempt-2/result.mp4",
                                         prefix + "input.png"]  # fmt: skip
    assert s3c.get_object(Bucket=BUCKET, Key=won.result["video"])["Body"].read() == b"attempt 2"


def test_storage_and_keep_flags_refuse_bad_input_in_one_line(demo_set, s3, tmp_path: Path) -> None:
    home, _, _ = demo_set
    url, _ = s3
    e = env(home, **AWS)
    one_line_error(cli(e, "serve", "--data", str(tmp_path), "--keep", "0"), 2, "--keep '0' is invalid")
    one_line_error(cli(e, "serve", "--data", str(tmp_path), "--keep", "soon"), 2, "--keep 'soon' is invalid")
    one_line_error(cli(e, "serve", "--data", str(tmp_path), "--s3", url), 2, "--s3 and --bucket go together")
    one_line_error(cli(e, "worker", "--nats", "nats://127.0.0.1:1", "--s3", url, "--bucket", "no-such-bucket"), 2,
                   "cannot use the bucket", "no-such-bucket")  # fmt: skip
    one_line_error(cli(e, "worker", "--nats", "nats://127.0.0.1:1", "--s3", "ftp://x", "--bucket", BUCKET), 2,
                   "--s3 'ftp://x' is invalid")  # fmt: skip
    assert not list(tmp_path.iterdir())  # nothing started, nothing written
