"""The HTTP API (/v1), a FastAPI app over the JetStream state.

Every error is JSON ``{"error": "<one line>"}`` with a 4xx/5xx status. The app owns
one NATS connection, opened at startup (``create_app(nats_url, data)``).
"""

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

# Imported at the top, not lazily: FastAPI reads the endpoints' annotations from this
# module's globals. Nothing imports this module until a server starts.
from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException

from wanrender.service import api_extras
from wanrender.service.auth import Gate
from wanrender.service.broker import QueueConfig, connect, ensure_jetstream
from wanrender.service.expiry import run_sweeper, shown
from wanrender.service.intake import Limits, Refused, check_image, check_params, submit
from wanrender.service.jobs import JOB_ID, JobRecord, JobState, JobStore, build_request
from wanrender.service.routing import (
    NO_WORKER,
    NoWorkerCould,
    can_take,
    caps_bucket,
    ensure_class_consumer,
    online,
    route_job,
)
from wanrender.service.storage import LocalStorage, as_storage, result_key

UPLOAD_PATH = "/v1/jobs"


def job_view(record: JobRecord, position: int | None = None) -> dict:
    view = record.model_dump(mode="json")
    view["queue_position"] = position
    if record.state is JobState.SUCCEEDED:
        view["links"] = {"result": f"/v1/jobs/{record.id}/result", "sidecar": f"/v1/jobs/{record.id}/sidecar"}
    return view


