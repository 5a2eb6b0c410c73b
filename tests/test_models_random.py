"""`wanrender models random`: random-weight stand-ins for the standard file set, streamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wanrender.errors import WanrenderError
from wanrender.models.common import Linear
from wanrender.models.random_files import RandomFile, check_space, plan, write_random_set
from wanrender.models.safetensors_write import TensorSpec, plan_layout, write_streaming

SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = {
    "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
    "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
    "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
    "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "wan_2.1_vae.safetensors",
    "umt5-xxl-tokenizer/spiece.model",
}


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANRENDER_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *args], env=env, capture_output=True, text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("random") / "models"
    home = tmp_path_factory.mktemp("home")
    res = _cli("models", "random", "--size", "tiny", "--dir", str(folder), "--device", "cpu", home=home)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert f"--models {folder}" in res.stdout
    return folder


def test_tiny_set_has_the_standard_names_and_checks_complete(tiny_set: Path, tmp_path: Path) -> None:
    from wanrender.fetch import STANDARD_SET

    assert set(_files(tiny_set)) == NAMES == {f.dest for f in STANDARD_SET}
    res = _cli("models", "check", str(tiny_set), home=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Ready to render." in res.stdout and "not found" not in res.stdout
    assert "fp8_scaled" in res.stdout


def test_a_second_run_skips_every_file(tiny_set: Path, tmp_path: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tiny_set.rglob("*") if p.is_file()}
    res = _cli("models", "random", "--size", "tiny", "--dir", str(tiny_set), "--device", "cpu", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("already there") == len(NAMES)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tiny_set.rglob("*") if p.is_file()} == before


def test_a_foreign_file_is_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    real = folder / "wan_2.1_vae.safetensors"  # stands in for the user's real VAE
    save_file({"encoder.conv1.weight": torch.ones(2, 3)}, str(real))
    original = real.read_bytes()
    args = ("models", "random", "--size", "tiny", "--dir", str(folder), "--device", "cpu")
    res = _cli(*args, home=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    # Checked before anything was written: the folder is as it was.
    assert _files(folder) == {"wan_2.1_vae.safetensors": original}
    res = _cli(*args, "--overwrite", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert real.read_bytes() != original and set(_files(folder)) == NAMES
    # Another seed's random file is refused the same way (its bytes would differ).
    res = _cli(*args, "--seed", "7", home=tmp_path)
    assert res.returncode == 2 and "other settings (seed 0, size tiny, rng cpu)" in res.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--size", "huge"), "--size 'huge' is invalid"),
        (("--seed", "-1"), "--seed -1 is invalid"),
        (("--device", "tpu"), "--device 'tpu' is invalid"),
    ],
)
def test_bad_arguments_one_line_nothing_written(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    folder = tmp_path / "models"
    res = _cli("models", "random", "--size", "tiny", "--dir", str(folder), *extra, home=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not folder.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path: Path) -> None:
    res = _cli("models", "random", "--size", "tiny", "--dir", str(tmp_path / "m"), "--device", "cuda", home=tmp_path)
    assert res.returncode == 2 and "no CUDA GPU here" in res.stderr and "Traceback" not in res.stderr


def test_generate_renders_on_the_tiny_set(tiny_set: Path, tmp_path: Path) -> None:
    from wanrender.demo import demo_image

    out = tmp_path / "out" / "v.mp4"
    res = _cli("generate", str(demo_image()), "--prompt", "slow dolly-in", "--models", str(tiny_set),
               "--frames", "5", "--size", "80x64", "--device", "cpu", "--out", str(out), home=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["plan"]["lora"]["high"].startswith("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise")
    assert out.stat().st_size > 0


def test_full_size_plan_matches_the_real_files_layout() -> None:
    from wanrender.models.dit import DiTConfig, WanDiT

    files = {f.dest: f for f in plan("full", 0, "cpu")}  # headers only: nothing is made
    expert = files["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"]
    assert expert.layout is not None
    assert abs(expert.total_bytes - 14.29e9) < 0.01 * 14.29e9
    with torch.device("meta"):
        model = WanDiT(DiTConfig())
    linears = {f"model.diffusion_model.{n}" for n, m in model.named_modules() if isinstance(m, Linear)}
    specs = {s.name: s for s in expert.layout.specs}
    assert specs["model.diffusion_model.scaled_fp8"].dtype == torch.float8_e4m3fn
    assert specs["model.diffusion_model.scaled_fp8"].shape == (0,)
    for layer in linears:
        assert specs[layer + ".weight"].dtype == torch.float8_e4m3fn
        assert specs[layer + ".scale_weight"] == TensorSpec(layer + ".scale_weight", torch.float32, ())
        assert specs[layer + ".scale_input"] == TensorSpec(layer + ".scale_input", torch.float32, ())
    quant = {layer + s for layer in linears for s in (".weight", ".scale_weight", ".scale_input")}
    others = [s for s in specs.values() if s.name not in quant and not s.name.endswith("scaled_fp8")]
    assert others and all(s.dtype == torch.float16 for s in others)
    assert sum(s.name in specs for s in others) == len(model.state_dict()) - len(linears)
    header = json.loads(expert.layout.header[8:])
    assert set(json.loads(header["__metadata__"]["wanrender_random"])) >= {"seed", "size", "rng"}
    lora = files["wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"].layout
    down = [s for s in lora.specs if s.name.endswith(".lora_down.weight")]
    assert len(down) == 40 * 10 and all(s.shape[0] == 64 for s in down)
    assert "diffusion_model.blocks.39.ffn.2.lora_up.weight" in {s.name for s in lora.specs}
    total = sum(f.total_bytes for f in files.values())
    assert 36e9 < total < 38e9
    with pytest.raises(WanrenderError, match="GB but only"):
        check_space(Path("."), 10**18)


def test_streamed_bytes_equal_the_safetensors_library(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.w": torch.randn(5, 3, generator=g).to(torch.float8_e4m3fn),
        "a.scale": torch.tensor(0.5),
        "marker": torch.empty(0, dtype=torch.float8_e4m3fn),
        "n.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "h": torch.randn(2, 2, generator=g).half(),
        "tok": torch.arange(11, dtype=torch.uint8),
        "big": torch.randn(3, 4, 5, generator=g),
    }
    meta = {"wanrender_random": "{}"}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=meta)
    layout = plan_layout([TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], meta)
    # Made in reverse data order: written at their offsets all the same.
    order = [s.name for s in reversed(layout.specs)]
    write_streaming(tmp_path / "ours.safetensors", layout, lambda s: tensors[s.name], order)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def _assert_reads_back(out: list, again: list[RandomFile]) -> None:
    """Every tensor of every written file, read with the safetensors library, equals
    what a fresh plan with the same arguments makes."""
    fresh = {f.dest: f for f in again}
    for o in out:
        f = fresh[o.file.dest]
        if f.layout is None:
            assert o.path.read_bytes() == f.content
            continue
        specs = {s.name: s for s in f.layout.specs}
        made = {name: f.values(specs[name]).cpu() for name in f.order}  # scales after their weights
        with safe_open(str(o.path), "pt") as fh:
            assert set(fh.keys()) == set(made)
            for name, t in made.items():
                got = fh.get_tensor(name)
                assert got.dtype == t.dtype and got.shape == t.shape, name
                assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
                if got.numel() and got.dtype != torch.uint8 and not name.endswith("scale_input"):
                    assert got.float().abs().max() > 0, f"{name} is all zeros"


def test_tiny_files_read_back_exactly_what_was_made(tmp_path: Path) -> None:
    _assert_reads_back(write_random_set(tmp_path, "tiny", seed=5, device="cpu"), plan("tiny", 5, "cpu"))


@pytest.mark.gpu
def test_cuda_files_read_back_exactly_through_the_pinned_buffers(tmp_path: Path, monkeypatch) -> None:
    from wanrender.models import safetensors_write

    monkeypatch.setattr(safetensors_write, "_CHUNK", 4096)  # many chunks per tensor, buffers reused
    out = write_random_set(tmp_path, "tiny", seed=1, device="cuda")
    _assert_reads_back(out, plan("tiny", 1, "cuda"))
    with safe_open(str(out[0].path), "pt") as fh:
        assert json.loads(fh.metadata()["wanrender_random"])["rng"] == "cuda"


def test_values_the_experts_differ_and_the_lora_delta_is_small(tmp_path: Path) -> None:
    write_random_set(tmp_path, "tiny", seed=0, device="cpu")
    w = "model.diffusion_model.blocks.0.self_attn.q"
    with safe_open(str(tmp_path / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"), "pt") as h, \
         safe_open(str(tmp_path / "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"), "pt") as lo:  # fmt: skip
        high_w = h.get_tensor(w + ".weight").float() * h.get_tensor(w + ".scale_weight")
        assert not torch.equal(high_w, lo.get_tensor(w + ".weight").float() * lo.get_tensor(w + ".scale_weight"))
        assert float(h.get_tensor(w + ".scale_input")) == 1.0
        assert 0.015 < float(high_w.std()) < 0.025
        gain = h.get_tensor("model.diffusion_model.blocks.0.norm3.weight").float()
        assert (gain - 1).abs().max() < 0.2 and not torch.equal(gain, torch.ones_like(gain))
    k = "diffusion_model.blocks.0.self_attn.q"
    with safe_open(str(tmp_path / "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"), "pt") as fh:
        up, down = fh.get_tensor(k + ".lora_up.weight").float(), fh.get_tensor(k + ".lora_down.weight").float()
        scale = float(fh.get_tensor(k + ".alpha")) / down.shape[0]
    ratio = float((scale * up @ down).std() / high_w.std())
    assert 0.01 < ratio < 0.1


def test_a_failed_write_leaves_neither_the_file_nor_a_partial(tmp_path: Path) -> None:
    from wanrender.models.random_files import _write_one

    f = plan("tiny", 0, "cpu")[-2]  # the VAE
    calls = []

    def failing(spec: TensorSpec) -> torch.Tensor:
        calls.append(spec.name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return f.values(spec)

    broken = RandomFile(f.dest, f.role, f.layout, values=failing, order=f.order)
    with pytest.raises(WanrenderError, match="No space left on device"):
        _write_one(tmp_path / f.dest, broken, lambda n: None)
    assert list(tmp_path.iterdir()) == []
