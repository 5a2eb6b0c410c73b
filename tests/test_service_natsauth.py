"""The NATS users of the service against a real nats-server started with the config
``natsauth.write_fleet`` writes: the worker user can do a worker's work and nothing
more; a connection without credentials is refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("nats")
pytest.importorskip("bcrypt")

from test_service import _cli, _env, _one_line_error  # noqa: E402 - after the skips


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from wanrender.service.broker import EmbeddedBroker
    from wanrender.service.natsauth import read_creds, write_fleet

    folder = tmp_path_factory.mktemp("fleet")
    paths = write_fleet(folder / "nats")
    with EmbeddedBroker(folder / "nats", config=paths["config"]) as b:
        yield b, paths, read_creds(paths["api"]), read_creds(paths["worker"])


def test_the_files_are_private_and_the_config_has_no_clear_password(fleet) -> None:
    from wanrender.service.natsauth import write_fleet

    b, paths, api, worker = fleet
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == 0o600
    conf = paths["config"].read_text()
    assert api.password not in conf and worker.password not in conf and "$2b$" in conf
    assert json.loads(paths["worker"].read_text()) == {"user": "worker", "password": worker.password}
    again = write_fleet(paths["config"].parent)  # kept: workers' files stay valid across restarts
    assert json.loads(again["worker"].read_text())["password"] == worker.password


def test_a_worker_with_its_creds_works_and_cannot_publish_a_job(fleet) -> None:
    import nats

    from wanrender.service.broker import JOBS_KV, STREAM, SUBJECT, QueueConfig, connect, ensure_jetstream
    from wanrender.service.natsauth import open_jetstream
    from wanrender.service.routing import Capability, Puller, caps_bucket, route_name, subject_of

    b, _, api, worker = fleet

    async def scenario():
        admin = await connect(api.url(b.url), "test-api")
        ajs = admin.jetstream()
        await ensure_jetstream(ajs, QueueConfig())
        await ajs.publish(SUBJECT, b"job-1", headers={"Nats-Msg-Id": "job-1"})
        nc = await connect(worker.url(b.url), "test-worker")
        try:
            js = nc.jetstream()
            jobs_kv, workers_kv = await open_jetstream(js)
            cap = Capability("m0", 8, "cpu", "cpu", None, {})
            await (await caps_bucket(js)).put(cap.key, b"{}")  # registers its capability
            puller = Puller(nc, js, cap, QueueConfig())
            await puller.start()  # creates its class's consumers (the one create it may do)
            msg = await puller.next(asyncio.Event(), 5.0)  # list, pull, extend the lease, ack
            await msg.in_progress()
            await msg.ack()
            route = route_name("m0", 23)  # moving a job to a bigger class: publish to a class subject
            await js.publish(subject_of(route, "high"), b"job-1", headers={"Nats-Msg-Id": "job-1.m0.t23"})
            await ajs.purge_stream(STREAM)
            await puller.stop()
            await jobs_kv.put("job-1", b"{}")
            await workers_kv.put("w1", b"{}")
            await workers_kv.delete("w1")  # a worker leaving (the later test expects no worker)
            before = (await ajs.stream_info(STREAM)).state.messages
            violations: list[str] = []

            async def seen(e):
                violations.append(str(e))

            sneaky = await nats.connect(worker.url(b.url), error_cb=seen)  # the same user, errors collected
            await sneaky.publish(SUBJECT, b"sneaky")  # a worker may not queue jobs ...
            await sneaky.publish(f"$JS.API.STREAM.DELETE.{STREAM}", b"")  # ... nor delete the stream
            # ... nor create a consumer on the generic subjects (a class consumer's filter only)
            await sneaky.publish(f"$JS.API.CONSUMER.CREATE.{STREAM}.x.{SUBJECT}", b"{}")
            await sneaky.flush()
            deadline = time.monotonic() + 5
            while len(violations) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await sneaky.close()
            after = (await ajs.stream_info(STREAM)).state.messages
            assert (await (await ajs.key_value(JOBS_KV)).get("job-1")).value == b"{}"
            return violations, before, after
        finally:
            await nc.close()
            await admin.close()

    violations, before, after = asyncio.run(scenario())
    assert any("permissions violation for publish" in v.lower() and "wanrender.jobs.render" in v for v in violations)
    assert any("stream.delete" in v.lower() for v in violations), violations
    assert any("consumer.create" in v.lower() for v in violations), violations
    assert after == before == 0  # the job was acked; the sneaky publish never landed


def test_a_worker_without_creds_is_refused_in_one_line(fleet, demo_set, tmp_path: Path) -> None:
    b, paths, _, _ = fleet
    home, _, _ = demo_set
    env = _env(home)
    r = _cli(env, "worker", "--nats", b.url, "--data", str(tmp_path), "--device", "cpu", timeout=60)
    _one_line_error(r, 2, "refused the credentials", "--creds")
    bad = tmp_path / "bad.creds"
    bad.write_text('{"user": "worker", "password": "guess"}')
    r = _cli(env, "worker", "--nats", b.url, "--data", str(tmp_path), "--device", "cpu", "--creds", str(bad))
    _one_line_error(r, 2, "refused the credentials")
    assert "guess" not in r.stderr
    r = _cli(env, "worker", "--nats", b.url, "--data", str(tmp_path), "--creds", str(tmp_path / "none.creds"))
    _one_line_error(r, 2, "no such file")


def test_a_worker_pointed_where_no_nats_answers_says_so_in_one_line(demo_set, tmp_path: Path) -> None:
    """nats-py retries a first connection for ever when reconnects are unbounded: the
    worker printed a warning every 0.5 s and ignored SIGTERM. Now it waits
    WANRENDER_NATS_WAIT seconds, quietly, then stops in one line."""
    from wanrender.service.broker import free_port

    home, _, _ = demo_set
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    r = _cli(_env(home) | {"WANRENDER_NATS_WAIT": "2"}, "worker", "--nats", url, "--data", str(tmp_path),
             "--device", "cpu", timeout=60)  # fmt: skip
    _one_line_error(r, 2, f"cannot reach NATS at {url}", "nothing answered for 2 s", "--nats")
    assert time.monotonic() - t0 < 30
    assert "WARNING" not in r.stdout + r.stderr
    r = _cli(_env(home) | {"WANRENDER_NATS_WAIT": "soon"}, "worker", "--nats", url, "--data", str(tmp_path),
             "--device", "cpu", timeout=60)  # fmt: skip
    _one_line_error(r, 2, "WANRENDER_NATS_WAIT='soon' is invalid")


def test_a_worker_waiting_for_nats_stops_at_once_on_sigterm(demo_set, tmp_path: Path) -> None:
    """docker stop, or serve ending its children: a worker still waiting for its first
    NATS connection leaves at once, not after WANRENDER_NATS_WAIT."""
    import signal

    from wanrender.service.broker import free_port

    home, _, _ = demo_set
    proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "worker", "--nats",
                             f"nats://127.0.0.1:{free_port()}", "--data", str(tmp_path), "--device", "cpu"],
                            env=_env(home) | {"WANRENDER_NATS_WAIT": "120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(4)  # past its start: waiting for NATS now
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 15, "the worker waited for NATS past its SIGTERM"
        assert "Traceback" not in out + err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nats_creds_command_writes_a_fleet_folder(demo_set, tmp_path: Path) -> None:
    home, _, _ = demo_set
    r = subprocess.run([sys.executable, "-m", "wanrender.cli", "nats-creds", str(tmp_path / "fleet")],
                       env=_env(home), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "fleet").iterdir()) == ["api.creds", "nats.conf", "worker.creds"]


def test_serve_runs_the_api_alone_against_a_fleet_nats_with_the_api_user(fleet, demo_set, tmp_path: Path) -> None:
    """The API container's command (docker/api.Dockerfile): no embedded server, no local worker."""
    import signal

    from test_service import _wait

    from wanrender.service.broker import free_port
    from wanrender.service.client import Client

    b, paths, _, _ = fleet
    home, _, _ = demo_set
    env = _env(home)
    _one_line_error(
        _cli(env, "serve", "--data", str(tmp_path), "--creds", str(paths["api"])), 2, "--creds goes with --nats"
    )
    # Local workers would connect as the api user, which may not ack or renew a lease.
    _one_line_error(_cli(env, "serve", "--nats", b.url, "--creds", str(paths["api"]), "--workers", "1", "--data",
                         str(tmp_path / "x"), "--device", "cpu"), 2, "local workers need the fleet's worker credentials")  # fmt: skip
    assert not (tmp_path / "x").exists()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "serve", "--nats", b.url, "--creds", str(paths["api"]),
                             "--workers", "0", "--data", str(tmp_path / "api"), "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")
    try:

        def up():
            if proc.poll() is not None:
                raise AssertionError(proc.communicate())
            try:
                return client._json("GET", "/health")["ok"]
            except Exception:  # noqa: BLE001 - not listening yet
                return None

        assert _wait(up, 60, 0.2)
        assert client.workers() == []
        time.sleep(0.5)  # serve announces itself up to a poll (50 ms) after it listens: not a Ctrl-C before that
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in out + err, err
    assert "no local worker" in err and paths["api"].read_text().split('"')[-2] not in err  # no password shown
    assert not (tmp_path / "api" / "nats").exists()  # no embedded server was started
