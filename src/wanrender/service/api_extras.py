"""The API's key checks, /metrics and ETA, attached to the app of api.create_app.

Every /v1 request passes the ``Gate`` (auth.py) in a middleware that runs before the
upload checks, so a request without a valid key is refused before its body is read.
The caller's key is kept in a context variable for the endpoints: a job is visible
only to the key that submitted it (404 to others, as if it did not exist), and a
submission is admitted only under the key's concurrency and rate limits.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from wanrender.service.auth import ApiKey, Gate, Limited
from wanrender.service.broker import kv_values
from wanrender.service.eta import eta_seconds
from wanrender.service.jobs import JobRecord
from wanrender.service.metrics import CONTENT_TYPE, Metrics
from wanrender.service.monitor import JobsMonitor
from wanrender.service.priority import queue_ahead

DRAIN_BYTES = 32 << 20  # above the upload limit (20 MB): bigger bodies are cut off, as the 413 check does
CALLER: ContextVar[ApiKey | None] = ContextVar("wanrender_api_key", default=None)


async def start(state: dict) -> None:
    """At the app's start, once NATS is connected: the jobs monitor (its first pass over
    the bucket restores each key's unfinished jobs) and the metrics."""
    metrics, monitor = Metrics(), JobsMonitor()
    monitor.on_finished.append(metrics.finished)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(state["jobs_kv"], stop), name="jobs-monitor")
    state.update(metrics=metrics, monitor=monitor, monitor_stop=stop, monitor_task=task)
    waiter = asyncio.create_task(monitor.ready.wait())
    await asyncio.wait([waiter, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # the watch failed: raise it at startup, not later


async def stop(state: dict) -> None:
    if "monitor_stop" in state:
        state["monitor_stop"].set()
        await asyncio.gather(state["monitor_task"], return_exceptions=True)


async def live_workers(kv) -> list[dict]:
    """The workers' heartbeat records (each expires with the bucket's TTL)."""
    return await kv_values(kv)


def visible(record: JobRecord) -> bool:
    caller = CALLER.get()
    return caller is None or record.owner == caller.name


async def admit(state: dict, gate: Gate | None, idempotency_key: str | None = None) -> ApiKey | None:
    """The caller's key after its concurrency and rate checks (``Limited`` 429 otherwise);
    a retry of a job the key already submitted (same Idempotency-Key) is not a new job."""
    from wanrender.service.jobs import new_job_id

    key = CALLER.get()
    if gate is None or key is None:
        return None
    if idempotency_key is not None and await state["store"].get(new_job_id(f"{key.name}\0{idempotency_key}")):
        return key
    gate.admit(key, state["monitor"].unfinished(key.name))
    gate.take(key)
    return key


async def extras(state: dict, record: JobRecord) -> dict:
    """``queue_position`` (priority-aware) and ``eta_s`` for a job view."""
    ahead = await queue_ahead(state["js"], record)
    workers = [] if record.terminal else await live_workers(state["workers_kv"])
    cal = state["monitor"].calibration.seconds_per_unit if "monitor" in state else None
    return {"queue_position": ahead, "eta_s": eta_seconds(record, ahead, workers, cal)}


async def _drain(request, cap: int = DRAIN_BYTES) -> None:
    """Read (and drop) a refused request's body when it is small enough: a client still
    sending its upload would otherwise see a broken pipe instead of the 401."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and 0 < int(length) <= cap:
        async for _ in request.stream():
            pass


def install(app, state: dict, gate: Gate | None) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    def refused(exc: Limited) -> JSONResponse:
        if "metrics" in state:
            state["metrics"].refused.labels(str(exc.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(Limited)
    async def _limited(request, exc: Limited):
        return refused(exc)

    @app.middleware("http")
    async def api_keys(request: Request, call_next):
        if gate is None or not request.url.path.startswith("/v1"):
            return await call_next(request)
        try:
            key = gate.check(request.headers.get("authorization"))
        except Limited as exc:
            await _drain(request)
            return refused(exc)
        token = CALLER.set(key)
        try:
            return await call_next(request)
        finally:
            CALLER.reset(token)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        body = await state["metrics"].render(state["js"], state["monitor"].counts(),
                                             await live_workers(state["workers_kv"]))  # fmt: skip
        return Response(body, media_type=CONTENT_TYPE)
