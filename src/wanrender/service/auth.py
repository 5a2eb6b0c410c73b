"""Client API keys: a key store file under ``--data``, bearer checks, per-key rate
limits (token buckets) and a cap on each key's unfinished jobs.

Keys are 32 random bytes (``wr_`` + url-safe base64), so the store keeps only their
SHA-256: a slow, salted KDF (scrypt, PBKDF2) exists to make guessing a *low-entropy
password* expensive, and there is nothing to guess in 256 random bits; a fast hash
also keeps the check off every request's latency. The clear key is printed once, by
``wanrender keys add``, and is never written anywhere.

The store is a JSON file (``DATA/keys.json``, mode 0600, replaced atomically), not a
NATS KV bucket: keys can be added and revoked while the service is down, and the
API process re-reads the file when it changes, so a revoke takes effect at the next
request without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from wanrender.errors import WanrenderError

KEYS_FILE = "keys.json"
PREFIX = "wr_"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_RATE = 30  # job submissions per minute
DEFAULT_MAX_JOBS = 4  # unfinished (queued, leased, running) jobs at a time


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    rate_per_min: int = DEFAULT_RATE
    max_jobs: int = DEFAULT_MAX_JOBS
    created_at: float = 0.0


def check_limits(rate: int, max_jobs: int) -> None:
    if not 1 <= rate <= 100_000:
        raise WanrenderError(f"--rate {rate} is invalid — use 1..100000 jobs per minute")
    if not 1 <= max_jobs <= 100_000:
        raise WanrenderError(f"--max-jobs {max_jobs} is invalid — use 1..100000")


class KeyStore:
    """``DATA/keys.json``. Every change rewrites the whole file through a temporary
    one and a rename: a crash leaves the old file or the new one, never half of one."""

    def __init__(self, data: Path) -> None:
        self.path = Path(data) / KEYS_FILE
        self._cache: tuple[tuple[int, int], dict[str, ApiKey]] | None = None
        self._lock = threading.Lock()

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, ApiKey]:
        """The keys by name, re-read only when the file changed (mtime and size)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1]
            try:
                raw = json.loads(self.path.read_text())
                keys = {n: ApiKey(name=n, **{k: v for k, v in rec.items() if k != "name"})
                        for n, rec in raw["keys"].items()}  # fmt: skip
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise WanrenderError(
                    f"{self.path}: the key store is unreadable ({type(e).__name__}) — restore it from a backup or "
                    "delete it and add the keys again"
                ) from None
            self._cache = (stamp, keys)
            return keys

    def _write(self, keys: dict[str, ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        body = json.dumps({"version": 1, "keys": {n: asdict(k) for n, k in sorted(keys.items())}}, indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def add(self, name: str, rate: int = DEFAULT_RATE, max_jobs: int = DEFAULT_MAX_JOBS) -> str:
        """A new key for ``name``; returns the clear key (the only time it exists)."""
        if not NAME.match(name):
            raise WanrenderError(f"key name {name!r} is invalid — use 1..64 of a-z 0-9 . _ - (starting a-z or 0-9)")
        check_limits(rate, max_jobs)
        keys = dict(self.load())
        if name in keys:
            raise WanrenderError(f"a key named {name!r} exists — revoke it first or choose another name")
        key = PREFIX + secrets.token_urlsafe(32)
        keys[name] = ApiKey(name, digest(key), rate, max_jobs, round(time.time(), 3))
        self._write(keys)
        return key

    def revoke(self, name: str) -> None:
        keys = dict(self.load())
        if name not in keys:
            have = ", ".join(sorted(keys)) or "none"
            raise WanrenderError(f"no key named {name!r} (keys: {have}) — see 'wanrender keys list'")
        del keys[name]
        self._write(keys)  # the file stays, even empty: the service stays closed (see Gate)

    def find(self, key: str) -> ApiKey | None:
        want = digest(key)
        found = None
        for k in self.load().values():  # compare every digest, in constant time each
            if hmac.compare_digest(k.sha256, want):
                found = k
        return found


class Limited(Exception):
    """A refused request: ``status`` 401 or 429, ``retry_after`` seconds for a 429 rate limit."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Gate:
    """Who may call /v1, and how often.

    Auth is required when the key store file exists (even with every key revoked:
    revoking the last key locks the API rather than opening it) or when ``required``
    (serve on a non-loopback address). A loopback service that never had a key runs
    open, for the demo; adding a key closes it from the next request on.
    """

    def __init__(self, store: KeyStore, required: bool = False) -> None:
        self.store, self.required = store, required
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.required or self.store.exists

    def check(self, authorization: str | None) -> ApiKey | None:
        """The caller's key (None: the API is open), or ``Limited(401)``."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Limited(401, "missing API key — send 'Authorization: Bearer <key>' (wanrender submit --key, or "
                               "WANRENDER_API_KEY)")  # fmt: skip
        key = self.store.find(token.strip())
        if key is None:
            raise Limited(401, "the API key is wrong or revoked — ask the operator for a key ('wanrender keys add')")
        return key

    def take(self, key: ApiKey, now: float | None = None) -> None:
        """One job submission from ``key``'s bucket (``rate_per_min`` a minute, bursts up to the same)."""
        now = time.monotonic() if now is None else now
        per_s = key.rate_per_min / 60.0
        tokens, at = self._buckets.get(key.name, (float(key.rate_per_min), now))
        tokens = min(float(key.rate_per_min), tokens + (now - at) * per_s)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) / per_s)
            self._buckets[key.name] = (tokens, now)
            raise Limited(429, f"rate limit of key {key.name!r} ({key.rate_per_min} jobs/min) reached — retry in "
                               f"{wait} s", retry_after=wait)  # fmt: skip
        self._buckets[key.name] = (tokens - 1.0, now)

    def admit(self, key: ApiKey, unfinished: int) -> None:
        if unfinished >= key.max_jobs:
            raise Limited(429, f"key {key.name!r} has {unfinished} unfinished job(s), its limit is {key.max_jobs} — "
                               "wait for one to end or cancel one", retry_after=5)  # fmt: skip


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, data: Path) -> None:
    """Serving beyond loopback without a key would open the GPUs to anyone who can reach the port."""
    if not is_loopback(host) and not KeyStore(data).load():
        raise WanrenderError(
            f"--listen {host}: serving beyond loopback needs an API key — add one with 'wanrender keys add NAME "
            f"--data {data}' (or listen on 127.0.0.1)"
        )
