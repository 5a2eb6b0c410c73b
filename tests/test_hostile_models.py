"""Issue #16: nothing lost, fail before the work — `models fetch`, `models check`, `plan`.

Every case runs the CLI as a subprocess and checks the exit code, the one-line
message, that no traceback is printed, and what is left on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_hub import FakeHub

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    e.update({"PYTHONPATH": str(SRC), "COLUMNS": "400", "NO_PROXY": "127.0.0.1,localhost"}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *args], env=e, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess) -> str:
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


# --- models fetch ------------------------------------------------------------------------


def _payloads() -> dict[str, bytes]:
    from wanrender.fetch import STANDARD_SET

    return {f"{f.repo}/{f.path}": hashlib.sha256(f.dest.encode()).digest() * (500 + 40 * i)
            for i, f in enumerate(STANDARD_SET)}  # fmt: skip


def _hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "WANRENDER_HOME": str(tmp_path / "home")}  # fmt: skip


def test_fetch_twice_downloads_once_and_says_what_it_skipped(tmp_path: Path) -> None:
    from wanrender.fetch import MANIFEST, STANDARD_SET

    payloads = _payloads()
    dest = tmp_path / "models"
    with FakeHub(payloads) as hub:
        env = _hub_env(hub, tmp_path)
        r = run_cli("models", "fetch", "--dir", str(dest), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(hub.gets()) == len(STANDARD_SET)
        for f in STANDARD_SET:
            assert (dest / f.dest).read_bytes() == payloads[f"{f.repo}/{f.path}"]
        assert not (dest / ".download").exists()
        recorded = json.loads((dest / MANIFEST).read_text())["files"]
        assert set(recorded) == {f.dest for f in STANDARD_SET}
        mtimes = {f.dest: (dest / f.dest).stat().st_mtime_ns for f in STANDARD_SET}

        hub.log.clear()
        r = run_cli("models", "fetch", "--dir", str(dest), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert hub.gets() == []  # nothing downloaded again
        assert (r.stdout + r.stderr).count("already complete, skipped") == len(STANDARD_SET)
        assert {f.dest: (dest / f.dest).stat().st_mtime_ns for f in STANDARD_SET} == mtimes

        # Files that were there before any manifest (copied in by hand) are hashed once, not downloaded.
        (dest / MANIFEST).unlink()
        r = run_cli("models", "fetch", "--dir", str(dest), env=env)
        assert r.returncode == 0 and hub.gets() == [], r.stdout + r.stderr
        assert "checksum matches), skipped" in r.stdout + r.stderr


def test_fetch_resumes_a_dropped_download_and_keeps_finished_files(tmp_path: Path) -> None:
    from wanrender.fetch import STANDARD_SET

    payloads = _payloads()
    dest = tmp_path / "models"
    dropped = STANDARD_SET[2]
    key = f"{dropped.repo}/{dropped.path}"
    # huggingface_hub writes in 10 MB chunks: a drop loses the unfinished chunk, so the
    # file must be larger than one chunk for bytes to survive (as a 14 GB expert is).
    payloads[key] = os.urandom(13 << 20)
    with FakeHub(payloads) as hub:
        env = _hub_env(hub, tmp_path)
        hub.drop, hub.cut = {key}, 11 << 20
        r = run_cli("models", "fetch", "--dir", str(dest), env=env)
        assert r.returncode == 2
        line = one_error_line(r)
        assert dropped.path in line and "finished files are kept" in line, line
        assert (dest / STANDARD_SET[0].dest).is_file() and (dest / STANDARD_SET[1].dest).is_file()
        assert not (dest / dropped.dest).exists()  # never under its final name half-written
        partial = [p for p in (dest / ".download").rglob("*.part")]
        assert len(partial) == 1
        kept = partial[0].stat().st_size
        assert 0 < kept < len(payloads[key])

        hub.drop, hub.log = set(), []
        hub.served.clear()
        r = run_cli("models", "fetch", "--dir", str(dest), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        got = dict(hub.gets())
        assert STANDARD_SET[0].repo + "/" + STANDARD_SET[0].path not in got  # finished: not fetched again
        assert got[key] == f"bytes={kept}-"  # the partial bytes were kept and only the rest requested
        assert hub.served[key] == len(payloads[key]) - kept
        assert (dest / dropped.dest).read_bytes() == payloads[key]


def _unwritable(tmp_path: Path) -> Path:
    """A folder that cannot be created: under a read-only one, or in sysfs for root
    (root writes through any mode bits)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel/wanrender-fetch-test")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "models"


