"""GET /metrics in the Prometheus text format (prometheus_client, one registry per app).

- ``wanrender_jobs{state}``: jobs in each state (monitor.JobsMonitor's counts);
- ``wanrender_queue_depth{priority}``: jobs waiting for a worker (the pending counts of
  every consumer of that priority: the generic one and each routing class's);
- ``wanrender_job_duration_seconds{outcome}``: render time (start to end) of each job
  that ended while this API ran;
- ``wanrender_workers``, ``wanrender_workers_warm``, ``wanrender_workers_busy``: live workers (heartbeats);
- ``wanrender_refused_total{status}``: requests refused by the key checks (401, 429).

Gauges are filled at scrape time from JetStream, so several API processes report the
same numbers; the histogram and the counter are this process's.
"""

from __future__ import annotations

from wanrender.service.broker import STREAM
from wanrender.service.jobs import JobRecord, JobState
from wanrender.service.routing import parse_consumer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.jobs = Gauge("wanrender_jobs", "Jobs by state.", ["state"], registry=r)
        self.queue = Gauge("wanrender_queue_depth", "Jobs waiting for a worker, by priority.", ["priority"], registry=r)
        self.duration = Histogram("wanrender_job_duration_seconds", "Render time of finished jobs (start to end).",
                                  ["outcome"], buckets=BUCKETS, registry=r)  # fmt: skip
        self.workers = Gauge("wanrender_workers", "Live workers (fresh heartbeat).", registry=r)
        self.warm = Gauge("wanrender_workers_warm", "Live workers with their models loaded.", registry=r)
        self.busy = Gauge("wanrender_workers_busy", "Live workers rendering a job.", registry=r)
        self.refused = Counter("wanrender_refused", "Requests refused by the API key checks.", ["status"], registry=r)

    def finished(self, record: JobRecord) -> None:
        """monitor.JobsMonitor.on_finished: a job reached a terminal state."""
        if record.finished_at is None or record.state is JobState.EXPIRED:
            return
        start = record.started_at or record.created_at
        self.duration.labels(record.state.value).observe(max(0.0, record.finished_at - start))

    async def render(self, js, counts: dict[str, int], workers: list[dict]) -> bytes:
        from prometheus_client import generate_latest

        for state, n in counts.items():
            self.jobs.labels(state).set(n)
        try:
            infos = await js.consumers_info(STREAM)
        except Exception:  # noqa: BLE001 - NATS reconnecting: this scrape leaves the last values
            infos = None
        if infos is not None:
            depth = {"high": 0, "normal": 0}
            for info in infos:
                parsed = parse_consumer(info.name)
                if parsed is not None:
                    depth[parsed[2]] += info.num_pending
            for priority, n in depth.items():
                self.queue.labels(priority).set(n)
        self.workers.set(len(workers))
        self.warm.set(sum(1 for w in workers if w.get("warm")))
        self.busy.set(sum(1 for w in workers if w.get("job")))
        return generate_latest(self.registry)
