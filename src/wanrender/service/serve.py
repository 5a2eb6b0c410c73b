"""One box in one command: the embedded nats-server, the API (uvicorn) and the first
warm worker on one asyncio loop (the render itself runs on the worker's thread); each
further local worker (one per GPU) is a child process that serve supervises
(local_workers.py).

Ctrl-C or SIGTERM stops the API, lets the workers hand a running job back (nak: the
next worker takes it at once), stops the child workers, then nats-server: no orphan
process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from wanrender.runtime.profiles import Profile
from wanrender.service.broker import STREAM, EmbeddedBroker, QueueConfig, connect, ensure_jetstream
from wanrender.service.intake import Limits
from wanrender.service.jobs import JOB_ID, JobRecord, JobState, JobStore

log = logging.getLogger(__name__)
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"  # consumer "*": every class


@dataclass(frozen=True)
class ServeConfig:
    data: Path
    host: str = "127.0.0.1"
    port: int = 8000
    # One local worker per entry: the first in this process, the others child processes;
    # (): the API alone (a fleet's API container; workers join through NATS).
    devices: tuple[str, ...] = ("cpu",)
    queue: QueueConfig = QueueConfig()
    limits: Limits = Limits()
    nats: str | None = None  # an external NATS server instead of the embedded one (then ``creds``: its api user)
    creds: Path | None = None
    storage: object = None  # storage.S3Storage for a fleet; None: local disk under ``data``
    keep_s: float | None = None  # results kept this long, then expired (None: for ever)
    vram_gib: float | None = None  # the worker plans as if its device had this much memory
    profile: Profile | None = None  # the GPU profile the local worker applies to each job (worker.worker_profile)
    # The `wanrender worker` options of the child workers beyond NATS and the device (storage,
    # models, vram): the CLI's own spelling of the options serve was given.
    child_args: tuple[str, ...] = ()

    @property
    def workers(self) -> int:
        return len(self.devices)

    @property
    def device(self) -> str:
        """The in-process worker's device."""
        return self.devices[0] if self.devices else "cpu"


