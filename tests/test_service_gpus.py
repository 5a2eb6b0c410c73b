"""`serve --gpus/--workers N` and `worker --gpu N` (issue #15): several local workers, the
ones beyond the first as child processes that serve supervises. On the CPU the multi-worker
path runs as `--workers 2 --device cpu` (a real nats-server, real renders of the demo models
at 1 frame 64x64, 1 step); the GPU case is marked and runs on the GPU machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import cli, demo_home, env, final, one_line_error, wait  # noqa: E402

TINY1 = {"prompt": "slow dolly-in", "preset": "demo", "frames": 1, "width": 64, "height": 64, "steps": 1}
CUDA = pytest.importorskip("torch").cuda.is_available()


home = pytest.fixture(scope="module", name="home")(demo_home)


@pytest.fixture(scope="module")
def image(home):
    from wanrender.demo import demo_image

    return demo_image()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _start(e: dict, data: Path, log: Path, *args: str, workers: int, lease: float = 5, timeout: float = 120):
    """`wanrender serve` on a free port, its output in ``log`` (a file: a pipe nobody reads
    would fill and block serve); returns (process, client) once ``workers`` are listed."""
    from wanrender.service.broker import free_port
    from wanrender.service.client import Client

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "serve", "--data", str(data), "--listen",
                                 f"127.0.0.1:{port}", "--lease", f"{lease:g}", *args], env=e, stdout=out,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")

    def up():
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        try:
            return len(got := client.workers()) >= workers and got
        except Exception:  # noqa: BLE001 - not listening yet
            return None

    try:
        wait(up, timeout, 0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, client


def _sigterm(proc: subprocess.Popen, log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def test_two_cpu_workers_share_the_jobs_and_stop_with_serve(home, image, tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "serve.log"
    proc, client = _start(env(home), data, log, "--device", "cpu", "--workers", "2", workers=2)
    child = None
    try:
        workers = client.workers()
        assert len(workers) == 2 and len({w["name"] for w in workers}) == 2, workers
        assert all(w["device"] == "cpu" for w in workers), workers
        pids = {w["pid"] for w in workers}
        assert proc.pid in pids  # the first worker runs in serve's process ...
        (child,) = pids - {proc.pid}
        assert _parent(child) == proc.pid  # ... the second in a child of serve
        # Eight, not four: a worker pulls its next job while it encodes the last, so on a busy
        # machine one of them could take a short run of jobs alone.
        jobs = [client.submit(image, dict(TINY1, seed=i))["id"] for i in range(8)]
        done = [final(client, j, 120) for j in jobs]
        assert [d["state"] for d in done] == ["succeeded"] * 8, done
        assert {d["worker"] for d in done} == {w["name"] for w in workers}  # both rendered
    finally:
        nats_pid = int((data / "nats" / "nats-server.pid").read_text())
        text = _sigterm(proc, log)
    assert "worker 2 on cpu: started as pid" in text
    assert "worker 2 on cpu | " in text  # the child's own output, forwarded with its prefix
    assert "exited unexpectedly" not in text
    wait(lambda: not _alive(child) and not _alive(nats_pid), 10)  # no orphan left


def test_a_password_in_the_nats_url_stays_out_of_the_child_workers_command_line(home, image, tmp_path: Path) -> None:
    """serve against a user's own NATS with a password in the URL: the child worker gets the
    URL in its environment (any local user can read a command line in /proc)."""
    from wanrender.service.broker import EmbeddedBroker

    secret = "s3cret-in-url"
    conf = tmp_path / "nats.conf"
    conf.write_text(f'authorization {{ user: "render", password: "{secret}" }}\n')
    data, log = tmp_path / "data", tmp_path / "serve.log"
    with EmbeddedBroker(tmp_path / "nats", config=conf) as b:
        url = b.url.replace("nats://", f"nats://render:{secret}@")
        proc, client = _start(env(home), data, log, "--nats", url, "--device", "cpu", "--workers", "2", workers=2)
        try:
            (child,) = {w["pid"] for w in client.workers()} - {proc.pid}
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            assert b"worker" in argv and not any(secret.encode() in a for a in argv), argv
            assert secret.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(url.encode(), b"")
            job = client.submit(image, dict(TINY1, seed=1))["id"]
            assert final(client, job, 120)["state"] == "succeeded"
        finally:
            text = _sigterm(proc, log)
    assert secret not in text  # nor in serve's output


def test_a_child_worker_whose_serve_has_ended_says_so_and_stops(home, tmp_path: Path) -> None:
    """A child of serve arms its own parent-death signal, then checks that serve is still its
    parent: started after serve ended (here: named a pid that is not its parent), it stops."""
    from wanrender.service.local_workers import PARENT_ENV

    e = {**env(home), PARENT_ENV: "1"}
    r = cli(e, "worker", "--nats", "nats://127.0.0.1:9", "--data", str(tmp_path), "--device", "cpu", timeout=60)
    one_line_error(r, 2, "the serve process that started this worker (pid 1) has ended")


def test_a_killed_child_worker_is_reported_and_restarted(home, image, tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "serve.log"
    proc, client = _start(env(home), data, log, "--device", "cpu", "--workers", "2", workers=2)
    try:
        (child,) = {w["pid"] for w in client.workers()} - {proc.pid}
        os.kill(child, signal.SIGKILL)
        report = f"worker 2 on cpu (pid {child}) exited unexpectedly (killed by SIGKILL) — restarting it in 1 s"
        wait(lambda: report in log.read_text(), 30)
        # The dead worker's heartbeat lingers until it expires; the new one has a pid of its own.
        fresh = wait(lambda: {w["pid"] for w in client.workers()} - {proc.pid, child}, 90, 0.2)
        (restarted,) = fresh
        assert _parent(restarted) == proc.pid
        job = client.submit(image, TINY1)["id"]
        assert final(client, job, 120)["state"] == "succeeded"
    finally:
        text = _sigterm(proc, log)
    assert text.count("exited unexpectedly") == 1, text[-3000:]
    wait(lambda: not _alive(restarted), 10)


@pytest.mark.parametrize(
    "args, words",
    [
        (["serve", "--gpus", "0,x"], ["--gpus '0,x' is invalid", "e.g. 0,1"]),
        (["serve", "--gpus", "0,1,0"], ["GPU 0 is listed twice"]),
        (["serve", "--gpus", ""], ["--gpus '' is invalid"]),
        (["serve", "--gpus", "0", "--device", "cpu"], ["--gpus and --device cpu disagree"]),
        (["serve", "--workers", "-1"], ["--workers -1 is invalid"]),
        (["worker", "--nats", "nats://127.0.0.1:4222", "--gpu", "1", "--device", "cpu"], ["disagree"]),
        (["worker", "--nats", "nats://127.0.0.1:4222", "--gpu", "-1"], ["--gpu -1 is invalid"]),
    ],
)
def test_bad_gpu_options_are_one_line_and_start_nothing(home, tmp_path: Path, args, words) -> None:
    data = tmp_path / "data"
    r = cli(env(home), *args, "--data", str(data))
    one_line_error(r, 2, *words)
    assert not data.exists()  # refused before anything was started or written


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "args, words",
    [
        (["serve", "--gpus", "0"], ["--gpus 0: no CUDA GPU here — drop --gpus, or use --device cpu"]),
        (["serve", "--gpus", "all"], ["no CUDA GPU here"]),
        (["worker", "--nats", "nats://127.0.0.1:4222", "--gpu", "0"], ["--gpu 0: no CUDA GPU here"]),
    ],
)
def test_gpus_without_cuda_are_refused(home, tmp_path: Path, args, words) -> None:
    data = tmp_path / "data"
    r = cli(env(home), *args, "--data", str(data))
    one_line_error(r, 2, *words)
    assert not data.exists()


def test_the_devices_of_the_local_workers_on_a_two_gpu_machine() -> None:
    """The choice itself, for a machine with 2 GPUs (this one may have none: the count is the
    function's input, so no GPU is faked). The CLI runs it for real in the GPU test below."""
    from wanrender.errors import WanrenderError
    from wanrender.service.local_workers import local_devices, worker_device

    assert local_devices(None, None, None, 2) == ("cuda:0", "cuda:1")
    assert local_devices("all", "cuda", None, 2) == ("cuda:0", "cuda:1")
    assert local_devices("1", None, None, 2) == ("cuda:1",)
    assert local_devices(None, "cuda:1", None, 2) == ("cuda:1",)
    assert local_devices("0,1", None, 1, 2) == ("cuda:0",)
    assert local_devices(None, None, 0, 2) == ()
    assert local_devices(None, "cpu", 3, 2) == ("cpu",) * 3
    assert local_devices(None, None, None, 0) == ("cpu",)  # no CUDA: one CPU worker
    assert worker_device(1, "cuda", 2) == "cuda:1" and worker_device(None, "cpu", 0) == "cpu"
    for args, words in [
        (("0,2", None, None, 2), "--gpus 0,2: GPU 2 does not exist, this machine has 2 CUDA GPU(s) — use 0..1"),
        (("0,1", None, 3, 2), "--workers 3: more than the 2 GPU(s) chosen"),
        (("1", "cuda:0", None, 2), "--gpus and --device cuda:0 both choose the GPUs"),
    ]:
        with pytest.raises(WanrenderError, match=words.replace("(", r"\(").replace(")", r"\)")):
            local_devices(*args)
    with pytest.raises(WanrenderError, match="this machine has 2 CUDA GPU"):
        worker_device(2, None, 2)


@pytest.mark.gpu
def test_serve_on_gpu_0_renders_a_job(home, image, tmp_path: Path) -> None:
    import torch

    data, log = tmp_path / "data", tmp_path / "serve.log"
    r = cli(env(home), "serve", "--data", str(data), "--gpus", str(torch.cuda.device_count()))
    one_line_error(r, 2, f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    assert not data.exists()
    proc, client = _start(env(home), data, log, "--gpus", "0", workers=1, lease=60, timeout=300)
    try:
        (w,) = client.workers()
        assert w["device"] == "cuda:0" and w["pid"] == proc.pid
        job = client.submit(image, TINY1)["id"]
        assert final(client, job, 300)["state"] == "succeeded"
    finally:
        _sigterm(proc, log)


def test_a_child_line_longer_than_the_buffer_is_passed_on_whole() -> None:
    """serve forwards its child workers' output with a label; a traceback or a log line
    longer than the reader's buffer must not be lost, nor glued to the next line."""
    import asyncio

    from wanrender.service.local_workers import _forward

    async def main() -> list[str]:
        reader = asyncio.StreamReader(limit=16)
        reader.feed_data(b"x" * 40 + b"\nshort\nlast without newline")
        reader.feed_eof()
        got: list[str] = []
        await _forward(reader, "w", got.append)
        return got

    got = asyncio.run(main())
    assert got[-2:] == ["w | short", "w | last without newline"], got
    assert "".join(g.removeprefix("w | ") for g in got[:-2]) == "x" * 40, got


def test_serve_killed_leaves_no_worker_and_no_nats_server_and_its_data_starts_again(home, tmp_path: Path) -> None:
    """kill -9 of serve: the kernel ends its child worker and its nats-server (a server left
    running on the store would share it with the next serve's and corrupt it), and a new
    serve on the same --data starts."""
    data, log = tmp_path / "data", tmp_path / "serve.log"
    proc, client = _start(env(home), data, log, "--device", "cpu", "--workers", "2", workers=2)
    (child,) = {w["pid"] for w in client.workers()} - {proc.pid}
    nats_pid = int((data / "nats" / "nats-server.pid").read_text())
    proc.kill()
    proc.wait(timeout=30)
    wait(lambda: not _alive(child) and not _alive(nats_pid), 20)
    proc, _ = _start(env(home), data, tmp_path / "again.log", "--device", "cpu", workers=1)
    _sigterm(proc, tmp_path / "again.log")