def test_fetch_refuses_an_unwritable_dir_before_downloading(tmp_path: Path) -> None:
    target = _unwritable(tmp_path)
    with FakeHub(_payloads()) as hub:
        r = run_cli("models", "fetch", "--dir", str(target), env=_hub_env(hub, tmp_path))
        assert hub.log == []  # not even the metadata was asked for
    assert r.returncode == 2
    line = one_error_line(r)
    assert f"cannot write to {target}:" in line and "choose a writable --dir" in line, line
    assert not target.exists()


def test_fetch_rife_refuses_an_unwritable_cache(tmp_path: Path) -> None:
    home = _unwritable(tmp_path)
    r = run_cli("models", "fetch", "rife", env={"WANRENDER_HOME": str(home)})
    assert r.returncode == 2
    line = one_error_line(r)
    assert f"cannot write to {home}" in line and "set WANRENDER_HOME to a writable folder" in line, line
    assert not home.exists()


def test_fetch_refuses_a_set_larger_than_the_free_space(tmp_path: Path) -> None:
    from wanrender.fetch import STANDARD_SET

    payloads = _payloads()
    dest = tmp_path / "models"
    with FakeHub(payloads) as hub:
        f = STANDARD_SET[0]
        hub.claimed_size[f"{f.repo}/{f.path}"] = 10**16  # 10 PB: more than any test machine has
        r = run_cli("models", "fetch", "--dir", str(dest), env=_hub_env(hub, tmp_path))
        assert hub.gets() == []
    assert r.returncode == 2
    line = one_error_line(r)
    assert "need 10000000.0 GB but only" in line and "free space or choose another --dir" in line, line
    assert [p.name for p in dest.iterdir()] == []


# --- hostile safetensors headers -------------------------------------------------------------


def _raw(path: Path, header: bytes, n: int | None = None, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


def _entry(**kw) -> bytes:
    h = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **kw}
    return json.dumps({"w": h}).encode()