def parse_listen(text: str) -> tuple[str, int]:
    from wanrender.errors import WanrenderError

    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WanrenderError(f"--listen {text!r} is invalid — use HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


async def reap_exhausted(nats_url: str, queue: QueueConfig, stop: asyncio.Event) -> None:
    """A job whose last allowed attempt died (no worker left to say so) fails here, on
    JetStream's max-deliveries advisory, carrying the last reason."""
    nc = await connect(nats_url, "wanrender-reaper")
    try:
        js = nc.jetstream()
        jobs_kv, _ = await ensure_jetstream(js, queue)
        store = JobStore(jobs_kv)

        async def on_advisory(msg) -> None:
            try:
                event = json.loads(msg.data)
                seq, deliveries = int(event["stream_seq"]), int(event.get("deliveries", queue.max_deliver))
                job_id = (await js.get_msg(STREAM, seq)).data.decode(errors="replace")
            except Exception as e:  # noqa: BLE001 - a malformed advisory or a message already gone
                log.warning("max-deliveries advisory not handled: %s", e)
                return
            if JOB_ID.match(job_id):

                def give_up(r: JobRecord) -> JobRecord | None:
                    if r.terminal:
                        return None
                    why = r.last_reason or "no reason recorded"
                    if r.state in (JobState.LEASED, JobState.RUNNING):
                        why = f"attempt {r.attempt} on worker {r.worker} stopped renewing its lease (the worker died?)"
                    return r.touch(state=JobState.FAILED, finished_at=time.time(),
                                   error=f"failed after {deliveries} attempt(s): {why}")  # fmt: skip

                await store.update(job_id, give_up)
            try:
                await js.delete_msg(STREAM, seq)
            except Exception:  # noqa: BLE001 - already removed
                pass

        sub = await nc.subscribe(ADVISORY.format(stream=STREAM, consumer="*"), cb=on_advisory)
        await stop.wait()
        await sub.unsubscribe()
    finally:
        await nc.close()


def run_serve(cfg: ServeConfig, files, announce=print) -> None:
    """Blocks until Ctrl-C/SIGTERM; everything it started is stopped before it returns."""
    from wanrender.errors import WanrenderError

    with socket.socket() as probe:  # a taken port is refused now, in one line, before anything starts
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as e:
            raise WanrenderError(f"--listen {cfg.host}:{cfg.port}: cannot listen there ({e.strerror}) — choose another "
                                 "address or port") from None  # fmt: skip
    from wanrender.service.auth import Gate, KeyStore, is_loopback
    from wanrender.service.natsauth import read_creds, write_fleet

    gate = Gate(KeyStore(cfg.data), required=not is_loopback(cfg.host))
    if cfg.nats is not None:  # a fleet's NATS: this process is its api user
        api_url = read_creds(cfg.creds).url(cfg.nats) if cfg.creds else cfg.nats
        joins = ("--creds", str(cfg.creds)) if cfg.creds else ()
        # The URL in the children's environment, not their command line: it may carry a
        # password (nats://user:pass@host), and every local user can read a command line.
        asyncio.run(_serve(cfg, files, api_url, api_url, announce, gate, joins, {"WANRENDER_NATS": cfg.nats}))
        return
    fleet = write_fleet(cfg.data / "nats")  # users with subject permissions (natsauth.py)
    broker = EmbeddedBroker(cfg.data / "nats", config=fleet["config"])
    broker.start()
    announce(f"NATS {broker.url}: worker credentials in {fleet['worker']} (wanrender worker --creds)")
    try:
        urls = (read_creds(fleet["api"]).url(broker.url), read_creds(fleet["worker"]).url(broker.url))
        joins = ("--nats", broker.url, "--creds", str(fleet["worker"]))  # the password stays out of `ps`
        asyncio.run(_serve(cfg, files, *urls, announce, gate, joins))
    finally:
        broker.stop()


def _children(cfg: ServeConfig, joins: tuple[str, ...]):
    """The child workers: every local worker but the first. The first stays in serve's
    process, so that a one-GPU (or CPU) box remains one process with nothing to supervise
    and starts as quickly as before; each further GPU gets a process of its own, because
    render threads of several GPUs in one Python process would contend for its GIL."""
    import logging
    import sys

    from wanrender.service.local_workers import Child

    verbose = ("-v",) if logging.getLogger().isEnabledFor(logging.DEBUG) else ()
    base = (sys.executable, "-m", "wanrender.cli", *verbose, "worker", *joins, *cfg.child_args)
    return [Child(f"worker {i + 1} on {dev}", (*base, "--device", dev)) for i, dev in enumerate(cfg.devices)][1:]


def _echo(line: str) -> None:
    import sys

    sys.stderr.write(line + "\n")  # not through rich: a child's line is text, not markup
    sys.stderr.flush()


async def _serve(cfg: ServeConfig, files, nats_url: str, worker_url: str, announce, gate, joins=(),
                 join_env: dict[str, str] | None = None) -> None:  # fmt: skip
    import uvicorn

    from wanrender.service.api import create_app
    from wanrender.service.worker import Worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    from wanrender.service.natsurl import redact

    storage = cfg.storage if cfg.storage is not None else cfg.data
    app = create_app(nats_url, storage, cfg.limits, cfg.queue, gate, keep_s=cfg.keep_s)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # older uvicorn; ours are above
    server.capture_signals = contextlib.nullcontext  # newer uvicorn: it would re-raise the signal after stopping
    worker = None
    if cfg.workers:
        worker = Worker(worker_url, storage, files, cfg.device, queue=cfg.queue, vram_gib=cfg.vram_gib,
                        scratch=cfg.data / "scratch", profile=cfg.profile)  # fmt: skip
    ready = asyncio.Event()
    tasks = [asyncio.create_task(server.serve(), name="api"),
             asyncio.create_task(reap_exhausted(nats_url, cfg.queue, stop), name="reaper")]  # fmt: skip
    if worker is not None:
        tasks.append(asyncio.create_task(worker.run(stop, ready), name="worker"))
    else:
        ready.set()
    children = _children(cfg, joins)
    if children:
        import os

        from wanrender.service.local_workers import supervise

        # Inherited as is (NCCL/NVSHMEM settings too); lines arrive live.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(join_env or {})}

        def started_child(child, pid: int) -> None:
            announce(f"{child.label}: started as pid {pid}")

        for child in children:
            tasks.append(asyncio.create_task(supervise(child, stop, announce, _echo, env=env, on_start=started_child),
                                             name=child.label))  # fmt: skip
    waiter = asyncio.create_task(stop.wait())
    started = asyncio.create_task(_started(server, ready))
    done, _ = await asyncio.wait([waiter, started, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if started in done and not stop.is_set():
        who = f"worker {worker.name} on {cfg.device}" if worker else "no local worker"
        if children:
            who += f", {len(children)} more local worker(s) joining on {', '.join(cfg.devices[1:])}"
        keys = "API keys required" if gate.enabled else "open: no API keys (loopback only)"
        where = f", results in {cfg.storage.describe()}" if cfg.storage else ""
        announce(f"serving on http://{cfg.host}:{cfg.port} (NATS {redact(nats_url)}, {who}, {keys}, "
                 f"data {cfg.data}{where}) — Ctrl-C stops")  # fmt: skip
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    server.should_exit = True
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task in (waiter, started):
        task.cancel()
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            raise r


async def _started(server, ready: asyncio.Event) -> None:
    await ready.wait()
    while not server.started:
        await asyncio.sleep(0.05)
