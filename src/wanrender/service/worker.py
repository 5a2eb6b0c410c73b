"""A worker: takes one job at a time from the JetStream consumer and renders it with a
long-lived ``Runner`` (the models stay loaded between jobs).

The lease is the consumer's AckWait; every progress event sends an in-progress ack
that renews it, so a worker that dies stops renewing and the job goes to the next
worker as attempt N+1 (JetStream's delivery count). Outputs are written under the
attempt's folder and published by renaming that folder to the job's result folder,
only while the job record still names this attempt: a late result from an earlier
attempt is discarded. A user error (``WanrenderError``) fails the job at once; any
other error is retried until MaxDeliver attempts, then fails with the last reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.service.broker import CONSUMER, STREAM, QueueConfig, connect
from wanrender.service.eta import device_gpu
from wanrender.service.jobs import (
    JOB_ID,
    SIDECAR,
    VIDEO,
    JobParams,
    JobPaths,
    JobProgress,
    JobRecord,
    JobState,
    JobStore,
    build_request,
)
from wanrender.service.natsauth import open_jetstream
from wanrender.service.priority import Puller

log = logging.getLogger(__name__)
HEALTH_FILE_ENV = "WANRENDER_HEALTH_FILE"


class Stop(BaseException):
    """Raised from the progress callback to end a render at the next step boundary.

    A BaseException so that no ``except Exception`` in the render path swallows it;
    the runner aborts its encoder and writes nothing."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why  # "canceled" | "superseded" | "shutdown"


def default_name(device: str) -> str:
    raw = f"{socket.gethostname()}-{os.getpid()}-{device}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)


async def publish_result(store: JobStore, paths: JobPaths, job_id: str, attempt: int) -> JobRecord | None:
    """Publish attempt ``attempt``'s outputs if the job still belongs to it; otherwise
    delete them. Returns the succeeded record, or None when the result was discarded."""
    got = await store.get(job_id)
    record = got[0] if got else None
    if record is None or record.attempt != attempt or record.terminal or record.cancel_requested:
        shutil.rmtree(paths.attempt(attempt), ignore_errors=True)
        log.info("job %s: result of attempt %d discarded (the job is now %s)", job_id, attempt,
                 f"{record.state.value}, attempt {record.attempt}" if record else "gone")  # fmt: skip
        return None
    final = paths.result
    if final.exists():  # an earlier publish whose record update never landed: this attempt replaces it
        aside = paths.root / f".result-old-{attempt}"
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(paths.attempt(attempt), final)  # one rename: readers see all the outputs or none
    for dead in paths.root.glob("attempt-*"):  # what earlier attempts left when their workers died
        shutil.rmtree(dead, ignore_errors=True)

    def done(r: JobRecord) -> JobRecord | None:
        if r.attempt != attempt or r.terminal:
            return None
        return r.touch(state=JobState.SUCCEEDED, result={"video": VIDEO, "sidecar": SIDECAR},
                       finished_at=time.time(), error=None)  # fmt: skip

    new = await store.update(job_id, done)
    return new if new is not None and new.state is JobState.SUCCEEDED and new.attempt == attempt else None


