"""Two priorities, held by JetStream: a job's message goes to its priority's subject
(``wanrender.jobs.render[.<class>]`` or ``wanrender.jobs.high[.<class>]``, routing.py),
each (class, priority) has its own durable consumer in the one jobs stream, and a free
worker pulls every high consumer it may serve before any normal one.

Nothing is reordered by us: each consumer hands out its own subject in publish
order, with the same leases and MaxDeliver. A worker that is idle waits for the next
publish on any job subject, so a high job is taken by the next free worker.
"""

from __future__ import annotations

from wanrender.service.broker import STREAM
from wanrender.service.jobs import JobRecord, JobState
from wanrender.service.routing import consumer_of

PRIORITIES = ("high", "normal")


async def queue_ahead(js, record: JobRecord) -> int | None:
    """Queued jobs a worker takes before this one, approximately: for a high job, the high
    ones of its class published before it; for a normal one, also every high job waiting in
    its class. From the consumers' counts (two consumer-info calls, no scan). Not counted:
    jobs of other classes that the same workers take first (a higher tier, or high jobs of
    another class), and jobs canceled while queued count until dropped."""
    if record.state is not JobState.QUEUED or record.seq is None:
        return None
    high = (record.params or {}).get("priority") == "high"
    try:
        mine = await js.consumer_info(STREAM, consumer_of(record.route, "high" if high else "normal"))
        other = None if high else await js.consumer_info(STREAM, consumer_of(record.route, "high"))
    except Exception:  # noqa: BLE001 - the position is a convenience
        return None
    before = max(0, min(record.seq - mine.delivered.stream_seq - 1, mine.num_pending - 1))
    return before + (other.num_pending if other is not None else 0)
