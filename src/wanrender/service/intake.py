"""Submissions: the upload checked (bytes, pixels, content), the parameters checked by
the CLI's rules, then the job recorded in KV and queued, both keyed by the job id (an
Idempotency-Key retry finds the same record, and JetStream drops the duplicate message)."""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.service.jobs import JobParams, JobRecord, JobState, JobStore, build_request, new_job_id
from wanrender.service.routing import subject_of
from wanrender.service.storage import as_storage, job_prefix

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_params_bytes: int = 64 * 1024


class Refused(WanrenderError):
    """A submission refused before anything is stored; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_image(data: bytes, limits: Limits) -> str:
    """The upload's file suffix, from its content (never from its name or content type);
    the pixel count is read from the header and refused before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Refused(400, "image: the upload is empty — send a PNG, JPEG or WebP file")
    if len(data) > limits.max_bytes:
        raise Refused(413, f"image: {len(data)} bytes is over the limit of {limits.max_bytes} — send a smaller file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))
            with img:
                w, h = img.size
                if w * h > limits.max_pixels:
                    raise Refused(413, f"image: {w}x{h} is over the limit of {limits.max_pixels // 1_000_000} MP "
                                       "— resize it (the render size is far smaller)")  # fmt: skip
                if min(w, h) < 16:
                    raise Refused(422, f"image: {w}x{h} is too small — use an image at least 16x16")
                img.load()
                return FORMATS[img.format]
    except Refused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refused(413, f"image: too many pixels to decode safely (over {limits.max_pixels // 1_000_000} MP) "
                           "— resize it") from None  # fmt: skip
    except UnidentifiedImageError:
        raise Refused(415, "image: not a PNG, JPEG or WebP image — send one of those") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Refused(415, f"image: the file is damaged or truncated ({e}) — re-export it") from None


def check_params(text: str | bytes, limits: Limits) -> JobParams:
    from pydantic import ValidationError

    if len(text) > limits.max_params_bytes:
        raise Refused(413, f"params: over {limits.max_params_bytes} bytes — send only the render options")
    try:
        params = JobParams.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        extra = " — allowed: " + ", ".join(JobParams.model_fields) if first["type"] == "extra_forbidden" else ""
        raise Refused(422, f"params: {where}: {first['msg']}{extra}") from None
    # The same checks and messages as the CLI (field names instead of flags), on stand-in paths.
    try:
        build_request(params, Path("input.png"), Path("result.mp4"))
    except WanrenderError as e:
        raise Refused(422, str(e)) from None
    return params


async def submit(js, store: JobStore, data, params: JobParams, image: bytes, suffix: str,
                 idempotency_key: str | None, owner: str | None = None, route=None) -> tuple[JobRecord, bool]:  # fmt: skip
    """(the job, whether this call created it). An Idempotency-Key is scoped to the
    ``owner`` (the API key's name): two clients never share a job by choosing the same key.
    ``data``: the data folder or a storage (storage.py); ``route``: routing.Route (None: generic)."""
    if owner is not None and idempotency_key is not None:
        idempotency_key = f"{owner}\0{idempotency_key}"
    job_id = new_job_id(idempotency_key)
    got = await store.get(job_id)
    if got is not None:
        record = got[0]
        if record.state is JobState.QUEUED and record.seq is None:  # created, then not queued (crash): queue it now
            record = await _queue(js, store, record)
        return record, False
    storage = as_storage(data)  # a data folder (local disk) or an S3 bucket
    name = f"input{suffix}"
    await asyncio.to_thread(storage.put_bytes, job_prefix(job_id) + name, image)
    req = build_request(params, Path(name), Path("result.mp4"))
    now = time.time()
    record = JobRecord(id=job_id, params=params.model_dump(exclude_none=True), request=req.to_json(),
                       created_at=now, updated_at=now, owner=owner, route=route and route.route,
                       waiting=route and route.waiting)  # fmt: skip
    if not await store.create(record):  # a concurrent retry with the same key won
        return (await store.get(job_id))[0], False
    return await _queue(js, store, record), True


async def _queue(js, store: JobStore, record: JobRecord) -> JobRecord:
    try:
        subject = subject_of(record.route, record.params.get("priority"))
        ack = await js.publish(subject, record.id.encode(), headers={"Nats-Msg-Id": record.id})
    except Exception as e:  # noqa: BLE001 - the record says why; a retry with the same key queues it
        raise Refused(503, f"the job could not be queued ({type(e).__name__}) — retry with the same Idempotency-Key")
    new = await store.update(record.id, lambda r: r.touch(seq=ack.seq) if r.seq is None else None)
    return new or record