HOSTILE = {
    "deep.safetensors": lambda p: _raw(p, b"[" * 100_000 + b"]" * 100_000),
    "deep_object.safetensors": lambda p: _raw(p, b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    "huge_length.safetensors": lambda p: _raw(p, b"{}", n=2**63),
    "dtype_list.safetensors": lambda p: _raw(p, _entry(dtype=["F32"]), data=b"\0" * 4),
    "infinite_offset.safetensors": lambda p: _raw(p, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}'),
    "negative_offset.safetensors": lambda p: _raw(p, _entry(shape=[2], data_offsets=[-4, 4]), data=b"\0" * 8),
    "metadata_list.safetensors": lambda p: _raw(p, json.dumps({"__metadata__": [1, 2]}).encode()),
    "not_utf8.safetensors": lambda p: _raw(p, b'{"\xff\xfe": 1}'),
    # A valid header that claims to be a VAE but whose conv2 has rank 0.
    "rank0_vae.safetensors": lambda p: _raw(p, json.dumps({k: {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}
                                                           for k in ("encoder.conv1.weight", "decoder.conv1.weight",
                                                                     "conv2.weight")}).encode(), data=b"\0" * 4),
    # Pickled dicts of tensors that are not state dicts (found in a user's folder of latents).
    "dtype_keys.pt": lambda p: _torch_save(p, {__import__("torch").float32: __import__("torch").ones(2)}),
    "int_keys.pt": lambda p: _torch_save(p, {0: __import__("torch").ones(2)}),
}  # fmt: skip


def _torch_save(path: Path, obj: object) -> None:
    import torch

    torch.save(obj, path)


@pytest.fixture(scope="module")
def demo_models(demo_set) -> Path:
    return demo_set[1].high.parent


def test_check_reports_each_broken_file_and_still_lists_the_others(demo_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(demo_models, folder)
    for name, make in HOSTILE.items():
        make(folder / name)
    bad_dir = folder / "deep_config"  # a diffusers-style folder whose config.json is hostile
    bad_dir.mkdir()
    shutil.copy(demo_models / "wan_2.1_vae_demo.safetensors", bad_dir / "diffusion_pytorch_model.safetensors")
    (bad_dir / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "deep.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    r = run_cli("models", "check", str(folder), timeout=300)
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "RecursionError" not in out, out
    assert r.returncode == 0, out
    rows = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") > 2}
    for name in HOSTILE:
        assert name in rows and "unreadable" in rows[name], (name, out)
    assert "unreadable" in rows["deep_config"] and "unreadable" in rows["deep.safetensors.index.json"], out
    assert "unreadable" not in rows["wan2.2_i2v_high_noise_demo_fp8_scaled.safetensors"]
    assert "✓ high-noise expert: wan2.2_i2v_high_noise_demo_fp8_scaled.safetensors" in out
    assert "Ready to render." in out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing touched


@pytest.mark.parametrize(
    ("name", "flag"),
    [("deep.safetensors", "--high"), ("huge_length.safetensors", "--low"), ("dtype_list.safetensors", "--high"),
     ("rank0_vae.safetensors", "--vae")],
)  # fmt: skip
def test_generate_names_the_broken_file_in_one_line(demo_models: Path, tmp_path: Path, name: str, flag: str) -> None:
    from PIL import Image

    bad = HOSTILE[name](tmp_path / name)
    image, out = tmp_path / "start.png", tmp_path / "out.mp4"
    Image.new("RGB", (64, 64), (90, 120, 150)).save(image)
    r = run_cli("generate", str(image), "--prompt", "x", "--models", str(demo_models),
                flag, str(bad), "--device", "cpu", "-o", str(out), env={"WANRENDER_HOME": str(tmp_path / "h")})  # fmt: skip
    assert r.returncode == 2
    line = one_error_line(r)
    assert str(bad) in line and "download it again" in line, line
    assert not out.exists()


# --- plan: every size flag, and the profile generate would use ---------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--reserve-vram", "nan"), "--reserve-vram"),
        (("--reserve-vram", "inf"), "--reserve-vram"),
        (("--reserve-vram", "-8"), "--reserve-vram"),
        (("--reserve-vram", "500"), "--reserve-vram"),  # more than the card has
        (("--vram", "nan"), "--vram"),
        (("--vram", "-24GiB"), "--vram"),
        (("--ram", "inf"), "--ram"),
    ],
)
def test_plan_refuses_bad_sizes_naming_the_flag(args: tuple[str, str], flag: str) -> None:
    r = run_cli("plan", "--gpu", "h200", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert line.startswith(f"error: {flag} "), line
    assert "GiB" not in r.stdout  # no plan was printed


def test_plan_uses_the_profile_generate_uses() -> None:
    r = run_cli("plan", "--gpu", "h200")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out
    assert "profile h200.yaml" in out and "precision fp8, attention sage8, compile default" in out, out
    assert "precision fp8 (compiled-fp8)" in out, out
    # An explicit flag wins over the profile, as in generate.
    r = run_cli("plan", "--gpu", "h200", "--compile", "off", "--precision", "bf16")
    assert "precision bf16 (eager)" in r.stdout and "attention sage8" in r.stdout, r.stdout


def test_plan_and_generate_share_one_profile_rule() -> None:
    """The same function decides for both: generate's apply_profile on an H200 name gives plan's knobs."""
    from wanrender.runtime.profiles import choose_profile

    c = choose_profile("auto", "NVIDIA H200", 81, 832, 1216, set())
    assert c is not None and c.chosen == {"precision": "fp8", "attention": "sage8", "compile": "default"}
    assert choose_profile("auto", "a GPU", 81, 832, 1216, set()) is None
