"""Job records (kept in the JetStream KV bucket), the parameters a client may send,
and where a job's files live.

Parameters are the render fields by their spec names (``frames``, ``lora_strength_high``)
and are checked by ``request.from_preset``: the same rules and messages as the CLI. No
request value ever names a file: the server puts every job's files under
``DATA/jobs/<job id>/``, and job ids are its own.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict

from wanrender.spec import RenderRequest

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
VIDEO, SIDECAR = "result.mp4", "result.json"


class JobState(str, Enum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})


class JobParams(BaseModel):
    """What a client may set: the generate options by field name (the preset fills the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    preset: str = "turbo"
    models: Optional[str] = None  # a model set id (GET /v1/workers): only workers holding those files take it
    negative: Optional[str] = None
    frames: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    switch: Optional[int] = None
    boundary: Optional[float] = None
    cfg: Optional[float] = None
    shift_high: Optional[float] = None
    shift_low: Optional[float] = None
    sampler: Optional[str] = None
    seed: int = 0
    fit: str = "crop"
    fps: Optional[int] = None
    crf: int = 18
    x264_preset: Optional[str] = None  # None: spec.X264_PRESET
    interpolate: str = "off"
    lora_strength_high: Optional[float] = None
    lora_strength_low: Optional[float] = None
    priority: Literal["high", "normal"] = "normal"  # priority.py: high jobs are handed out first


class JobProgress(BaseModel):
    stage: str
    step: Optional[int] = None
    steps: Optional[int] = None
    detail: str = ""


class JobRecord(BaseModel):
    id: str
    state: JobState = JobState.QUEUED
    attempt: int = 0  # JetStream's delivery count of the attempt that holds (or held) the job
    worker: Optional[str] = None
    progress: Optional[JobProgress] = None
    params: dict
    request: dict  # RenderRequest.to_json() of the checked request
    created_at: float
    updated_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    result: Optional[dict] = None  # {"video": name, "sidecar": name} under the job's result folder
    error: Optional[str] = None
    last_reason: Optional[str] = None  # why the previous attempt ended (a retry carries it)
    cancel_requested: bool = False
    seq: Optional[int] = None  # the job message's stream sequence (queue position)
    owner: Optional[str] = None  # the API key's name that submitted it (auth.py); None on an open service
    route: Optional[str] = None  # "<model set>.t<tier>": the class of workers that may take it (routing.py)
    waiting: Optional[str] = None  # why a queued job is not taken yet ("no capable worker online")
    rendered_at: Optional[float] = None  # frames done; encode and publish then overlap the next job

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def touch(self, **changes) -> JobRecord:
        return self.model_copy(update={**changes, "updated_at": time.time()})


def new_job_id(idempotency_key: str | None) -> str:
    """A retry with the same Idempotency-Key maps to the same job id (and so to the same
    KV record and the same deduplicated message)."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return hashlib.sha256(b"wanrender-idempotency\0" + idempotency_key.encode("utf-8", "surrogatepass")).hexdigest()[
        :32
    ]


def build_request(params: JobParams, image: Path, out: Path) -> RenderRequest:
    """The checked request (``SpecError`` names the field, as the CLI's checks do)."""
    from wanrender.request import from_preset

    fields = params.model_dump(exclude={"prompt", "preset", "priority", "models"})
    return from_preset(params.preset, image, params.prompt, out=out, **fields)


class JobPaths:
    """A job's files: the upload, one folder per attempt, and the published result."""

    def __init__(self, data: Path, job_id: str) -> None:
        if not JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        self.root = Path(data) / "jobs" / job_id

    def image(self, suffix: str) -> Path:
        return self.root / f"input{suffix}"

    def find_image(self) -> Path | None:
        return next(iter(sorted(self.root.glob("input.*"))), None)

    def attempt(self, n: int) -> Path:
        return self.root / f"attempt-{n}"

    @property
    def result(self) -> Path:
        return self.root / "result"


class JobStore:
    """Job records in the KV bucket; updates compare the revision they read (another
    writer in between makes them read again)."""

    def __init__(self, kv) -> None:
        self.kv = kv

    async def get(self, job_id: str) -> tuple[JobRecord, int] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return JobRecord.model_validate_json(entry.value), entry.revision

    async def create(self, record: JobRecord) -> bool:
        """False when a record with that id exists already (an idempotent retry)."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self.kv.create(record.id, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Apply ``change`` to the current record (None from it: leave it); returns the record now stored."""
        from nats.js.errors import KeyWrongLastSequenceError

        for _ in range(50):
            got = await self.get(job_id)
            if got is None:
                return None
            record, rev = got
            new = change(record)
            if new is None:
                return record
            try:
                await self.kv.update(job_id, new.model_dump_json().encode(), last=rev)
                return new
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"job {job_id}: the record kept changing under 50 updates")
