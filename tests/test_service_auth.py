"""API keys, priorities, /metrics and the ETA against `wanrender serve` in a process:
a real nats-server (with its api and worker users), real HTTP on loopback and real
renders with the demo models at a tiny size."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")
pytest.importorskip("prometheus_client")

from test_service import TINY, _cli, _env, _one_line_error, _wait  # noqa: E402 - after the skips


def _add_key(env: dict, data: Path, name: str, *opts: str) -> str:
    r = _cli(env, "keys", "add", name, "--data", str(data), *opts)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def secured(demo_set, tmp_path_factory):
    """A service with keys: alice (3 jobs/min), bob (1 job at a time), carol (roomy), dave (revoked later)."""
    from wanrender.service.broker import free_port

    home, _, image = demo_set
    env = _env(home)
    data = tmp_path_factory.mktemp("secured")
    keys = {
        "alice": _add_key(env, data, "alice", "--rate", "3"),
        "bob": _add_key(env, data, "bob", "--max-jobs", "1"),
        "carol": _add_key(env, data, "carol", "--max-jobs", "8", "--rate", "100"),
        "dave": _add_key(env, data, "dave"),
    }
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "serve", "--data", str(data), "--listen",
                             f"127.0.0.1:{port}", "--device", "cpu", "--lease", "5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    server = Api(port)

    def up():
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        try:
            return server.call("GET", "/v1/workers", key=keys["carol"])[1]["workers"]
        except OSError:
            return None

    _wait(up, 90, 0.2)
    yield server, keys, data, image, env
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in out + err, err


class Api:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, key: str | None = None, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict, dict]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body, h)
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("content-type", "")
        return resp.status, (json.loads(raw) if "json" in ctype else {"text": raw.decode()}), dict(resp.getheaders())

    def submit(self, key: str | None, image: Path, idempotency: str | None = None, **params) -> tuple[int, dict, dict]:
        boundary = "b0undary"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
                f'{json.dumps({"prompt": "x", **TINY, **params})}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if idempotency is not None:
            headers["Idempotency-Key"] = idempotency
        return self.call("POST", "/v1/jobs", key, body, headers)

    def final(self, key: str, job_id: str, timeout: float = 120) -> dict:
        def done():
            j = self.call("GET", f"/v1/jobs/{job_id}", key)[1]
            return j if j["state"] in ("succeeded", "failed", "canceled") else None

        return _wait(done, timeout, 0.1)


def _jobs(data: Path) -> set[str]:
    folder = data / "jobs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_missing_or_wrong_key_is_401_and_nothing_is_stored(secured) -> None:
    api, keys, data, image, env = secured
    before = _jobs(data)
    status, body, headers = api.submit(None, image)
    assert status == 401 and body["error"].startswith("missing API key") and headers["www-authenticate"] == "Bearer"
    status, body, _ = api.submit("wr_not-a-key", image)
    assert status == 401 and "wrong or revoked" in body["error"]
    assert api.call("GET", "/v1/workers")[0] == 401
    assert api.call("GET", "/health")[0] == 200  # health and metrics stay open (no job data in them)
    assert _jobs(data) == before
    r = _cli(env, "submit", str(image), "-p", "x", "--server", api.url, "--key", "wr_wrong")
    _one_line_error(r, 2, "401", "wrong or revoked")
    r = _cli({**env, "WANRENDER_API_KEY": keys["carol"]}, "submit", str(image), "-p", "x", "--server", api.url,
             "--preset", "demo", "--frames", "5", "--size", "80x64")  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    assert api.final(keys["carol"], job_id)["owner"] == "carol"
    # Another key does not see carol's job at all.
    assert api.call("GET", f"/v1/jobs/{job_id}", keys["bob"])[0] == 404


def test_the_key_store_holds_only_hashes_and_revoke_takes_effect_at_once(secured) -> None:
    api, keys, data, image, env = secured
    store = data / "keys.json"
    text = store.read_text()
    assert store.stat().st_mode & 0o777 == 0o600
    for name, key in keys.items():
        assert key.startswith("wr_") and key not in text
        assert json.loads(text)["keys"][name]["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    listed = _cli(env, "keys", "list", "--data", str(data))
    assert listed.returncode == 0 and "dave" in listed.stdout and keys["dave"] not in listed.stdout
    assert api.call("GET", "/v1/workers", keys["dave"])[0] == 200
    r = _cli(env, "keys", "revoke", "dave", "--data", str(data))
    assert r.returncode == 0, r.stderr
    status, body, _ = api.call("GET", "/v1/workers", keys["dave"])
    assert status == 401 and "revoked" in body["error"]  # the running service re-read the file
    _one_line_error(_cli(env, "keys", "revoke", "dave", "--data", str(data)), 2, "no key named 'dave'")
    _one_line_error(_cli(env, "keys", "add", "alice", "--data", str(data)), 2, "exists")
    assert json.loads(store.read_text())["keys"].keys() == {"alice", "bob", "carol"}


def test_rate_limit_is_429_with_retry_after(secured) -> None:
    api, keys, data, image, _ = secured
    ids = []
    for _ in range(3):  # the bucket holds 3 (a minute's worth)
        status, body, _ = api.submit(keys["alice"], image, steps=1)
        assert status == 201, body
        ids.append(body["id"])
    before = _jobs(data)
    status, body, headers = api.submit(keys["alice"], image, steps=1)
    assert status == 429 and "3 jobs/min" in body["error"] and 1 <= int(headers["retry-after"]) <= 20
    assert _jobs(data) == before
    for job_id in ids:  # keep the worker free for the other tests
        api.call("POST", f"/v1/jobs/{job_id}/cancel", keys["alice"])


def test_too_many_unfinished_jobs_is_429_until_one_ends(secured) -> None:
    api, keys, _, image, _ = secured
    status, first, _ = api.submit(keys["bob"], image, steps=200, idempotency="bob-1")
    assert status == 201
    status, body, headers = api.submit(keys["bob"], image)
    assert status == 429 and "limit is 1" in body["error"] and headers["retry-after"]
    status, again, _ = api.submit(keys["bob"], image, steps=200, idempotency="bob-1")  # a retry is not a new job
    assert status == 200 and again["id"] == first["id"]
    assert api.call("POST", f"/v1/jobs/{first['id']}/cancel", keys["bob"])[0] == 200
    api.final(keys["bob"], first["id"])
    _wait(lambda: api.submit(keys["bob"], image, steps=1)[0] == 201, 10, 0.2)


def test_a_high_job_runs_before_earlier_normal_ones_and_eta_and_metrics(secured) -> None:
    api, keys, _, image, _ = secured
    carol = keys["carol"]
    busy = api.submit(carol, image, steps=24)[1]["id"]
    _wait(lambda: api.call("GET", f"/v1/jobs/{busy}", carol)[1]["state"] == "running", 60)
    normal = [api.submit(carol, image, seed=i)[1]["id"] for i in range(2)]
    status, high, _ = api.submit(carol, image, priority="high")
    assert status == 201 and high["params"]["priority"] == "high"
    assert high["queue_position"] == 0  # high: nothing ahead of it
    view = api.call("GET", f"/v1/jobs/{normal[1]}", carol)[1]
    assert view["queue_position"] == 2  # the high job and normal[0]
    assert view["eta_s"] is None or view["eta_s"] > 0  # known once a job finished here (the calibration)
    finals = {j: api.final(carol, j) for j in [busy, *normal, high["id"]]}
    assert all(f["state"] == "succeeded" for f in finals.values())
    assert finals[high["id"]]["started_at"] < min(finals[j]["started_at"] for j in normal)
    assert api.call("GET", f"/v1/jobs/{high['id']}", carol)[1]["eta_s"] == 0.0
    nxt = api.submit(carol, image, steps=60)[1]
    assert isinstance(nxt["eta_s"], float) and nxt["eta_s"] > 0  # calibrated from the finished jobs
    api.call("POST", f"/v1/jobs/{nxt['id']}/cancel", carol)
    status, body, headers = api.call("GET", "/metrics")
    text = body["text"]
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'wanrender_jobs{state="succeeded"}' in text and "wanrender_workers 1.0" in text
    assert 'wanrender_queue_depth{priority="high"}' in text
    assert 'wanrender_job_duration_seconds_count{outcome="succeeded"}' in text
    assert 'wanrender_refused_total{status="401"}' in text
    done = next(ln for ln in text.splitlines() if ln.startswith('wanrender_jobs{state="succeeded"}'))
    assert float(done.split()[-1]) >= 4


def test_serving_beyond_loopback_without_a_key_is_refused(demo_set, tmp_path: Path) -> None:
    from wanrender.service.broker import free_port

    home, _, _ = demo_set
    data = tmp_path / "open"
    r = _cli(_env(home), "serve", "--data", str(data), "--listen", f"0.0.0.0:{free_port()}", "--device", "cpu")
    _one_line_error(r, 2, "needs an API key", "wanrender keys add")
    assert not data.exists()  # refused before anything was created
