"""`generate --gpus N` and `batch --pipeline experts` as a user runs them: the CLI in a
subprocess, on the demo models, the ranks as CPU processes over gloo (the code path
of the GPUs with nccl). Spawns are slow on two cores: one spawn per test where it can.

Tolerance: the ranks run their matmuls on other row counts (sequence shards) or
other thread counts than one process does, so the latents differ by fp32 rounding
(test_parallel.py: below 1e-6 relative); after the VAE and rounding to uint8 that
moves a pixel by at most one level, rarely: measured 1-4 in 100,000 values differ.
A real error (a wrong shard, a pad token attended to, a lost hand-off) changes most
values by far more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--preset", "demo", "--frames", "5", "--size", "80x64"]


def _env(home: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "WANRENDER_HOME": str(home), "OMP_NUM_THREADS": "1"}


def _cli(args: list, home: Path, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *map(str, args)], env=_env(home), cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kw)  # fmt: skip


def _png_frames(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(Image.open(f)) for f in sorted(folder.glob("frame_*.png"))]).astype(int)


def _same_within_rounding(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1
    assert (a != b).mean() < 1e-3


def _no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stdout + p.stderr


def test_generate_on_two_processes_matches_one(demo_set, tmp_path: Path) -> None:
    home, files, image = demo_set
    base = ["generate", image, "-p", "slow dolly-in", "--models", files.high.parent, *TINY, "--device", "cpu",
            "--frames-png"]  # fmt: skip
    one = _cli([*base, "-o", "one.mp4"], home, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli([*base, "--gpus", "2", "-o", "two.mp4"], home, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    _no_traceback(two)
    _same_within_rounding(_png_frames(tmp_path / "one_frames"), _png_frames(tmp_path / "two_frames"))
    side_one = json.loads((tmp_path / "one.json").read_text())
    side_two = json.loads((tmp_path / "two.json").read_text())
    assert side_one["plan"]["parallel"] == {"gpus": 1, "mode": "none"}
    assert side_two["plan"]["parallel"]["gpus"] == 2 and side_two["plan"]["parallel"]["mode"] == "ulysses"
    assert side_two["frames"] == 5 and side_two["size"] == [80, 64]
    # only rank 0 wrote, and nothing half-written is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.mp4", "one_frames", "two.json",
                                                          "two.mp4", "two_frames"]  # fmt: skip


def test_bad_gpu_counts_are_one_line_before_any_process(demo_set, tmp_path: Path) -> None:
    home, files, image = demo_set
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"earlier video")
    base = ["generate", image, "-p", "x", "--models", files.high.parent, *TINY, "-o", out, "--overwrite"]
    cases = {
        # the demo DiT has 2 heads (Wan: 40)
        ("--device", "cpu", "--gpus", "4"): "error: 4 GPUs cannot share the DiT's 2 attention heads evenly — use 2 "
        "(a divisor of 2)",
        ("--gpus", "2"): "error: --gpus 2 needs CUDA GPUs and none is visible — run on a GPU machine, or pass "
        "--device cpu to run that many CPU processes (tests)",
        ("--device", "cpu", "--gpus", "2", "--memory", "stream"): "error: --memory 'stream' cannot be used with 2 "
        "GPUs: every GPU keeps both experts resident — use --memory auto or resident",
        ("--device", "cpu", "--gpus", "0"): "error: 0 GPUs asked — use 1 or more",
    }
    for extra, line in cases.items():
        p = _cli([*base, *extra], home, tmp_path)
        assert p.returncode == 2, (extra, p.stderr)
        _no_traceback(p)
        assert p.stderr.strip().replace("\n", " ") == line, extra
    assert out.read_bytes() == b"earlier video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank processes in /proc")
def test_a_rank_that_dies_ends_the_run_without_outputs(demo_set, tmp_path: Path) -> None:
    """A GPU that drops out: one rank is killed from outside while the ranks load; the
    other is stopped, the command ends in one line, and no output is written."""
    home, files, image = demo_set
    args = ["generate", image, "-p", "x", "--models", files.high.parent, *TINY, "--device", "cpu", "--gpus", "2",
            "-o", "v.mp4"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", *map(str, args)], env=_env(home), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        ranks = sorted(p for p in _children(proc.pid) if "multiprocessing" in _cmdline(p) and
                       "resource_tracker" not in _cmdline(p))  # fmt: skip
        if len(ranks) == 2:
            killed = ranks[1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=120)
    assert killed is not None, stderr[-2000:]
    assert proc.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert lines[0] == "rendering on 2 CPU processes (sequence parallel); rank 0 reports:"
    msg = lines[-1]  # the error: one line
    assert len(lines) == 2
    assert msg.startswith("error: rank ") and "of 2 (process " in msg and "stopped (killed by SIGKILL)" in msg, msg
    assert "the other ranks were stopped too" in msg
    assert list(tmp_path.iterdir()) == []


def test_expert_pipeline_equals_sequential_and_overlaps(demo_set, tmp_path: Path) -> None:
    from wanrender.request import from_preset
    from wanrender.runner import Runner

    home, files, image = demo_set
    jobs = [{"image": str(image), "prompt": p, "seed": s, "out": f"p{s}.mp4"}
            for s, p in ((1, "slow dolly-in"), (2, "gentle pan"), (3, "zoom"))]  # fmt: skip
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))
    p = _cli(["batch", "jobs.yaml", "--pipeline", "experts", "--models", files.high.parent, *TINY, "--device", "cpu",
              "--frames-png"], home, tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    _no_traceback(p)
    assert [ln.split()[:3] for ln in p.stdout.splitlines()] == [["job", "1:", "p1.mp4"], ["job", "2:", "p2.mp4"],
                                                               ["job", "3:", "p3.mp4"]]  # fmt: skip
    runner = Runner("cpu")  # the sequential reference, in this process
    sides = []
    for job in jobs:
        req = from_preset("demo", image, job["prompt"], frames=5, width=80, height=64, seed=job["seed"],
                          out=tmp_path / "ref.mp4")  # fmt: skip
        ref = runner.render(req, files, write=False)
        _same_within_rounding(_png_frames(tmp_path / job["out"].replace(".mp4", "_frames")), ref.frames.astype(int))
        side = json.loads((tmp_path / job["out"].replace(".mp4", ".json")).read_text())
        assert side["plan"]["parallel"]["mode"] == "experts" and side["seed"] == job["seed"]
        sides.append(side["plan"]["parallel"])
    for k in range(2):  # A started job k+1 before B had finished job k
        assert sides[k + 1]["side_a"]["start"] < sides[k]["side_b"]["end"]
        assert sides[k]["side_a"]["end"] <= sides[k]["side_b"]["start"]


def test_expert_pipeline_refuses_bad_jobs_before_starting(demo_set, tmp_path: Path) -> None:
    home, files, image = demo_set
    (tmp_path / "jobs.yaml").write_text(f"- {{image: {image}, prompt: a, out: same.mp4}}\n"
                                        f"- {{image: {image}, prompt: b, out: same.mp4}}\n")  # fmt: skip
    (tmp_path / "bad.yaml").write_text(f"- {{image: {image}, promt: a}}\n")
    base = ["--models", files.high.parent, *TINY, "--device", "cpu"]
    for args, line in (
        (["jobs.yaml", "--pipeline", "experts"], "error: jobs 1 and 2 write the same output "),
        (["bad.yaml", "--pipeline", "experts"], "error: bad.yaml: job 1 has unknown key 'promt' — use image, prompt"),
        (["jobs.yaml", "--pipeline", "tensor"], "error: --pipeline 'tensor' is invalid — use sequential or experts"),
    ):
        p = _cli(["batch", *args, *base], home, tmp_path)
        assert p.returncode == 2, p.stderr
        _no_traceback(p)
        assert p.stderr.replace("\n", " ").startswith(line), p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.yaml", "jobs.yaml"]
