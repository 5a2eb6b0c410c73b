"""What the API process knows about all jobs, from one KV watch of the jobs bucket.

It feeds three things that would otherwise each scan the bucket: each API key's
unfinished jobs (the concurrency limit; rebuilt from the bucket when the API
restarts), the job counts by state and the duration histogram of /metrics, and the
CPU time calibration of the ETA (seconds per unit of work of finished jobs).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from wanrender.service.jobs import TERMINAL, JobRecord, JobState

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Seconds per unit of work (eta.work_units) of the jobs finished here, a moving average."""

    seconds_per_unit: float | None = None
    samples: int = 0

    def add(self, seconds: float, units: float) -> None:
        if seconds <= 0 or units <= 0:
            return
        rate = seconds / units
        self.samples += 1
        weight = max(0.2, 1.0 / self.samples)  # the first jobs set it; later ones move it
        self.seconds_per_unit = rate if self.seconds_per_unit is None else (
            (1 - weight) * self.seconds_per_unit + weight * rate)  # fmt: skip


@dataclass
class JobsMonitor:
    states: dict[str, JobState] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # unfinished job -> API key name
    calibration: Calibration = field(default_factory=Calibration)
    on_finished: list = field(default_factory=list)  # callbacks(record) when a job turns terminal
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, record: JobRecord) -> None:
        """Apply one version of a record (from the watch, or from the API right after it queued the job)."""
        from wanrender.service.eta import work_units

        before = self.states.get(record.id)
        self.states[record.id] = record.state
        if record.state is JobState.SUCCEEDED and before is not JobState.SUCCEEDED:
            if record.started_at and record.finished_at:  # also jobs that finished before a restart
                self.calibration.add(record.finished_at - record.started_at, work_units(record.request))
        if record.state in TERMINAL:
            self.owners.pop(record.id, None)
            if before is not None and before not in TERMINAL:
                for cb in self.on_finished:
                    cb(record)
        elif record.owner:
            self.owners[record.id] = record.owner

    def forget(self, job_id: str) -> None:
        self.states.pop(job_id, None)
        self.owners.pop(job_id, None)

    def unfinished(self, owner: str) -> int:
        return sum(1 for o in self.owners.values() if o == owner)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobState}
        for s in self.states.values():
            out[s.value] += 1
        return out

    async def run(self, kv, stop: asyncio.Event) -> None:
        """Follow the bucket until ``stop``: first every current record, then each change."""
        watcher = await kv.watchall()
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except Exception as e:  # noqa: BLE001 - nats' TimeoutError: nothing changed this second
                    if type(e).__name__ != "TimeoutError":
                        raise
                    continue
                if entry is None:  # the current records have all arrived
                    self.ready.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.forget(entry.key)
                    continue
                try:
                    self.note(JobRecord.model_validate_json(entry.value))
                except ValueError as e:
                    log.warning("job record %s not understood: %s", entry.key, e)
        finally:
            await watcher.stop()
