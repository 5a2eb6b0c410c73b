"""Routing by capability: which worker may take which job, decided with the planner.

A worker's capability is its model set (an id from the names and sizes of its model
files), its VRAM and the planner's answer for it (``guide``: the most frames that fit
at the usual sizes). VRAM is put on a fixed ladder of tiers (``LADDER_GIB``): a worker
of tier T can run every job that fits a reference card of T GiB (the planner with the
worker's weights, bf16, the default reserve).

JetStream design (docs/architecture.md, "Routing"): a job goes to the class of the
smallest tier whose reference card fits it, on its priority's subject:
``wanrender.jobs.render.<model set>.t<tier>`` (normal) or ``wanrender.jobs.high.<model
set>.t<tier>`` (high). Each (class, priority) has its own durable consumer
(``w-<model set>-t<tier>``, ``wh-<model set>-t<tier>``; a work-queue stream allows one
consumer per subject, so their filters cannot overlap). A worker pulls only from the
classes of its model set at or below its tier: every high class before any normal one,
and within a priority the highest tier first, the generic subject last. A worker never
receives a job its plan refuses, so no delivery (and none of the job's MaxDeliver
attempts) is spent on an incapable worker.

Capabilities are also kept in a KV bucket without TTL (registered workers, online or
not): a job that no registered worker could ever run is refused at submit with the
planner's reason. A job submitted before any worker registered goes to the generic
subject of its priority (``wanrender.jobs.render`` or ``wanrender.jobs.high``), and the
first worker that finds it too big moves it to its class (a new message deduplicated by
id, then the old one acked).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

from wanrender.service.broker import CAPS_KV, CONSUMER, HIGH_CONSUMER, HIGH_SUBJECT, STREAM, SUBJECT, kv_values

LADDER_GIB = (1, 2, 3, 4, 6, 8, 11, 15, 19, 23, 31, 39, 47, 79, 95, 139, 179, 255)
JOB_SUBJECTS = SUBJECT.rpartition(".")[0] + ".>"  # every job subject, both priorities: a worker's wake-up
GUIDE_SIZES = ((832, 480), (1280, 720))
NO_WORKER = "no capable worker online"


def model_set_id(files) -> str:
    """An identity of the model files that is cheap to compute (names and sizes, not a
    hash of 30 GB): two workers with the same files have the same id."""
    parts = sorted(f"{role}={p.name}:{p.stat().st_size}" for role, p in files.as_dict().items() if p is not None)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def tier_of(vram_gib: float | None) -> int:
    """The ladder tier of a card (None: a CPU worker, which has no VRAM limit)."""
    if vram_gib is None:
        return LADDER_GIB[-1]
    fitting = [t for t in LADDER_GIB if t <= vram_gib + 1e-6]
    return fitting[-1] if fitting else 0


def route_name(models: str, tier: int) -> str:
    return f"{models}.t{tier}"


def subject_of(route: str | None, priority: str | None = None) -> str:
    base = HIGH_SUBJECT if priority == "high" else SUBJECT
    return base if route is None else f"{base}.{route}"


def consumer_of(route: str | None, priority: str | None = None) -> str:
    high = priority == "high"
    if route is None:
        return HIGH_CONSUMER if high else CONSUMER
    return ("wh-" if high else "w-") + route.replace(".", "-")


def parse_consumer(name: str) -> tuple[str | None, int, str] | None:
    """(model set, tier, priority) of a job consumer's name; the generic ones have no
    model set and tier -1 (below every class: a worker asks them last)."""
    if name in (CONSUMER, HIGH_CONSUMER):
        return None, -1, "high" if name == HIGH_CONSUMER else "normal"
    prefix, _, rest = name.partition("-")
    if prefix not in ("w", "wh"):
        return None
    models, _, tier = rest.rpartition("-t")
    return (models, int(tier), "high" if prefix == "wh" else "normal") if models and tier.isdigit() else None


@dataclass(frozen=True)
class Capability:
    models: str
    tier: int
    device: str
    gpu: str
    vram_gib: float | None
    weights: dict  # runtime.memory.Weights as a dict: the API plans with it
    model_files: dict = field(default_factory=dict)  # role -> file name
    guide: dict = field(default_factory=dict)  # "WxH" -> most frames that fit (0: none)
    profile: str | None = None  # the GPU profile its jobs render with, e.g. "h200.yaml (NVIDIA H200, measured)"

    @property
    def key(self) -> str:
        return f"{self.models}-t{self.tier}"

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Capability:
        return Capability(**{k: d[k] for k in Capability.__dataclass_fields__ if k in d})


def _weights(d: dict):
    from wanrender.runtime.memory import Weights

    return Weights(**d)


def reference_context(tier: int, weights):
    """The planner's context for a card of ``tier`` GiB (4090-class speed: only the memory matters here)."""
    from wanrender.runtime import gpus
    from wanrender.runtime.planner import DEFAULT_RESERVE_GIB, Context

    spec = replace(gpus.named("rtx4090"), name="a GPU").with_vram(float(tier))
    return Context(spec, weights, "bf16", "off", DEFAULT_RESERVE_GIB, None)


