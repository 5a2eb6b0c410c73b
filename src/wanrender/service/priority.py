"""Two priorities, held by JetStream: a job's message goes to the subject of its
priority, each subject has its own durable consumer in the one jobs stream, and a
free worker pulls from the high consumer first.

Nothing is reordered by us: each consumer hands out its own subject in publish
order, with the same leases and MaxDeliver. A worker that is idle waits on the
normal consumer for up to a second, so a high job that arrives in that second waits
at most that long; a busy worker asks the high consumer first when it is free.
"""

from __future__ import annotations

from wanrender.service.broker import CONSUMER, HIGH_CONSUMER, HIGH_SUBJECT, STREAM, SUBJECT
from wanrender.service.jobs import JobRecord, JobState

PRIORITIES = ("high", "normal")


def subject_for(priority: str | None) -> str:
    return HIGH_SUBJECT if priority == "high" else SUBJECT


def consumer_for(priority: str | None) -> str:
    return HIGH_CONSUMER if priority == "high" else CONSUMER


class Puller:
    """A worker's two pull subscriptions, high first."""

    def __init__(self, js) -> None:
        self.js = js

    async def bind(self) -> Puller:
        self.high = await self.js.pull_subscribe_bind(durable=HIGH_CONSUMER, stream=STREAM)
        self.normal = await self.js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        return self

    async def next(self, wait: float = 1.0) -> list:
        """At most one message: a high one if any is waiting, else a normal one within ``wait`` seconds."""
        import nats.errors

        try:
            pending = (await self.js.consumer_info(STREAM, HIGH_CONSUMER)).num_pending
        except Exception:  # noqa: BLE001 - NATS reconnecting: ask again on the next round
            pending = 0
        sub = self.high if pending else self.normal
        try:
            return await sub.fetch(1, timeout=wait)
        except nats.errors.TimeoutError:
            return []


async def queue_ahead(js, record: JobRecord) -> int | None:
    """Queued jobs a worker takes before this one: for a high job, the high ones published
    before it; for a normal one, also every high job waiting. From the consumers' counts
    (two consumer-info calls, no scan); jobs canceled while queued count until dropped."""
    if record.state is not JobState.QUEUED or record.seq is None:
        return None
    high = (record.params or {}).get("priority") == "high"
    try:
        mine = await js.consumer_info(STREAM, consumer_for("high" if high else "normal"))
        other = None if high else await js.consumer_info(STREAM, HIGH_CONSUMER)
    except Exception:  # noqa: BLE001 - the position is a convenience
        return None
    before = max(0, min(record.seq - mine.delivered.stream_seq - 1, mine.num_pending - 1))
    return before + (other.num_pending if other is not None else 0)
