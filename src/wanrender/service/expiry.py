"""Result expiry: a job's files are kept for ``keep`` seconds after it ends, then deleted
(files or objects) and a succeeded job becomes ``expired`` (GET shows it, /result says
410 Gone). A sweep in the API process does it every ``every`` seconds."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from wanrender.errors import WanrenderError
from wanrender.service.broker import kv_keys
from wanrender.service.jobs import JOB_ID, JobRecord, JobState, JobStore
from wanrender.service.storage import job_prefix

log = logging.getLogger(__name__)
DEFAULT_KEEP = "7d"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_keep(text: str) -> float:
    """'7d', '12h', '30m', '45s' (or plain seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text).lower())
    seconds = float(m.group(1)) * UNITS[m.group(2) or "s"] if m else 0.0
    if not m or not 1 <= seconds <= 10 * 365 * 86400:
        raise WanrenderError(f"--keep {text!r} is invalid — use a duration like 7d, 12h, 30m or 90s (1 s .. 10 years)")
    return seconds


def shown(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


async def sweep_once(store: JobStore, storage, keep_s: float, now: float | None = None,
                     swept: set | None = None) -> list[str]:  # fmt: skip
    """Expire what ended more than ``keep_s`` ago; returns the ids of the jobs expired.
    ``swept``: ids already done by this process (a failed or canceled job keeps its state)."""
    now = time.time() if now is None else now
    names = await kv_keys(store.kv)  # no consumer per sweep (broker.kv_values says why)
    expired = []
    swept = set() if swept is None else swept
    for job_id in names:
        if not JOB_ID.match(job_id) or job_id in swept:
            continue
        got = await store.get(job_id)
        if got is None:
            continue
        record = got[0]
        if not record.terminal or record.state is JobState.EXPIRED or record.finished_at is None:
            continue
        if record.finished_at + keep_s > now:
            continue

        # The record first: a reader never sees 'succeeded' with its files gone.
        def expire(r: JobRecord) -> JobRecord | None:
            if r.state is not JobState.SUCCEEDED:
                return None  # failed and canceled keep their state; only their files go
            return r.touch(state=JobState.EXPIRED, result=None)

        new = await store.update(job_id, expire)
        await asyncio.to_thread(storage.delete, job_prefix(job_id))
        swept.add(job_id)
        if new is not None and new.state is JobState.EXPIRED and record.state is JobState.SUCCEEDED:
            expired.append(job_id)
    if expired:
        log.info("expired %d job(s) older than %s", len(expired), shown(keep_s))
    return expired


async def run_sweeper(store: JobStore, storage, keep_s: float, stop: asyncio.Event | None = None,
                      every: float | None = None) -> None:  # fmt: skip
    every = every if every is not None else max(1.0, min(keep_s / 4, 300.0))
    swept: set = set()
    while stop is None or not stop.is_set():
        try:
            await sweep_once(store, storage, keep_s, swept=swept)
        except Exception as e:  # noqa: BLE001 - NATS reconnecting: the next sweep catches up
            log.warning("expiry sweep failed: %s", e)
        await asyncio.sleep(every)
