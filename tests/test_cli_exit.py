"""A command that rendered on a GPU ends without the interpreter's teardown
(cli_errors.skip_teardown / leave): what it printed still arrives, the exit code is 0,
and only the console entry acts on it. Run in fresh interpreters: the point is how a
process ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROGRAM = """
import atexit, sys
from wanrender.cli_errors import leave, skip_teardown
atexit.register(lambda: print("teardown ran", flush=True))
print("video written", end="")  # unflushed on purpose: leave must flush it
if "skip" in sys.argv:
    skip_teardown()
leave(int(sys.argv[1]))
print(" - returned")
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})  # fmt: skip


def test_a_finished_gpu_render_leaves_without_the_teardown() -> None:
    r = _run("0", "skip")
    assert r.returncode == 0 and r.stdout == "video written"  # flushed, and no atexit teardown


def test_without_the_request_or_after_an_error_the_process_ends_normally() -> None:
    r = _run("0")
    assert r.returncode == 0 and r.stdout == "video written - returned\nteardown ran\n"
    r = _run("2", "skip")  # an error's exit code: the usual way out
    assert r.stdout == "video written - returned\nteardown ran\n"
