"""Service workers render with the GPU profile, as `generate` does (issue #15): `serve`
resolves `--profile` once for its device, fills each job's precision, attention and
compile from the bucket nearest the job's size, records them in the sidecar and
advertises the profile in GET /v1/workers. CPU only: a user profile matching this
CPU's name, with knobs a CPU runs that differ from the defaults."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import TINY, cli, demo_home, env, final, one_line_error, start_serve  # noqa: E402

# Valid on a CPU, and not what a job gets without a profile (precision auto, attention auto -> sdpa).
KNOBS = {"precision": "bf16", "attention": "reference", "compile": "off"}


home = pytest.fixture(scope="module", name="home")(demo_home)


@pytest.fixture(scope="module")
def image():
    from wanrender.demo import demo_image

    return demo_image()


def _profile_doc(device: str, knobs: dict) -> dict:
    return {"schema": 1, "device": device, "match": [device], "estimated": False,
            "provenance": {"source": "test"},
            "buckets": [{"name": "tiny", "frames": 5, "width": 80, "height": 64, "knobs": knobs}]}  # fmt: skip


@pytest.fixture(scope="module")
def user_profile(home) -> Path:
    """A profile in $WANRENDER_HOME/profiles matching this CPU, as `wanrender tune` would write."""
    from wanrender.runtime.hardware import device_name

    path = home / "profiles" / "this-cpu.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_profile_doc(device_name("cpu"), KNOBS)))  # safe_dump quotes 'off'
    return path


def _render(home: Path, image: Path, data: Path, *args: str) -> tuple[dict, dict, str]:
    """One tiny job through `serve` (with ``args``): (its sidecar, the worker's record, serve's output)."""
    proc, client = start_serve(env(home), data, *args)
    try:
        (worker,) = client.workers()
        job = client.submit(image, {"prompt": "a slow pan", **TINY})
        done = final(client, job["id"])
        assert done["state"] == "succeeded", done
        side = json.loads((data / "jobs" / job["id"] / "result" / "result.json").read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in out + err, err[-3000:]
    return side, worker, " ".join((out + err).split())  # the log goes to stdout; rich wraps its lines


def test_serve_renders_jobs_with_the_profile_of_its_device(home, image, user_profile, tmp_path) -> None:
    from wanrender.runtime.hardware import device_name

    side, worker, err = _render(home, image, tmp_path / "data")
    described = f"this-cpu.yaml ({device_name('cpu')}, measured)"
    assert worker["capability"]["profile"] == described  # GET /v1/workers shows it
    assert f"GPU profile {described}" in err, err
    assert "job " in err and "profile this-cpu.yaml" in err and "attention reference" in err, err
    req = side["request"]
    assert {k: req[k] for k in KNOBS} == KNOBS  # the sidecar records the profile's knobs...
    assert req["extra"]["profile"]["path"] == str(user_profile) and req["extra"]["profile"]["bucket"] == "tiny"
    assert req["extra"]["profile"]["applied"] == KNOBS
    assert side["plan"]["runtime"]["attention"] == "reference"  # ...and the render ran with them


def test_serve_with_profile_off_renders_with_the_defaults(home, image, user_profile, tmp_path) -> None:
    side, worker, err = _render(home, image, tmp_path / "data", "--profile", "off")
    assert worker["capability"]["profile"] is None
    assert "no GPU profile" in err, err
    req = side["request"]
    assert (req["precision"], req["attention"], req["compile"]) == ("auto", "auto", "off")
    assert "profile" not in req["extra"]
    assert side["plan"]["runtime"]["attention"] != "reference"


def test_a_bad_profile_file_is_one_line_before_anything_starts(home, tmp_path) -> None:
    e = env(home)
    data = tmp_path / "data"
    r = cli(e, "serve", "--data", str(data), "--device", "cpu", "--profile", str(tmp_path / "missing.yaml"))
    one_line_error(r, 2, "missing.yaml", "cannot read the profile")
    assert not data.exists()  # nothing started, nothing written
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema: 1\nmatch: [x]\n")
    r = cli(e, "worker", "--nats", "nats://127.0.0.1:1", "--device", "cpu", "--profile", str(broken))
    one_line_error(r, 2, "broken.yaml", "no buckets")
    # A profile whose knobs this device cannot run: named explicitly, it is refused (as generate does).
    fp8 = tmp_path / "fp8.yaml"
    fp8.write_text(yaml.safe_dump(_profile_doc("cpu", {**KNOBS, "precision": "fp8"})))
    r = cli(e, "serve", "--data", str(data), "--device", "cpu", "--profile", str(fp8))
    one_line_error(r, 2, "fp8.yaml", "does not fit this device", "precision fp8 cannot run here")
    assert not data.exists()
    assert broken.read_text() == "schema: 1\nmatch: [x]\n"  # the user's files are left as they were


def test_child_workers_get_the_same_profile(home, image, user_profile, tmp_path) -> None:
    """`serve --workers 2`: the second worker is a child `wanrender worker`; the profile serve
    was given reaches it too (without it, the child's `auto` would pick this-cpu.yaml)."""
    import os

    from wanrender.runtime.hardware import device_name

    named = tmp_path / "named.yaml"
    named.write_text(user_profile.read_text())
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the child resolves the same file whatever its own working directory
    try:
        proc, client = start_serve(env(home), tmp_path / "data", "--workers", "2", "--profile", "named.yaml")
    finally:
        os.chdir(cwd)
    try:
        from helpers_service import wait

        workers = wait(lambda: w if len(w := client.workers()) == 2 else None, 60, 0.2)
        described = f"named.yaml ({device_name('cpu')}, measured)"
        assert [w["capability"]["profile"] for w in workers] == [described, described], workers
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_the_profile_keywords_take_any_case(user_profile) -> None:
    """`--profile AUTO` / `Off` are the keywords, not files named so."""
    from wanrender.runtime.profiles import apply_profile, profile_spec
    from wanrender.service.worker import worker_profile

    assert worker_profile("AUTO", "cpu").path == worker_profile("auto", "cpu").path == str(user_profile)
    assert worker_profile(" Off ", "cpu") is None
    req = object()
    assert apply_profile(req, "OFF", "cpu", set()) == (req, None)
    assert profile_spec("my-AUTO.yaml") == "my-AUTO.yaml"
