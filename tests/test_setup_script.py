"""`scripts/run.sh` installs the torch build the README promises, and says what it does.

The script runs for real; only the virtual environment's `python` is a stand-in that
records its arguments (a real install would download gigabytes, which CI cannot do),
and `nvidia-smi` is present or absent on PATH as a driver would make it.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  *"import torch"*) exit 1 ;;                       # no torch yet: the script must install one
  *index-url*) [ -n "$NO_CPU_INDEX" ] && exit 1 ;;  # the CPU index unreachable
esac
exit 0
"""


def _run(tmp_path: Path, driver: bool, cpu_index_reachable: bool = True) -> tuple[subprocess.CompletedProcess, str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON.format(log=log))
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    tools = tmp_path / "tools"
    tools.mkdir()
    if driver:
        smi = tools / "nvidia-smi"
        smi.write_text("#!/bin/sh\nexit 0\n")
        smi.chmod(0o755)
    env = {**os.environ, "WANRENDER_VENV": str(venv), "PATH": f"{tools}:/usr/bin:/bin"}
    env.pop("WANRENDER_TORCH", None)
    if not cpu_index_reachable:
        env["NO_CPU_INDEX"] = "1"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "shell"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    return res, log.read_text() if log.exists() else ""


def test_without_a_driver_the_cpu_build_is_installed_with_progress(tmp_path: Path) -> None:
    res, log = _run(tmp_path, driver=False)
    assert res.returncode == 0, res.stderr
    assert "--index-url https://download.pytorch.org/whl/cpu" in log and "torch==2.13.0" in log
    assert "[setup] installing torch (CPU build" in res.stderr and "[setup] done" in res.stderr
    assert "-e .[test]" in log


def test_an_unreachable_cpu_index_falls_back_to_the_pin(tmp_path: Path) -> None:
    res, log = _run(tmp_path, driver=False, cpu_index_reachable=False)
    assert res.returncode == 0, res.stderr
    installs = [line for line in log.splitlines() if "torch==2.13.0" in line]
    assert len(installs) == 2 and "index-url" not in installs[1]
    assert "not reachable" in res.stderr


def test_with_a_driver_the_cuda_build_is_installed(tmp_path: Path) -> None:
    res, log = _run(tmp_path, driver=True)
    assert res.returncode == 0, res.stderr
    assert "index-url" not in log and any(line.endswith("install -q torch") for line in log.splitlines())
    assert "CUDA build" in res.stderr
