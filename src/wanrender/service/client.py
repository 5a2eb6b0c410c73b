"""A small client of the HTTP API, on the standard library only (``wanrender submit`` uses it)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from wanrender.errors import WanrenderError, shown


class Client:
    def __init__(
        self, server: str = "http://127.0.0.1:8000", timeout: float = 30.0, api_key: str | None = None
    ) -> None:
        """``api_key``: sent as a bearer token (default: the WANRENDER_API_KEY environment variable)."""
        import os

        self.server = server.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get("WANRENDER_API_KEY") or None

    def _open(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float | None = None):  # fmt: skip
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.server + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error") or e.reason
            except (ValueError, AttributeError):
                message = e.reason
            raise WanrenderError(f"the server refused it ({e.code}): {message}") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise WanrenderError(
                f"cannot reach {self.server} ({why}) — start 'wanrender serve' or check --server"
            ) from None

    def _json(self, method: str, path: str, **kw) -> dict:
        with self._open(method, path, **kw) as r:
            return json.loads(r.read())

    def submit(self, image: Path, params: dict, idempotency_key: str | None = None) -> dict:
        """The job record; the same ``idempotency_key`` again returns the same job."""
        try:
            blob = Path(image).read_bytes()
        except OSError as e:
            raise WanrenderError(f"{shown(image)}: cannot read the image ({e.strerror}) — check the path") from None
        boundary = uuid.uuid4().hex
        parts = [
            (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n'
             f"Content-Type: application/json\r\n\r\n").encode() + json.dumps(params).encode() + b"\r\n",
            (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode() + blob + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]  # fmt: skip
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json("POST", "/v1/jobs", body=b"".join(parts), headers=headers)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel", body=b"")

    def workers(self) -> list[dict]:
        return self._json("GET", "/v1/workers")["workers"]

    def events(self, job_id: str, timeout: float = 600.0) -> Iterator[dict]:
        """The job's record each time it changes (server-sent events), ending with its final state."""
        with self._open("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
            data: list[str] = []
            for raw in r:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    def wait(self, job_id: str, timeout: float = 600.0, on_update=None) -> dict:
        deadline = time.monotonic() + timeout
        last = self.job(job_id)
        if last["state"] in ("succeeded", "failed", "canceled", "expired"):
            return last
        for record in self.events(job_id, timeout=timeout):
            last = record
            if on_update:
                on_update(record)
            if time.monotonic() > deadline:
                break
        return self.job(job_id)

    def download(self, job_id: str, out: Path, what: str = "result") -> Path:
        """The result MP4 (or ``what="sidecar"``) written to ``out`` whole or not at all."""
        import os

        out = Path(out)
        tmp = out.with_name(f".{out.name}.partial")
        try:
            with self._open("GET", f"/v1/jobs/{job_id}/{what}") as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out
