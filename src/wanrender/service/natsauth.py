"""NATS users for the service, separate from the clients' API keys.

Two users with subject permissions, in the server's ``authorization`` block:

- ``api`` (the API process, its reaper and its expiry sweep): publishes jobs (generic
  and class subjects of both priorities), creates and reads the stream, consumers and KV
  buckets (``$JS.API.>``), writes the three KV buckets, follows the max-deliveries
  advisories;
- ``worker``: only what a worker does — looks up the stream, lists and looks up the job
  consumers and the KV buckets, pulls from any job consumer, acks/naks/extends leases,
  reads and writes job records, its heartbeat and its capability (routing.py), and
  hears publishes on the job subjects (its wake-up). For routing it may also create a
  class consumer (only one whose filter is a class subject: the filter is part of the
  permitted create subject) and publish to a class subject (a job it moves from the
  generic subject to its class). It cannot publish to a generic job subject (submit a
  job), delete a stream or consumer, create any other consumer, or read any other subject.

Passwords are 32 random bytes; the server's config keeps only their bcrypt hash.
A credentials file is JSON, mode 0600: ``{"user": "worker", "password": "..."}``
(``wanrender worker --creds FILE``). ``write_fleet`` writes ``nats.conf``,
``api.creds`` and ``worker.creds`` into a folder once and reuses them afterwards,
so workers' files stay valid across restarts (serve: ``DATA/nats/``).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import WanrenderError, shown
from wanrender.service.broker import (
    CAPS_KV,
    CONSUMER,
    HIGH_CONSUMER,
    HIGH_SUBJECT,
    JOBS_KV,
    STREAM,
    SUBJECT,
    WORKERS_KV,
)
from wanrender.service.routing import JOB_SUBJECTS

CONF, API_CREDS, WORKER_CREDS = "nats.conf", "api.creds", "worker.creds"
BUCKETS = (JOBS_KV, WORKERS_KV, CAPS_KV)
CLASS_SUBJECTS = (f"{SUBJECT}.*.*", f"{HIGH_SUBJECT}.*.*")  # routing.subject_of: <base>.<model set>.t<tier>


def worker_permissions() -> dict:
    lookups = [f"$JS.API.STREAM.INFO.{s}" for s in (STREAM, *(f"KV_{b}" for b in BUCKETS))]
    kv_reads = [f"$JS.API.DIRECT.GET.KV_{b}.>" for b in BUCKETS] + [f"$JS.API.STREAM.MSG.GET.KV_{b}" for b in BUCKETS]
    return {
        "publish": {"allow": [
            *lookups, *kv_reads, "$JS.API.INFO", f"$JS.API.CONSUMER.LIST.{STREAM}",
            f"$JS.API.CONSUMER.INFO.{STREAM}.*", f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*",
            *(f"$JS.API.CONSUMER.CREATE.{STREAM}.*.{s}" for s in CLASS_SUBJECTS), *CLASS_SUBJECTS,
            f"$JS.ACK.{STREAM}.>", *(f"$KV.{b}.>" for b in BUCKETS),
        ]},
        "subscribe": {"allow": ["_INBOX.>", JOB_SUBJECTS]},  # a worker's wake-up (routing.Puller)
    }  # fmt: skip


def api_permissions() -> dict:
    jobs = [SUBJECT, f"{SUBJECT}.>", HIGH_SUBJECT, f"{HIGH_SUBJECT}.>"]
    return {
        "publish": {"allow": [*jobs, "$JS.API.>", "$JS.FC.>", *(f"$KV.{b}.>" for b in BUCKETS)]},
        "subscribe": {"allow": ["_INBOX.>", "$JS.EVENT.ADVISORY.>"]},
    }


@dataclass(frozen=True)
class Creds:
    user: str
    password: str

    def url(self, nats_url: str) -> str:
        from wanrender.service.natsurl import with_credentials

        return with_credentials(nats_url, self.user, self.password)


def read_creds(path: Path) -> Creds:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return Creds(str(raw["user"]), str(raw["password"]))
    except FileNotFoundError:
        raise WanrenderError(f"--creds {shown(path)}: no such file — 'wanrender serve' writes it under DATA/nats/ "
                             "(or 'wanrender nats-creds DIR')") from None  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WanrenderError(f"--creds {shown(path)}: not a wanrender NATS credentials file ({type(e).__name__}) — "
                             'it holds {"user": ..., "password": ...}') from None  # fmt: skip


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _conf_value(v) -> str:
    return json.dumps(v)  # nats-server's config format accepts JSON values


def write_fleet(folder: Path) -> dict[str, Path]:
    """``nats.conf`` (users with bcrypt hashes and permissions), ``api.creds`` and
    ``worker.creds`` in ``folder``; existing credentials are kept, the config is rewritten
    from them (so a permission change of a newer version reaches an existing fleet)."""
    import bcrypt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    users = []
    paths = {"config": folder / CONF}
    for user, name, perms in (("api", API_CREDS, api_permissions()), ("worker", WORKER_CREDS, worker_permissions())):
        path = folder / name
        if path.is_file():
            creds = read_creds(path)
        else:
            creds = Creds(user, secrets.token_urlsafe(32))
            _write_private(path, json.dumps({"user": creds.user, "password": creds.password}) + "\n")
        hashed = bcrypt.hashpw(creds.password.encode(), bcrypt.gensalt(rounds=10)).decode()
        users.append(f"    {{user: {_conf_value(creds.user)}, password: {_conf_value(hashed)}, "
                     f"permissions: {_conf_value(perms)}}}")  # fmt: skip
        paths[user] = path
    conf = ("# written by wanrender (service/natsauth.py); the users' clear passwords are in api.creds and\n"
            "# worker.creds beside it, never here\nauthorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n")  # fmt: skip
    _write_private(paths["config"], conf)
    return paths


async def open_jetstream(js, wait_s: float = 15.0):
    """A worker's view of the service's JetStream objects: (jobs kv, workers kv), by
    lookups only (a worker may not create them; the capabilities bucket is checked too).
    The API creates them at its start; until then, wait up to ``wait_s``."""
    import asyncio
    import time

    from nats.js.errors import BucketNotFoundError, NotFoundError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            for durable in (CONSUMER, HIGH_CONSUMER):
                await js.consumer_info(STREAM, durable)
            await js.key_value(CAPS_KV)
            return await js.key_value(JOBS_KV), await js.key_value(WORKERS_KV)
        except (NotFoundError, BucketNotFoundError):
            if time.monotonic() > deadline:
                raise WanrenderError(
                    "the service's job stream does not exist on this NATS server — start 'wanrender serve' (or the "
                    "API) against it first"
                ) from None
            await asyncio.sleep(0.2)
