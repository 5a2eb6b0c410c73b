"""Shared pieces of the service tests: the environment of a CLI process, waiting, a
`wanrender serve` process and a moto S3 server (a real S3 API on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = {"preset": "demo", "frames": 5, "width": 80, "height": 64}
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def env(home: Path, **extra: str) -> dict:
    # The caller's PYTHONPATH stays behind src: a machine may carry packages there (the GPU one does).
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "WANRENDER_HOME": str(home), **extra}


def cli(e: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *args], env=e, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def demo_home(tmp_path_factory):
    """A module's WANRENDER_HOME with the demo models built once: the service processes it
    starts find them there. Used as ``home = pytest.fixture(scope="module", name="home")(demo_home)``."""
    import pytest

    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANRENDER_HOME", str(home))
    from wanrender.demo import ensure_demo_models

    ensure_demo_models()
    yield home
    mp.undo()


def wait(check, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError("timed out waiting")


def final(client, job_id: str, timeout: float = 90) -> dict:
    done = ("succeeded", "failed", "canceled", "expired")
    return wait(lambda: (j := client.job(job_id))["state"] in done and j, timeout, 0.1)


def start_serve(e: dict, data: Path, *args: str, device: str = "cpu", lease: float = 5, timeout: float = 90):
    """`wanrender serve` on a free port; returns (process, client) once its worker is listed
    (a GPU worker: ``device="cuda"``, a longer ``lease`` and ``timeout`` for its start)."""
    from wanrender.service.broker import free_port
    from wanrender.service.client import Client

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "serve", "--data", str(data), "--listen",
                             f"127.0.0.1:{port}", "--device", device, "--lease", f"{lease:g}", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")

    def up():
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        try:
            return client.workers()
        except Exception:  # noqa: BLE001 - not listening yet
            return None

    wait(up, timeout, 0.2)
    return proc, client


def nats_url(data: Path, user: str = "worker") -> str:
    """The NATS URL of a `serve` (from its log), with the credentials it wrote for ``user``."""
    import re

    from wanrender.service.natsauth import read_creds

    log = (data / "nats" / "nats-server.log").read_text()
    url = "nats://" + re.findall(r"Listening for client connections on (\S+)", log)[-1]
    return read_creds(data / "nats" / f"{user}.creds").url(url)


def stop(proc: subprocess.Popen, timeout: float = 30) -> str:
    """Ctrl-C; the process must end cleanly (exit 0, no traceback). Returns its stderr."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    assert "Traceback" not in (out or "") + (err or ""), err[-3000:]
    return err


def moto_server():
    """A real S3 API on loopback (moto's threaded server); returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    from wanrender.service.broker import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items()
                                                       if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")  # fmt: skip


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    got = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in got.get("Contents", ()))
