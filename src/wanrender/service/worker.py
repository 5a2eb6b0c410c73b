"""A worker: takes one job at a time from the JetStream consumer and renders it with a
long-lived ``Runner`` (the models stay loaded between jobs).

The lease is the consumer's AckWait; every progress event sends an in-progress ack
that renews it, so a worker that dies stops renewing and the job goes to the next
worker as attempt N+1 (JetStream's delivery count). Outputs are written under the
attempt's folder (storage.py: in place on local disk, or a scratch folder uploaded
to S3) and published only while the job record still names this attempt: a late
result from an earlier attempt is discarded. A user error (``WanrenderError``) fails
the job at once; any other error is retried until MaxDeliver attempts, then fails with
the last reason.

Jobs come from the classes this worker's capability allows, high priority first (routing.py). With
``overlap`` (the default) the render thread hands the frames to a second thread that
encodes the MP4, writes the sidecar, uploads and publishes, while the render thread
starts the next job: the CPU-side end of job N overlaps the GPU work of job N+1. The
job is acked only after its publish, and its lease is renewed until then, so a crash
mid-publish redelivers it.

A GPU profile (``--profile``, as ``generate`` has) is resolved once at start for this
worker's device and fills each job's precision, attention and compile (jobs cannot
set them) from the bucket nearest the job's size, so a job renders as fast through the
service as through ``generate``; the capability record advertises which profile it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.runtime.planner import PlanRefused
from wanrender.runtime.profiles import Profile, apply_resolved
from wanrender.service.broker import CONSUMER, HIGH_CONSUMER, STREAM, QueueConfig, connect
from wanrender.service.eta import device_gpu
from wanrender.service.jobs import (
    JOB_ID,
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
from wanrender.service.routing import (
    Puller,
    capability_of,
    caps_bucket,
    ensure_class_consumer,
    job_tier,
    route_name,
    subject_of,
)
from wanrender.service.storage import LocalStorage, as_storage, attempt_prefix, input_key

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


def emulated_gpu(vram_gib: float | None):
    """``--vram``'s card for the render's plan (None: the real one), as routing assumes it."""
    if vram_gib is None:
        return None
    from wanrender.runtime import gpus

    return replace(gpus.named("rtx4090"), name="a GPU").with_vram(vram_gib)


def worker_profile(spec: str, device: str) -> Profile | None:
    """``--profile`` of ``serve`` and ``worker``, resolved once before any model loads:
    ``auto`` (the profile matching this device, if any), ``off``, or a profile file, which
    must be readable and whose every bucket must run on ``device`` (one line otherwise)."""
    from wanrender.runtime.hardware import device_name
    from wanrender.runtime.profiles import check_profile_fits, profile_spec, resolve_profile

    spec = profile_spec(spec)
    prof = resolve_profile(spec, device_name(device))
    if prof is not None and spec != "auto":
        check_profile_fits(prof, device)
    return prof


async def publish_result(store: JobStore, where, job_id: str, attempt: int) -> JobRecord | None:
    """Publish attempt ``attempt``'s outputs (already in ``where``: a storage, or the
    first slice's JobPaths) if the job still belongs to it; otherwise delete them.
    Returns the succeeded record, or None when the result was discarded."""
    storage = LocalStorage(where.root.parent.parent) if isinstance(where, JobPaths) else where
    got = await store.get(job_id)
    record = got[0] if got else None
    if record is None or record.attempt != attempt or record.terminal or record.cancel_requested:
        await asyncio.to_thread(storage.delete, attempt_prefix(job_id, attempt))
        log.info("job %s: result of attempt %d discarded (the job is now %s)", job_id, attempt,
                 f"{record.state.value}, attempt {record.attempt}" if record else "gone")  # fmt: skip
        return None
    keys = await asyncio.to_thread(storage.publish, job_id, attempt)

    def done(r: JobRecord) -> JobRecord | None:
        if r.attempt != attempt or r.terminal:
            return None
        return r.touch(state=JobState.SUCCEEDED, result=keys, finished_at=time.time(), error=None)

    new = await store.update(job_id, done)  # the atomic step: only while the record names this attempt
    won = new is not None and new.state is JobState.SUCCEEDED and new.attempt == attempt
    # What earlier attempts left when their workers died (and, if this one lost, its own objects).
    await asyncio.to_thread(storage.drop_other_attempts, job_id, attempt if won else None)
    return new if won else None


class Worker:
    """``files``: the model files (ModelFiles) this worker renders with."""

    def __init__(self, nats_url: str, data, files, device: str = "cpu", name: str | None = None,
                 queue: QueueConfig = QueueConfig(), heartbeat_s: float = 5.0, runner=None,
                 vram_gib: float | None = None, overlap: bool = True, scratch: Path | None = None,
                 profile: Profile | None = None, gpus: int = 1) -> None:  # fmt: skip
        """``data``: a data folder or a storage (storage.py); ``vram_gib``: plan as if the
        device had this much memory (an emulated card; routing and the render's plan agree);
        ``scratch``: where an S3 worker renders before uploading (default: the temp folder);
        ``profile``: the GPU profile applied to every job (``worker_profile``), None: none;
        ``gpus``: GPUs per render (a ``parallel.group.GroupRunner`` as ``runner``)."""
        self.url, self.files, self.device = nats_url, files, device
        self.storage = as_storage(data)
        self.data = getattr(self.storage, "root", None)
        self.name = name or default_name(device)
        self.queue, self.heartbeat_s = queue, heartbeat_s
        self._runner = runner
        self.vram_gib, self.overlap, self.scratch = vram_gib, overlap, scratch
        self.profile, self.gpus = profile, gpus
        self.current: str | None = None
        self.jobs_done = 0
        self.capability = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self._finishing: asyncio.Task | None = None
        self.lease_s, self.max_deliver = queue.ack_wait_s, queue.max_deliver

    @property
    def runner(self):
        if self._runner is None:
            from wanrender.runner import Runner

            self._runner = Runner(self.device, gpu=emulated_gpu(self.vram_gib))
        return self._runner

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        # A stop (SIGTERM: docker stop, serve ending its children) while NATS has not
        # answered yet ends the wait at once instead of after WANRENDER_NATS_WAIT.
        connecting = asyncio.ensure_future(connect(self.url, f"wanrender-worker-{self.name}"))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            return
        nc = connecting.result()
        try:
            js = nc.jetstream()
            jobs_kv, self._workers_kv = await open_jetstream(js)  # lookups only: the NATS worker user's rights
            self.store = JobStore(jobs_kv)
            self.js = js
            self.gpu = device_gpu(self.device)  # advertised for the API's ETA
            # The lease terms are the consumer's (set by whoever created it), not this worker's defaults;
            # a class consumer this worker creates gets the same terms.
            terms = (await js.consumer_info(STREAM, CONSUMER)).config
            self.lease_s, self.max_deliver = (
                float(terms.ack_wait or self.queue.ack_wait_s),
                int(terms.max_deliver or self.queue.max_deliver),
            )
            self.queue = replace(self.queue, ack_wait_s=self.lease_s, max_deliver=self.max_deliver)
            described = self.profile.describe() if self.profile is not None else None
            self.capability = await asyncio.to_thread(capability_of, self.files, self.device, self.vram_gib, described)
            caps = await caps_bucket(js)  # a lookup: the API created it (open_jetstream waited for it)
            await caps.put(self.capability.key, json.dumps(self.capability.to_json()).encode())
            puller = Puller(nc, js, self.capability, self.queue)  # high priority first, then the highest tier
            await puller.start()
            beat = asyncio.create_task(self._heartbeat(stop))
            if ready is not None:
                ready.set()
            log.info("worker %s on %s: %s; waiting for jobs", self.name, self.device,
                     f"GPU profile {described}" if described else "no GPU profile (the render's defaults)")  # fmt: skip
            try:
                while not stop.is_set():
                    msg = await puller.next(stop)
                    if msg is not None:
                        await self.handle(msg, stop)
            finally:
                if self._finishing is not None:  # the last job's publish and ack complete before we leave
                    await asyncio.gather(self._finishing, return_exceptions=True)
                await puller.stop()
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
                try:
                    await self._workers_kv.delete(self.name)
                except Exception:  # noqa: BLE001 - best effort: the heartbeat expires anyway
                    pass
        finally:
            await nc.close()
            self._pool.shutdown(wait=False)
            self._finisher.shutdown(wait=False)

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
                "seen_at": time.time(), "gpu": getattr(self, "gpu", None), "gpus": self.gpus,
                "capability": self.capability.to_json() if self.capability else None}  # fmt: skip
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

        if msg.metadata.consumer in (CONSUMER, HIGH_CONSUMER) and await self._reroute(msg, record):
            return

        def claim(r: JobRecord) -> JobRecord | None:
            if r.terminal or r.attempt >= attempt:
                return None
            lost = r.last_reason
            if r.attempt and r.state in (JobState.LEASED, JobState.RUNNING):
                lost = f"attempt {r.attempt} on worker {r.worker} stopped renewing its lease (the worker died?)"
            return r.touch(state=JobState.LEASED, attempt=attempt, worker=self.name, progress=None, last_reason=lost,
                           waiting=None)  # fmt: skip

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

    async def _reroute(self, msg, record: JobRecord) -> bool:
        """A job from the generic subject (queued before any worker registered) that this
        worker cannot run moves to its class: a new message, deduplicated by id, then the
        old one acked. True when the job is no longer this worker's to run."""
        cap = self.capability
        wanted = record.params.get("models")
        if wanted is not None and wanted != cap.models:
            await msg.nak(delay=2.0)  # for another model set; the API refuses such jobs once any worker registered
            return True
        from wanrender.runtime.memory import Workload

        req = build_request(JobParams(**record.params), Path("input.png"), Path("result.mp4"))
        tier, why = job_tier(Workload.of(req), cap.weights)
        if tier is None:
            await self._fail(record.id, record.attempt, why, any_attempt=True)
            await msg.term()
            return True
        if tier <= cap.tier:
            return False
        route = route_name(cap.models, tier)
        await ensure_class_consumer(self.js, route, self.queue)
        subject = subject_of(route, record.params.get("priority"))
        await self.js.publish(subject, record.id.encode(), headers={"Nats-Msg-Id": f"{record.id}.{route}"})
        await self.store.update(record.id, lambda r: None if r.terminal else r.touch(route=route))
        await msg.ack()
        log.info("job %s: needs tier %d GiB, this worker has %d: moved to class %s", record.id, tier, cap.tier, route)
        return True

    async def _render(self, msg, record: JobRecord, attempt: int, stop: asyncio.Event) -> None:
        keeper = asyncio.create_task(self._keep_lease(msg))
        finish = None
        try:
            finish = await self._attempt(msg, record, attempt, stop)
        finally:
            if finish is None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
        if finish is None:
            return

        finish, encoder = finish

        async def finishing(previous: asyncio.Task | None) -> None:
            try:
                if previous is not None:  # one publish at a time, in job order
                    await asyncio.gather(previous, return_exceptions=True)
                await finish
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

        def settled(_: asyncio.Task) -> None:
            # However the task ended (even cancelled before its first step, when its own
            # finally never runs): a video nobody finished leaves no encoder thread behind.
            finish.close()  # a coroutine never started: closed, not "never awaited"
            _abort(encoder)  # nothing once the finish closed it
            keeper.cancel()

        task = asyncio.create_task(finishing(self._finishing))
        task.add_done_callback(settled)
        self._finishing = task
        if not self.overlap:
            await asyncio.gather(task, return_exceptions=True)

    async def _attempt(self, msg, record: JobRecord, attempt: int, stop: asyncio.Event):
        """Render the attempt; returns the coroutine that encodes, uploads, publishes and
        acks it (run while the next job renders) with the render's open encoder (or None),
        or None when the attempt ended here."""
        job_id = record.id
        folder = self.storage.attempt_folder(job_id, attempt, self.scratch)
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
            image = await asyncio.to_thread(self._input, job_id, record, folder)
            req = self._with_profile(job_id, build_request(JobParams(**record.params), image, folder / VIDEO))
            # The frames alone on the render thread; the MP4 is encoded on the finishing thread
            # (interpolation runs on the render's device, so it stays on the render thread).
            split = self.overlap and req.output.interpolate == "off"
            running = self._pool.submit(self._render_frames, req, progress, not split)
            try:
                done = await asyncio.wrap_future(running)
            except asyncio.CancelledError:
                running.add_done_callback(_abort_rendered)  # the render ends on its thread: its encoder goes then
                raise
        except BaseException as e:  # noqa: BLE001 - sorted by _settle; anything else goes on up
            await self._settle(msg, job_id, attempt, folder, e)
            return None
        encoder = done[1].encoder if split else None
        try:
            await self.store.update(job_id, lambda r: None if r.attempt != attempt or r.terminal else r.touch(
                rendered_at=time.time()))  # fmt: skip
        except BaseException:
            _abort(encoder)
            raise
        return self._finish(msg, job_id, attempt, folder, done if split else None), encoder

    def _with_profile(self, job_id: str, req):
        """The job's request with this worker's profile applied (its bucket by the job's size),
        as ``generate`` applies it; the sidecar records the knobs and the profile."""
        if self.profile is None:
            return req
        req, line = apply_resolved(req, self.profile, self.device, set(), strict=False)
        log.info("job %s: %s", job_id, line)
        return req

    def _input(self, job_id: str, record: JobRecord, folder: Path) -> Path:
        """The uploaded image as a local file (downloaded by key from S3)."""
        key = input_key(job_id, record.request)
        if not self.storage.exists(key):
            raise WanrenderError("the job's uploaded image is missing from the server's storage — submit it again")
        if isinstance(self.storage, LocalStorage):
            return self.storage.path(key)
        return self.storage.get_file(key, folder.parent / Path(key).name)

    def _render_frames(self, req, progress, write: bool):
        """On the render thread: the render, and with ``write`` off the sidecar's document
        (it reads the engine, which the next job may reconfigure) without the encode's time."""
        from wanrender.runner import sidecar

        runner = self.runner
        if write:
            return runner.render(req, self.files, progress=progress)
        runner._hash_in_background(self.files)  # the sidecar's checksums, once per file set, off the path
        # The encoder takes the frames as they are decoded (as in ``generate``); only its end
        # waits on the finishing thread, while the next job starts on the GPU.
        result = runner.render(req, self.files, progress=progress, write=False, encode=True)
        try:
            # Made before the encoder ends (on the finishing thread): no tail to report.
            doc = sidecar(req, runner.engine, result, result.meta.get("memory_record"), runner._hashes,
                          runner._parallel_record(), tail=False)  # fmt: skip
        except BaseException:
            if result.encoder is not None:
                result.encoder.abort()
            raise
        return req, result, doc

    async def _finish(self, msg, job_id: str, attempt: int, folder: Path, rendered) -> None:
        try:
            if rendered is not None:
                await asyncio.get_running_loop().run_in_executor(self._finisher, _encode, *rendered)
            await asyncio.to_thread(self.storage.upload_attempt, job_id, attempt, folder)
        except BaseException as e:  # noqa: BLE001 - sorted by _settle
            await self._settle(msg, job_id, attempt, folder, e)
            return
        if not isinstance(self.storage, LocalStorage):
            shutil.rmtree(folder.parent, ignore_errors=True)  # the scratch copy (input and outputs)
        if await publish_result(self.store, self.storage, job_id, attempt) is not None:
            self.jobs_done += 1
            await msg.ack()
            await self.beat()  # the count is current once the job is (the next job's beat came before)
        else:
            got = await self.store.get(job_id)
            if got is not None and got[0].cancel_requested and got[0].attempt == attempt:
                await self.store.update(job_id, lambda r: None if r.terminal else r.touch(
                    state=JobState.CANCELED, finished_at=time.time()))  # fmt: skip
                await msg.ack()

    async def _settle(self, msg, job_id: str, attempt: int, folder: Path, e: BaseException) -> None:
        """An attempt that ended without a result: its files go, the job goes on as the error says."""
        await asyncio.to_thread(self.storage.delete, attempt_prefix(job_id, attempt))
        shutil.rmtree(folder if isinstance(self.storage, LocalStorage) else folder.parent, ignore_errors=True)
        if isinstance(e, Stop):
            if e.why == "canceled":
                await self.store.update(job_id, lambda r: None if r.terminal or r.attempt != attempt else r.touch(
                    state=JobState.CANCELED, finished_at=time.time()))  # fmt: skip
                await msg.ack()
            elif e.why == "shutdown":
                await msg.nak()  # another worker takes it now instead of after AckWait
            # superseded: a newer attempt holds the job; this delivery is neither acked nor retried
            return
        if isinstance(e, PlanRefused):  # routed here, but this card has less free now: another may run it
            reason = f"worker {self.name}: {e}"
            await self.store.update(job_id, lambda r: None if r.attempt != attempt or r.terminal else r.touch(
                state=JobState.QUEUED, last_reason=reason, worker=None))  # fmt: skip
            if attempt >= self.max_deliver:
                await self._fail(job_id, attempt, str(e))
                await msg.term()
            else:
                await msg.nak(delay=2.0)
            return
        if isinstance(e, WanrenderError):
            await self._fail(job_id, attempt, str(e))
            await msg.term()
            return
        if not isinstance(e, Exception):
            raise e  # KeyboardInterrupt, SystemExit, CancelledError
        reason = f"internal error on worker {self.name} ({type(e).__name__}: {e})"
        log.error("job %s attempt %d: %s", job_id, attempt, reason, exc_info=e)
        if attempt >= self.max_deliver:
            await self._fail(job_id, attempt, f"failed after {attempt} attempt(s): {reason}")
            await msg.term()
        else:
            await self.store.update(job_id, lambda r: None if r.attempt != attempt or r.terminal else r.touch(
                state=JobState.QUEUED, last_reason=reason, worker=None))  # fmt: skip
            await msg.nak(delay=1.0)

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

    async def _fail(self, job_id: str, attempt: int, message: str, any_attempt: bool = False) -> None:
        await self.store.update(job_id, lambda r: None if (r.attempt != attempt and not any_attempt) or r.terminal
                                else r.touch(state=JobState.FAILED, error=message, finished_at=time.time()))  # fmt: skip


def _abort(encoder) -> None:
    """Stop an encoder nobody will finish, on a thread of its own: ``abort`` waits for the
    chunk being encoded, and the event loop must not."""
    if encoder is not None and encoder.running:
        threading.Thread(target=encoder.abort, name="wanrender-encode-abort", daemon=True).start()


def _abort_rendered(running) -> None:
    """A render whose awaiting was cancelled: the encoder it hands back when it ends."""
    if running.cancelled() or running.exception() is not None:
        return
    got = running.result()
    if isinstance(got, tuple):  # (request, result, sidecar document): a render that kept its encoder
        _abort(got[1].encoder)


def _encode(req, result, doc: dict) -> None:
    """On the finishing thread: the MP4 and the sidecar (with the encode's time in it)."""
    from wanrender.outputs import write_outputs

    def finished_doc() -> dict:
        return {**doc, "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
                "render_s": round(result.render_seconds(), 3)}  # fmt: skip

    result.video, result.sidecar = write_outputs(req, result.frames, result.frames, result.timings, finished_doc,
                                                 stream=result.encoder)  # fmt: skip