@lru_cache(maxsize=512)
def _job_tier(work, weights_items: tuple, top: int) -> tuple[int | None, str]:
    """(smallest tier <= top whose reference card fits ``work``, or None; the refusal at ``top``)."""
    from wanrender.runtime.planner import decide

    weights = _weights(dict(weights_items))
    ladder = [t for t in LADDER_GIB if t <= top]
    if not ladder:
        return None, f"{work.label()} does not fit: the workers have under {LADDER_GIB[0]} GiB"
    fits = lambda t: decide(reference_context(t, weights), work).chosen is not None  # noqa: E731
    if not fits(ladder[-1]):
        return None, decide(reference_context(ladder[-1], weights), work).refusal().describe()
    lo, hi = 0, len(ladder) - 1  # fit grows with the card: the first tier that fits, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(ladder[mid]):
            hi = mid
        else:
            lo = mid + 1
    return ladder[lo], ""


def job_tier(work, weights: dict, top: int = LADDER_GIB[-1]) -> tuple[int | None, str]:
    return _job_tier(work, tuple(sorted(weights.items())), top)


def capability_of(files, device: str, vram_gib: float | None, profile: str | None = None) -> Capability:
    """This worker's capability: asks the planner what fits its VRAM (``vram_gib`` None
    on a GPU: the card's total memory; on the CPU: no limit); ``profile``: the GPU
    profile's description (``Profile.describe``), shown by GET /v1/workers."""
    from wanrender.request import PRESETS
    from wanrender.runtime import gpus
    from wanrender.runtime.memory import Weights, Workload
    from wanrender.runtime.planner import GUIDE_FRAMES, guide

    gpu = "cpu"
    if vram_gib is None and device.startswith("cuda"):
        spec = gpus.probe(device, measure_copy=False)
        vram_gib, gpu = spec.total_gib, spec.name
    elif vram_gib is not None:
        gpu = f"emulated {vram_gib:g} GiB"
    weights = asdict(Weights.from_files(files, "bf16"))
    tier = tier_of(vram_gib)
    table = {}
    ctx = reference_context(tier, _weights(weights))
    for w, h in GUIDE_SIZES:
        rows = guide(ctx, Workload(81, w, h, PRESETS["turbo"].sampling), GUIDE_FRAMES)
        table[f"{w}x{h}"] = max([r["frames"] for r in rows if r["fits"]], default=0)
    names = {role: p.name for role, p in files.as_dict().items() if p is not None}
    return Capability(model_set_id(files), tier, device, gpu, vram_gib, weights, names, table, profile)


@dataclass(frozen=True)
class Route:
    route: str | None  # None: the generic subject (no worker registered yet)
    waiting: str | None = None


class NoWorkerCould(Exception):
    """No registered worker could ever run the job: the planner's reason (HTTP 422)."""


_SNAPSHOTS: dict[int, tuple[float, list]] = {}
SNAPSHOT_S = 1.0


async def _snapshot(kv) -> list[dict]:
    """A bucket's values, read at most once a second per bucket: a listing is a stream-info
    request and a read per key (broker.kv_values), too much for every submit under load."""
    now = time.monotonic()
    got = _SNAPSHOTS.get(id(kv))
    if got is not None and now - got[0] < SNAPSHOT_S:
        return got[1]
    values = await kv_values(kv)
    _SNAPSHOTS[id(kv)] = (now, values)
    return values


async def registered(caps_kv) -> list[Capability]:
    return [Capability.from_json(d) for d in await _snapshot(caps_kv)]


async def online(workers_kv) -> list[dict]:
    """Live workers' heartbeats (the bucket's TTL drops the dead), at most a second old."""
    return await _snapshot(workers_kv)


def can_take(heartbeat: dict, route: str | None) -> bool:
    cap = heartbeat.get("capability") or {}
    if route is None:
        return True
    models, _, tier = route.rpartition(".t")
    return cap.get("models") == models and int(cap.get("tier", 0)) >= int(tier)


