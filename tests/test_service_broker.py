"""The embedded nats-server and its JetStream store (broker.EmbeddedBroker), with a real
nats-server: one server per store, and no server outliving its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("nats")

from wanrender.errors import WanrenderError  # noqa: E402
from wanrender.service.broker import EmbeddedBroker, find_nats_server, free_port  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _running(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


def _gone(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_second_broker_on_one_store_is_refused_in_one_line(tmp_path: Path) -> None:
    with EmbeddedBroker(tmp_path / "nats"):
        with pytest.raises(WanrenderError) as e:
            EmbeddedBroker(tmp_path / "nats").start()
    assert f"in use by another wanrender serve (pid {os.getpid()})" in str(e.value) and "\n" not in str(e.value)
    with EmbeddedBroker(tmp_path / "nats") as b:  # released by stop(): the store starts again
        assert b.proc is not None and b.proc.poll() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_server_ends_when_its_owner_is_killed(tmp_path: Path) -> None:
    code = ("import sys, time\nfrom wanrender.service.broker import EmbeddedBroker\n"
            f"EmbeddedBroker({str(tmp_path / 'nats')!r}).start()\nprint('up', flush=True)\ntime.sleep(600)\n")  # fmt: skip
    owner = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert owner.stdout.readline().strip() == "up"
        pid = int((tmp_path / "nats" / "nats-server.pid").read_text())
        assert _running(pid)
    finally:
        owner.kill()
        owner.wait()
    assert _gone(pid), "nats-server outlived its killed owner"


def test_a_server_left_on_the_store_by_an_earlier_owner_is_stopped(tmp_path: Path) -> None:
    """What a serve killed before this fix left behind: a nats-server on the store, in a
    session of its own, its parent gone."""
    data = tmp_path / "nats"
    store = data / "jetstream"
    store.mkdir(parents=True)
    orphan = subprocess.Popen([find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(free_port()), "-sd", str(store),
                               "-P", str(data / "nats-server.pid")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (data / "nats-server.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with EmbeddedBroker(data) as b:
            assert orphan.wait(timeout=20) is not None  # stopped (TERM: it flushed its store)
            assert b.proc is not None and b.proc.poll() is None
    finally:
        if orphan.poll() is None:
            orphan.send_signal(signal.SIGKILL)
            orphan.wait()
