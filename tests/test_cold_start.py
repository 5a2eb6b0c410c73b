"""Cold-start pieces of the user's path: the LoRA merge's device-independent random
numbers, and the sidecar's checksums computed in the background and cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from wanrender.media.sidecar import FileHashes, cached_sha256, describe_files
from wanrender.models.common import quantize_fp8, uniform_hash
from wanrender.paths import sha256_file


def test_uniform_hash_is_a_function_of_seed_and_index() -> None:
    u = uniform_hash(7, 0, 1 << 16, "cpu")
    assert torch.equal(u, uniform_hash(7, 0, 1 << 16, "cpu"))
    # any window of indices gives the same numbers: chunked merges equal whole ones
    assert torch.equal(uniform_hash(7, 1000, 50, "cpu"), u[1000:1050])
    assert not torch.equal(u, uniform_hash(8, 0, 1 << 16, "cpu"))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    # uniform: each tenth of [0, 1) holds 10% +- 0.5% of 65536 draws (4 sigma is ~0.47%)
    hist = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert torch.all((hist - 0.1).abs() < 0.005), hist
    # neighbours are uncorrelated (|r| < 4 / sqrt(n) ~ 0.016)
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.016


def test_seeded_quantisation_is_reproducible_and_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 700, generator=g)
    q1, s1 = quantize_fp8(w, seed=5)
    q2, s2 = quantize_fp8(w, seed=5)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and float(s1) == float(s2)
    q3, _ = quantize_fp8(w, seed=6)
    assert not torch.equal(q1.view(torch.uint8), q3.view(torch.uint8))
    # unbiased: the mean rounding error is far below one fp8 step's (scale * 2^-3 relative)
    err = q1.float() * s1 - w
    assert float(err.mean().abs()) < 1e-4 * float(w.abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compare with the CPU")
def test_gpu_and_cpu_stochastic_quantisation_agree_bit_for_bit() -> None:
    w = torch.randn(1024, 3000, generator=torch.Generator().manual_seed(1))
    qc, sc = quantize_fp8(w, seed=9)
    qg, sg = quantize_fp8(w.cuda(), seed=9)
    assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)) and float(sc) == float(sg.cpu())


def test_background_hashes_equal_the_direct_ones_and_are_cached(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(os.urandom(3 << 20))
    b.write_bytes(os.urandom(1000))
    cache = tmp_path / "cache"
    files = {"high": a, "low": b, "lora_high": None}
    bg = FileHashes(files, cache)
    got = bg.describe()
    assert got == describe_files(files, cache)
    assert got["high"]["files"][0]["sha256"] == sha256_file(a)
    assert "lora_high" not in got
    known = json.loads((cache / "sha256.json").read_text())
    assert len(known) == 2 and any(k.startswith(str(a.resolve())) for k in known)


def test_a_file_rewritten_in_place_with_its_mtime_kept_is_hashed_again(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"A" * 4096)
    st = f.stat()
    first = cached_sha256(f, tmp_path)
    f.write_bytes(b"B" + b"A" * 4095)  # same size; the header (first bytes) changed
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached_sha256(f, tmp_path) == sha256_file(f) != first


def test_a_one_video_process_drops_a_profile_compile_only_while_the_cache_is_cold(tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace

    from wanrender.demo import demo_image, ensure_demo_models
    from wanrender.request import from_preset
    from wanrender.runner import Runner
    from wanrender.runtime.plan import compile_key, compile_pays, remember_compiled

    monkeypatch.setenv("WANRENDER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    files = ensure_demo_models()
    req = from_preset("demo", demo_image(), "a pan", frames=5, width=80, height=64, out=tmp_path / "v.mp4",
                      compile="default")  # fmt: skip
    by_profile = replace(req, extra={**req.extra, "profile": {"applied": {"compile": "default"}}})
    # the measured costs: 4 forwards save 2.8 s, less than any compile; 20 pay a warm
    # cache only; 80 (40 steps with CFG) pay even a cold compile
    assert not compile_pays(4, cached=False) and not compile_pays(4, cached=True)
    assert compile_pays(20, cached=True) and not compile_pays(20, cached=False) and compile_pays(80, cached=False)

    prep = Runner("cpu", one_shot=True).prepare(by_profile, files)
    assert prep.config.plan.compile == "off" and "the first compile" in prep.config.plan.notes[-1]
    # the user's own --compile is kept, and so is a long-lived runner's
    assert Runner("cpu", one_shot=True).prepare(req, files).config.plan.compile == "default"
    assert Runner("cpu").prepare(by_profile, files).config.plan.compile == "default"
    # a warm cache: this 4-step job still runs eager; a 20-step one (cfg 1: 20 forwards) compiles
    remember_compiled(compile_key("cpu", req.render.tokens, Runner("cpu").prepare(req, files).config.plan))
    assert (tmp_path / "inductor" / "wanrender-compiled.json").is_file()
    prep = Runner("cpu", one_shot=True).prepare(by_profile, files)
    assert prep.config.plan.compile == "off" and "a compile from the cache" in prep.config.plan.notes[-1]
    longer = replace(by_profile, sampling=replace(by_profile.sampling, steps=20, switch=10))
    assert Runner("cpu", one_shot=True).prepare(longer, files).config.plan.compile == "default"


def test_streaming_writer_encodes_chunks_and_abort_leaves_nothing(tmp_path: Path) -> None:
    import numpy as np

    from wanrender.media.video import StreamingWriter, probe_video, read_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 48, 64, 3), dtype=np.uint8)
    w = StreamingWriter(tmp_path / "a.mp4", fps=16, crf=18)
    w.put(frames[:1])
    for i in range(1, 9, 4):
        w.put(frames[i : i + 4])
    w.close()
    assert w.frames == 9 and probe_video(tmp_path / "a.mp4").frames == 9
    from wanrender.runner import frames_sha256

    assert w.frames_sha256 == frames_sha256(frames)  # hashed as they came, in order
    assert frames_sha256(frames[:0]) == frames_sha256(np.zeros((0, 48, 64, 3), np.uint8))  # empty: no error
    floats = StreamingWriter(tmp_path / "f.mp4")
    floats.put(frames[:2].astype(np.float32) / 255)  # kept as they are: the encoder's own check refuses them
    with pytest.raises(Exception, match="dtype float32"):
        floats.close()
    assert read_video(tmp_path / "a.mp4")[0].shape == (9, 48, 64, 3)
    aborted = StreamingWriter(tmp_path / "b.mp4")
    aborted.put(frames[:5])
    aborted.abort()
    assert not (tmp_path / "b.mp4").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".b")]
    bad = StreamingWriter(tmp_path / "c.mp4")
    bad.put(frames[:2])
    bad.put(frames[:2, :, :32])  # a frame of another size: the encoder's error reaches the caller
    with pytest.raises(Exception, match="size|shape"):
        bad.close()
    assert not (tmp_path / "c.mp4").exists()


def test_abort_drops_the_backlog_instead_of_encoding_it(tmp_path: Path) -> None:
    """A service worker aborts encoders it will not finish: the frames still queued are
    dropped, so the abort waits for one chunk, not for the whole video."""
    import time

    import numpy as np

    from wanrender.media.video import StreamingWriter

    noise = np.random.default_rng(1).integers(0, 256, size=(4, 512, 512, 3), dtype=np.uint8)
    whole = StreamingWriter(tmp_path / "whole.mp4")
    t0 = time.perf_counter()
    for _ in range(20):
        whole.put(noise)
    whole.close()
    encode_s = time.perf_counter() - t0
    w = StreamingWriter(tmp_path / "d.mp4")
    for _ in range(20):  # 80 frames of noise queued
        w.put(noise)
    assert w.running
    t0 = time.perf_counter()
    w.abort()
    assert time.perf_counter() - t0 < encode_s / 3, (time.perf_counter() - t0, encode_s)
    assert not w.running and not (tmp_path / "d.mp4").exists()
    w.abort()  # again: nothing


def test_streamed_decode_gives_the_same_frames_as_the_whole_decode() -> None:
    from wanrender.models.random_init import init_random_
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.pipeline import i2v

    vae = WanVAE(VAEConfig.preset("demo")).eval()
    init_random_(vae, seed=3)
    lat = torch.randn(1, 16, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    chunks: list = []
    streamed = i2v.decode(vae, lat, on_frames=chunks.append)
    whole = i2v.decode(vae, lat)
    assert [c.shape[0] for c in chunks] == [1, 4, 4]
    assert streamed.flags["C_CONTIGUOUS"] and (streamed == whole).all()


def test_plan_says_when_a_one_video_generate_runs_eager() -> None:
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")

    def plan(*extra: str) -> str:
        res = subprocess.run([sys.executable, "-m", "wanrender.cli", "plan", "--gpu", "h200", *extra], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": src, "COLUMNS": "400"}, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "compile default" in res.stdout
        return res.stdout

    # turbo: 4 forwards never pay for a compile; quality: 40 pay for one from a warm cache
    assert "a one-video generate runs eager (compiling costs more than the ~3 s" in plan()
    assert "runs eager until a render has compiled this shape" in plan("--preset", "quality")


def test_upload_off_a_gpu_is_the_plain_copy_in_order() -> None:
    from wanrender.models import upload

    items = [("a", torch.arange(6, dtype=torch.float16).reshape(2, 3)), ("b", torch.tensor(3.0)), ("c", torch.ones(0))]
    out = list(upload.to_device(iter(items), torch.device("cpu")))
    assert [n for n, _ in out] == ["a", "b", "c"]
    assert all(torch.equal(t, dict(items)[n]) and t.dtype == dict(items)[n].dtype for n, t in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: staging goes through pinned memory")
def test_staged_upload_is_bit_exact_in_order_across_chunk_boundaries(monkeypatch) -> None:
    """The staged path against the plain ``.to(device)`` (the reference): every dtype a
    checkpoint holds (fp8, fp16, bf16, fp32, uint8, 0-d scales), tensors that straddle a
    chunk, one larger than a chunk, and an empty one."""
    from wanrender.models import upload

    monkeypatch.setattr(upload, "CHUNK_BYTES", 1 << 16)
    g = torch.Generator().manual_seed(0)
    items = []
    for i, (dt, shape) in enumerate([(torch.float8_e4m3fn, (300, 70)), (torch.float16, (129, 77)),
                                     (torch.bfloat16, (5,)), (torch.float32, ()), (torch.uint8, (70000,)),
                                     (torch.float32, (40000,)), (torch.float16, (0,)), (torch.float16, (3, 5))]):  # fmt: skip
        t = torch.randn(shape, generator=g) * 3
        items.append((f"t{i}", t.to(dt) if dt != torch.uint8 else (t.abs() * 40).to(dt)))
    dev = torch.device("cuda")
    staged = list(upload.to_device(iter(items), dev))
    assert [n for n, _ in staged] == [n for n, _ in items]
    for (n, got), (_, ref) in zip(staged, items):
        assert got.device.type == "cuda" and got.dtype == ref.dtype and got.shape == ref.shape, n
        assert torch.equal(got.cpu().view(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), n
