"""benchmarks/service_overhead.py's GPU mode (``--full --models DIR``) run on the CPU with
tiny files in the users' layout (``models random --size tiny``): the code that an H200
runs, end to end (a direct Runner, then ``serve --models`` and the worker's sidecar), and
its one-line refusals before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("nats")

from helpers_service import cli, env  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "service_overhead.py"


def bench(e: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=e, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def one_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    models = tmp_path_factory.mktemp("models")
    e = env(home)
    r = cli(e, "models", "random", "--dir", str(models), "--size", "tiny")
    assert r.returncode == 0, r.stderr
    return e, models


def test_refusals_are_one_line_before_any_model_loads(tiny, tmp_path):
    e, models = tiny
    one_line(bench(e, "--full"), "--full needs --models")
    one_line(bench(e, "--models", str(models)), "--models goes with --full")
    one_line(bench(e, "--full", "--models", str(tmp_path / "none")), "not a folder")
    one_line(bench(e, "--jobs", "0"), "--jobs 0 is invalid")
    one_line(bench(e, "--full", "--models", str(models), "--device", "cpu", "--size", "63x64"), "width 63")
    one_line(bench(e, "--full", "--models", str(models), "--device", "cpu", "--warmup-frames", "4"), "frames")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_full_mode_on_tiny_files_end_to_end(tiny, tmp_path):
    e, models = tiny
    out = tmp_path / "numbers.json"
    r = bench(e, "--full", "--models", str(models), "--device", "cpu", "--frames", "5", "--size", "64x64",
              "--warmup-frames", "1", "--skip-throughput", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "request: turbo, 5 frames at 64x64 (WxH)" in r.stdout
    assert "service overhead per warm job: median" in r.stdout
    got = json.loads(out.read_text())
    assert got["params"] == {"preset": "turbo", "frames": 5, "width": 64, "height": 64}
    assert len(got["direct"]) == len(got["service"]["jobs"]) == 2  # the warm-up and one job
    for job in got["direct"] + got["service"]["jobs"]:
        assert job["wall_s"] > 0 and job["stages_s"] > 0 and job["plan"]["precision"]
    warm = got["service"]["jobs"][1]
    assert warm["first_progress_s"] is not None and warm["server_s"] <= warm["wall_s"]