def create_app(nats_url: str, data, limits: Limits = Limits(), queue: QueueConfig = QueueConfig(),
               gate: Gate | None = None, keep_s: float | None = None, sweep_s: float | None = None):  # fmt: skip
    """``data``: the data folder or a storage (storage.py: local disk or S3); ``gate``: the
    API key checks (auth.py), None runs the API open; ``keep_s``: how long results are kept
    (None: for ever), swept every ``sweep_s``."""
    storage = as_storage(data)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        nc = await connect(nats_url, "wanrender-api")
        js = nc.jetstream()
        jobs_kv, workers_kv = await ensure_jetstream(js, queue)
        store = JobStore(jobs_kv)
        state.update(nc=nc, js=js, store=store, jobs_kv=jobs_kv, workers_kv=workers_kv, caps_kv=await caps_bucket(js))
        sweeper = asyncio.create_task(run_sweeper(store, storage, keep_s, every=sweep_s)) if keep_s else None
        try:
            await api_extras.start(state)
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                await asyncio.gather(sweeper, return_exceptions=True)
            await api_extras.stop(state)
            await nc.close()

    app = FastAPI(title="wanrender", version="1", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Refused)
    async def _refused(request, exc: Refused):
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "header", "path"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.middleware("http")
    async def bounded_uploads(request: Request, call_next):
        # Refused from the header, before the body is read (a multipart parser would spool it).
        if request.method == "POST" and request.url.path == UPLOAD_PATH:
            length = request.headers.get("content-length")
            if length is None:
                return error(411, "send the upload with a Content-Length header")
            if not length.isdigit() or int(length) > limits.max_bytes + limits.max_params_bytes + 16384:
                return error(413, f"the upload is over the limit of {limits.max_bytes} bytes — send a smaller image")
        return await call_next(request)

    async def record_of(job_id: str) -> JobRecord:
        got = await state["store"].get(job_id) if JOB_ID.match(job_id) else None
        if got is None or not api_extras.visible(got[0]):  # another key's job: as if it did not exist
            raise HTTPException(404, f"no job {job_id[:64]!r} — check the id returned by POST /v1/jobs")
        return got[0]

    async def view(record: JobRecord) -> dict:
        if record.state is JobState.QUEUED:  # said now, from the live heartbeats
            try:
                live = await online(state["workers_kv"])
            except Exception:  # noqa: BLE001 - NATS busy or reconnecting: the record's own word stands
                live = None
            if live is not None:
                waiting = None if any(can_take(h, record.route) for h in live) else NO_WORKER
                record = record.model_copy(update={"waiting": waiting})
        return {**job_view(record), **await api_extras.extras(state, record)}

    @app.get("/health")
    async def health():
        nc = state.get("nc")
        ok = bool(nc and nc.is_connected)
        return JSONResponse({"ok": ok, "nats": "connected" if ok else "disconnected"}, status_code=200 if ok else 503)

    @app.post(UPLOAD_PATH, status_code=201)
    async def create_job(image: UploadFile = File(...), params: str = Form(...),
                         idempotency_key: str | None = Header(None)):  # fmt: skip
        parsed = check_params(params, limits)
        blob = await image.read(limits.max_bytes + 1)
        suffix = check_image(blob, limits)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise Refused(400, "Idempotency-Key: use 1..255 characters")
        req = build_request(parsed, Path("input.png"), Path("result.mp4"))
        try:  # before the key's rate is charged: a job no worker could run is not a submission
            route = await route_job(req, parsed.models, state["caps_kv"], state["workers_kv"])
        except NoWorkerCould as e:
            raise Refused(422, str(e)) from None
        # 429 over the key's limits, before anything is stored
        key = await api_extras.admit(state, gate, idempotency_key)
        await ensure_class_consumer(state["js"], route.route, queue)
        record, created = await submit(state["js"], state["store"], storage, parsed, blob, suffix, idempotency_key,
                                       owner=key.name if key else None, route=route)  # fmt: skip
        state["monitor"].note(record)  # counted now, not when the watch catches up
        return JSONResponse(await view(record), status_code=201 if created else 200)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        return await view(await record_of(job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        import time

        await record_of(job_id)

        def cancel(r: JobRecord) -> JobRecord | None:
            if r.terminal or r.cancel_requested:
                return None
            if r.state is JobState.QUEUED:  # no worker holds it: canceled now, dropped when delivered
                return r.touch(state=JobState.CANCELED, cancel_requested=True, finished_at=time.time())
            return r.touch(cancel_requested=True)  # the worker stops at the next step boundary

        return job_view(await state["store"].update(job_id, cancel))

    async def _file(record: JobRecord, what: str, media_type: str):
        if record.state is JobState.EXPIRED:
            kept = f"results are kept for {shown(keep_s)}" if keep_s else "results are kept for a limited time"
            raise HTTPException(410, f"job {record.id} expired: {kept} — submit it again")
        if record.state is not JobState.SUCCEEDED:
            raise HTTPException(409, f"job {record.id} is {record.state.value}, not succeeded — no result to fetch")
        key = result_key(record, what)
        if not await asyncio.to_thread(storage.exists, key):
            raise HTTPException(410, f"job {record.id}: the result file is gone from the server")
        name = f"{record.id}{Path(key).suffix}"
        if isinstance(storage, LocalStorage):
            return FileResponse(storage.path(key), media_type=media_type, filename=name)
        # Streamed through the API, not a redirect to a presigned URL: the bucket may sit on a
        # private network the clients cannot reach, and the API's checks (expiry, auth) stay in force.
        return StreamingResponse(iterate_in_threadpool(storage.stream(key)), media_type=media_type,
                                 headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip

    @app.get("/v1/jobs/{job_id}/result")
    async def result(job_id: str):
        return await _file(await record_of(job_id), "video", "video/mp4")

    @app.get("/v1/jobs/{job_id}/sidecar")
    async def sidecar(job_id: str):
        return await _file(await record_of(job_id), "sidecar", "application/json")

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str):
        await record_of(job_id)
        watcher = await state["jobs_kv"].watch(job_id)

        async def stream():
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=15.0)
                    except Exception as e:  # noqa: BLE001 - nats' TimeoutError: keep the connection alive
                        if type(e).__name__ != "TimeoutError":
                            raise
                        yield ": keep-alive\n\n"
                        continue
                    if entry is None or entry.value is None:
                        continue
                    record = JobRecord.model_validate_json(entry.value)
                    yield f"event: job\ndata: {json.dumps(job_view(record))}\n\n"
                    if record.terminal:
                        return
            finally:
                await watcher.stop()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/workers")
    async def workers():
        return {"workers": await api_extras.live_workers(state["workers_kv"])}

    api_extras.install(app, state, gate)  # outermost middleware: keys are checked before the upload limits
    return app