async def route_job(req, models: str | None, caps_kv, workers_kv) -> Route:
    """Where a checked request goes; raises NoWorkerCould with the planner's reason."""
    from wanrender.runtime.memory import Workload

    caps = await registered(caps_kv)
    live = await online(workers_kv)
    if models is not None:
        caps = [c for c in caps if c.models == models]
        if not caps:
            raise NoWorkerCould(f"models {models}: no registered worker holds this model set — omit it, or start a "
                                "worker with those model files")  # fmt: skip
    if not caps:
        return Route(None, None if live else NO_WORKER)
    work = Workload.of(req)
    choices, reasons = [], []
    for m in sorted({c.models for c in caps}):
        top = max(c.tier for c in caps if c.models == m)
        weights = next(c.weights for c in caps if c.models == m and c.tier == top)
        tier, why = job_tier(work, weights, top)
        if tier is None:
            reasons.append((top, why))
        else:
            choices.append(route_name(m, tier))
    if not choices:
        top, why = max(reasons)
        raise NoWorkerCould(f"no registered worker could ever run it (the largest has {top} GiB): {why}")
    for r in choices:  # a class with a live worker first
        if any(can_take(h, r) for h in live):
            return Route(r)
    return Route(choices[0], NO_WORKER)


async def ensure_class_consumer(js, route: str | None, queue) -> None:
    """The class's two durable consumers, one per priority (created once, by whoever needs
    them first: the API routing a job, a worker for its own class or a job it moves)."""
    from nats.js import api

    if route is None:
        return  # the generic consumers: broker.ensure_jetstream
    for priority in ("high", "normal"):
        name = consumer_of(route, priority)
        try:
            await js.consumer_info(STREAM, name)
        except Exception as e:  # noqa: BLE001 - NotFoundError, imported lazily
            if type(e).__name__ != "NotFoundError":
                raise
            # ``name`` set (not only durable_name): the create request's subject then carries the
            # filter, which is what the NATS worker user's permission allows (natsauth.py).
            config = api.ConsumerConfig(
                name=name, durable_name=name, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=queue.ack_wait_s,
                max_deliver=queue.max_deliver, filter_subject=subject_of(route, priority), max_ack_pending=-1,
            )  # fmt: skip
            await js.add_consumer(STREAM, config)


class Puller:
    """A worker's next job message from the classes it may take (its model set, tiers at
    or below its own): high before normal, and within a priority the highest tier first,
    then the generic subject; waits for a publish (a core-NATS subscription on the jobs'
    subjects) when nothing is pending."""

    def __init__(self, nc, js, cap: Capability, queue) -> None:
        self.nc, self.js, self.cap, self.queue = nc, js, cap, queue
        self._subs: dict[str, object] = {}
        self._wake = None
        self._poke = None

    async def start(self) -> None:
        import asyncio

        self._poke = asyncio.Event()

        async def on_publish(msg) -> None:
            self._poke.set()

        self._wake = await self.nc.subscribe(JOB_SUBJECTS, cb=on_publish)
        # This worker's own top class exists from the start, so the API can route to it at once.
        await ensure_class_consumer(self.js, route_name(self.cap.models, self.cap.tier), self.queue)

    async def stop(self) -> None:
        if self._wake is not None:
            try:
                await self._wake.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is closing
                pass

    def _mine(self, name: str) -> tuple[int, int] | None:
        """The rank of a consumer for this worker (higher first: priority, then tier), None: not for it."""
        parsed = parse_consumer(name)
        if parsed is None:
            return None
        models, tier, priority = parsed
        if models is not None and (models != self.cap.models or tier > self.cap.tier):
            return None
        return (1 if priority == "high" else 0, tier)

    async def _sub(self, name: str):
        if name not in self._subs:
            self._subs[name] = await self.js.pull_subscribe_bind(durable=name, stream=STREAM)
        return self._subs[name]

    async def next(self, stop, idle_wait: float = 1.0):
        """One message (``msg.metadata.consumer`` names its class), or None after ``idle_wait``."""
        import asyncio

        import nats.errors

        self._poke.clear()
        infos = await self.js.consumers_info(STREAM)
        ranked = sorted(((self._mine(i.name), i) for i in infos if self._mine(i.name) is not None),
                        key=lambda p: p[0], reverse=True)  # fmt: skip
        # Waiting messages first; then classes with messages out on lease, whose lease may
        # have run out (a dead worker's job is redelivered only to a pull that asks).
        for want_pending in (True, False):
            for _, info in ranked:
                if stop.is_set():
                    return None
                if want_pending and not info.num_pending:
                    continue
                if not want_pending and not info.num_ack_pending:
                    continue
                sub = await self._sub(info.name)
                try:
                    msgs = await sub.fetch(1, timeout=1.0 if want_pending else 0.2)
                except nats.errors.TimeoutError:
                    continue
                if msgs:
                    return msgs[0]
        try:
            await asyncio.wait_for(self._poke.wait(), idle_wait)
        except asyncio.TimeoutError:
            pass
        return None


async def caps_bucket(js):
    """Registered capabilities: no TTL (a worker offline still counts as one that could run a
    job). broker.ensure_jetstream creates it; a worker only looks it up."""
    return await js.key_value(CAPS_KV)