class Worker:
    """``files``: the model files (ModelFiles) this worker renders with."""

    def __init__(self, nats_url: str, data: Path, files, device: str = "cpu", name: str | None = None,
                 queue: QueueConfig = QueueConfig(), heartbeat_s: float = 5.0, runner=None) -> None:  # fmt: skip
        self.url, self.data, self.files, self.device = nats_url, Path(data), files, device
        self.name = name or default_name(device)
        self.queue, self.heartbeat_s = queue, heartbeat_s
        self._runner = runner
        self.current: str | None = None
        self.jobs_done = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="render")
        self.lease_s, self.max_deliver = queue.ack_wait_s, queue.max_deliver

    @property
    def runner(self):
        if self._runner is None:
            from wanrender.runner import Runner

            self._runner = Runner(self.device)
        return self._runner

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        nc = await connect(self.url, f"wanrender-worker-{self.name}")
        try:
            js = nc.jetstream()
            jobs_kv, self._workers_kv = await open_jetstream(js)  # lookups only: the NATS worker user's rights
            self.store = JobStore(jobs_kv)
            puller = await Puller(js).bind()  # high priority first
            self.gpu = device_gpu(self.device)  # advertised for the API's ETA
            # The lease terms are the consumer's (set by whoever created it), not this worker's defaults.
            terms = (await js.consumer_info(STREAM, CONSUMER)).config
            self.lease_s, self.max_deliver = (
                float(terms.ack_wait or self.queue.ack_wait_s),
                int(terms.max_deliver or self.queue.max_deliver),
            )
            beat = asyncio.create_task(self._heartbeat(stop))
            if ready is not None:
                ready.set()
            log.info("worker %s on %s: waiting for jobs", self.name, self.device)
            try:
                while not stop.is_set():
                    for msg in await puller.next(1.0):
                        await self.handle(msg, stop)
            finally:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
                try:
                    await self._workers_kv.delete(self.name)
                except Exception:  # noqa: BLE001 - best effort: the heartbeat expires anyway
                    pass
        finally:
            await nc.close()
            self._pool.shutdown(wait=False)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.beat()
            try:
                await asyncio.wait_for(stop.wait(), self.heartbeat_s)
            except asyncio.TimeoutError:
                pass

    async def beat(self) -> None:
        info = {"name": self.name, "device": self.device, "warm": self._runner is not None and self._runner.engine is not None,
                "job": self.current, "jobs_done": self.jobs_done, "host": socket.gethostname(), "pid": os.getpid(),
                "seen_at": time.time(), "gpu": getattr(self, "gpu", None)}  # fmt: skip
        try:
            await self._workers_kv.put(self.name, json.dumps(info).encode())
            if os.environ.get(HEALTH_FILE_ENV):  # the Docker HEALTHCHECK reads its age (docker/worker.Dockerfile)
                Path(os.environ[HEALTH_FILE_ENV]).touch()
        except Exception as e:  # noqa: BLE001 - a missed heartbeat is not fatal; NATS reconnects
            log.warning("worker %s: heartbeat failed (%s)", self.name, e)

    async def handle(self, msg, stop: asyncio.Event) -> None:
        attempt = msg.metadata.num_delivered
        job_id = msg.data.decode(errors="replace")
        got = await self.store.get(job_id) if JOB_ID.match(job_id) else None
        if got is None:
            log.warning("dropping a job message without a job record: %r", job_id[:80])
            await msg.term()
            return
        record = got[0]
        if record.terminal:
            await msg.ack()
            return
        if record.cancel_requested:
            await self.store.update(job_id, lambda r: None if r.terminal else r.touch(
                state=JobState.CANCELED, finished_at=time.time()))  # fmt: skip
            await msg.ack()
            return

        def claim(r: JobRecord) -> JobRecord | None:
            if r.terminal or r.attempt >= attempt:
                return None
            lost = r.last_reason
            if r.attempt and r.state in (JobState.LEASED, JobState.RUNNING):
                lost = f"attempt {r.attempt} on worker {r.worker} stopped renewing its lease (the worker died?)"
            return r.touch(state=JobState.LEASED, attempt=attempt, worker=self.name, progress=None, last_reason=lost)

        record = await self.store.update(job_id, claim)
        if record is None or record.attempt != attempt or record.terminal:
            if record is not None and record.terminal:
                await msg.ack()
            return
        self.current = job_id
        await self.beat()
        try:
            await self._render(msg, record, attempt, stop)
        finally:
            self.current = None
            await self.beat()

    async def _render(self, msg, record: JobRecord, attempt: int, stop: asyncio.Event) -> None:
        keeper = asyncio.create_task(self._keep_lease(msg))
        try:
            await self._attempt(msg, record, attempt, stop)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _attempt(self, msg, record: JobRecord, attempt: int, stop: asyncio.Event) -> None:
        job_id = record.id
        paths = JobPaths(self.data, job_id)
        folder = paths.attempt(attempt)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        loop = asyncio.get_running_loop()

        async def on_event(stage: str, step: int | None, total: int | None, detail: str) -> str | None:
            await msg.in_progress()  # renews the lease

            def running(r: JobRecord) -> JobRecord | None:
                if r.attempt != attempt or r.terminal:
                    return None
                return r.touch(state=JobState.RUNNING, started_at=r.started_at or time.time(),
                               progress=JobProgress(stage=stage, step=step, steps=total, detail=detail))  # fmt: skip

            now = await self.store.update(job_id, running)
            if now is None or now.attempt != attempt or now.terminal:
                return "superseded"
            if now.cancel_requested:
                return "canceled"
            if stop.is_set():
                return "shutdown"
            return None

        def progress(stage: str, step: int | None, total: int | None, detail: str) -> None:
            why = asyncio.run_coroutine_threadsafe(on_event(str(stage), step, total, detail), loop).result(60)
            if why:
                raise Stop(why)

        try:
            image = paths.find_image()
            if image is None:
                raise WanrenderError(
                    "the job's uploaded image is missing from the server's data folder — submit it again"
                )
            req = build_request(JobParams(**record.params), image, folder / VIDEO)
            await loop.run_in_executor(self._pool, lambda: self.runner.render(req, self.files, progress=progress))
        except Stop as s:
            shutil.rmtree(folder, ignore_errors=True)
            if s.why == "canceled":
                await self.store.update(job_id, lambda r: None if r.terminal or r.attempt != attempt else r.touch(
                    state=JobState.CANCELED, finished_at=time.time()))  # fmt: skip
                await msg.ack()
            elif s.why == "shutdown":
                await msg.nak()  # another worker takes it now instead of after AckWait
            # superseded: a newer attempt holds the job; this delivery is neither acked nor retried
            return
        except WanrenderError as e:
            shutil.rmtree(folder, ignore_errors=True)
            await self._fail(job_id, attempt, str(e))
            await msg.term()
            return
        except Exception as e:  # noqa: BLE001 - retried up to MaxDeliver, then the job fails with it
            shutil.rmtree(folder, ignore_errors=True)
            reason = f"internal error on worker {self.name} ({type(e).__name__}: {e})"
            log.exception("job %s attempt %d", job_id, attempt)
            if attempt >= self.max_deliver:
                await self._fail(job_id, attempt, f"failed after {attempt} attempt(s): {reason}")
                await msg.term()
            else:
                await self.store.update(job_id, lambda r: None if r.attempt != attempt or r.terminal else r.touch(
                    state=JobState.QUEUED, last_reason=reason, worker=None))  # fmt: skip
                await msg.nak(delay=1.0)
            return
        if await publish_result(self.store, paths, job_id, attempt) is not None:
            self.jobs_done += 1
            await msg.ack()
        else:
            got = await self.store.get(job_id)
            if got is not None and got[0].cancel_requested and got[0].attempt == attempt:
                await self.store.update(job_id, lambda r: None if r.terminal else r.touch(
                    state=JobState.CANCELED, finished_at=time.time()))  # fmt: skip
                await msg.ack()

    async def _keep_lease(self, msg) -> None:
        """Renew the lease while this process renders, also through long silent stretches
        (a cold load of 30 GB of weights sends no step events); if the process dies,
        the renewals stop with it and the job goes to the next worker."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await msg.in_progress()
            except Exception as e:  # noqa: BLE001 - NATS reconnecting: the next renewal may land
                log.warning("lease renewal failed: %s", e)

    async def _fail(self, job_id: str, attempt: int, message: str) -> None:
        await self.store.update(job_id, lambda r: None if r.attempt != attempt or r.terminal else r.touch(
            state=JobState.FAILED, error=message, finished_at=time.time()))  # fmt: skip
