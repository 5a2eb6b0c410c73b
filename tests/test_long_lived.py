"""A long-lived engine: many renders in one process, each as a fresh process renders it.

One ``Runner`` renders specs that differ in frames, size, seed, LoRA strength,
attention backend and memory plan, in an order that changes and then restores each
knob. Every result must equal, bit for bit, the same spec rendered by a fresh
process; host memory held in tensors must be back at its level after each render
(on the CPU, live tensor bytes stand in for the CUDA allocator's count, which the
GPU test below checks directly).
"""

from __future__ import annotations

import gc
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SPECS = [  # frames, width, height, seed, lora strength, attention, memory
    (5, 80, 64, 1, 1.0, "sdpa", "resident"),
    (9, 96, 64, 2, 0.5, "sdpa", "resident"),  # size, frames, seed, LoRA strength change: a reload
    (5, 80, 64, 3, 0.5, "reference", "resident"),  # attention backend swapped in place
    (5, 64, 80, 1, 0.5, "sdpa", "swap"),  # another memory plan: experts on the host, LoRA unmerged
    (5, 80, 64, 1, 1.0, "sdpa", "resident"),  # everything back: the first render again
]


def _request(image: Path, out: Path, spec):
    from wanrender.request import from_preset

    frames, width, height, seed, lora, attention, memory = spec
    return from_preset("demo", image, "slow dolly-in", frames=frames, width=width, height=height, seed=seed,
                       lora_strength_high=lora, lora_strength_low=lora, attention=attention, memory=memory,
                       out=out)  # fmt: skip


def _digest(result) -> str:
    return hashlib.sha256(result.frames.tobytes() + result.latent.numpy().tobytes()).hexdigest()


def _live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type == "cpu":
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANRENDER_HOME", str(home))
    from wanrender.demo import demo_image, ensure_demo_models

    yield ensure_demo_models(), demo_image(), home
    mp.undo()


def test_one_process_renders_like_fresh_processes(demo, tmp_path: Path) -> None:
    from wanrender.runner import Runner

    files, image, home = demo
    runner = Runner("cpu")
    got, loads = [], []
    for i, spec in enumerate(SPECS):
        req = _request(image, tmp_path / f"in{i}.mp4", spec)
        prep = runner.prepare(req, files)
        runner.ensure_engine(prep.config, files)
        before = _live_tensor_bytes()
        result = runner.render(req, files)
        assert result.meta["load"] == {}  # configured above: the render itself loads nothing
        del result.meta["memory_record"]
        got.append(_digest(result))
        del result
        assert _live_tensor_bytes() == before, f"render {i} left tensors behind"
        loads.append(runner.engine.loads)
    # Reloads only where weight values change: a merged LoRA's strength, or a plan that
    # loads the experts elsewhere (resident <-> swap), never for attention alone.
    assert loads == [1, 2, 2, 3, 4]
    assert got[4] == got[0]

    script = textwrap.dedent(f"""
        import hashlib, json, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_long_lived import SPECS, _digest, _request
        from wanrender.demo import demo_image, ensure_demo_models
        from wanrender.runner import Runner
        i = int(sys.argv[1])
        r = Runner("cpu").render(_request(demo_image(), Path(sys.argv[2]), SPECS[i]), ensure_demo_models())
        print(json.dumps(_digest(r)))
    """)  # fmt: skip
    env = {**__import__("os").environ, "WANRENDER_HOME": str(home)}
    for i in range(len(SPECS) - 1):  # the last spec is the first one again
        out = subprocess.run([sys.executable, "-c", script, str(i), str(tmp_path / f"fresh{i}.mp4")], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == got[i], f"spec {i} differs from a fresh process"


def test_compiled_blocks_are_reused_across_renders(demo, tmp_path: Path) -> None:
    """A second render at the same shape compiles nothing (CPU Inductor, tiny model)."""
    from torch._dynamo.utils import counters

    from wanrender.runner import Runner

    files, image, _ = demo
    runner = Runner("cpu")
    spec = (5, 80, 64, 1, 1.0, "sdpa", "resident")
    req = _request(image, tmp_path / "c.mp4", spec)
    from wanrender.request import with_fields

    req = with_fields(req, compile="default")
    runner.render(req, files)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    second = runner.render(with_fields(req, seed=9), files)
    assert counters["stats"]["unique_graphs"] == compiled  # same shape: no new graph
    assert second.meta["load"] == {}
    # Compile off again restores eager blocks without a reload.
    loads = runner.engine.loads
    runner.render(with_fields(req, compile="off"), files)
    assert runner.engine.loads == loads
    assert all(b._compiled_call_impl is None for b in runner.engine.high.blocks)


@pytest.mark.gpu
def test_cuda_memory_returns_to_baseline(demo, tmp_path: Path) -> None:
    from wanrender.runner import Runner

    files, image, _ = demo
    runner = Runner("cuda")
    for i, spec in enumerate(SPECS):
        req = _request(image, tmp_path / f"g{i}.mp4", spec)
        runner.ensure_engine(runner.prepare(req, files).config, files)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        result = runner.render(req, files)
        del result
        gc.collect()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before, (
            f"render {i} left {torch.cuda.memory_allocated() - before} bytes"
        )


def test_a_loaded_engine_does_not_count_against_its_own_plan(monkeypatch) -> None:
    """On a GPU a runner with a loaded engine plans on free memory plus what its own
    allocator holds: otherwise a second render on a 32 GB card would see the loaded
    experts as taken and step down or refuse. (No GPU here: the probe and the
    allocator's count are stand-ins for what a GPU reports.)"""
    from dataclasses import replace

    from wanrender.runner import Runner
    from wanrender.runtime import gpus, planner

    card = replace(gpus.named("rtx5090"), free_gib=2.0)  # 29 GiB of it held by this process
    monkeypatch.setattr(gpus, "probe", lambda *a, **k: card)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 29 * 2**30)
    seen = []
    monkeypatch.setattr(
        planner, "plan_render", lambda req, files, dev, gpu=None, weights=None, gpus=1: seen.append(gpu)
    )
    runner = Runner("cuda")
    runner._decide(None, None)
    runner.engine = object()  # a loaded engine
    runner._decide(None, None)
    assert seen[0] is None  # nothing loaded: plan_render probes the device itself
    assert seen[1].free_gib == pytest.approx(31.0)


def test_released_or_half_configured_engines_recover(demo, tmp_path: Path, monkeypatch) -> None:
    """A released memory runtime is installed again for the next render of the same
    config; a reconfiguration that fails halfway leaves the engine marked broken, and
    the next configure reloads it fully (same result as before the failure)."""
    from wanrender.models import loading
    from wanrender.runner import Runner

    files, image, _ = demo
    runner = Runner("cpu")
    swap = (5, 80, 64, 1, 1.0, "sdpa", "swap")
    first = _digest(runner.render(_request(image, tmp_path / "a.mp4", swap), files))
    runner.engine.release()  # what a step-down that found no leaner plan leaves behind
    assert _digest(runner.render(_request(image, tmp_path / "b.mp4", swap), files)) == first
    assert runner.engine.memory is not None

    real = loading.load_dit
    monkeypatch.setattr(loading, "load_dit", lambda *a, **k: (_ for _ in ()).throw(OSError("file vanished")))
    other = (5, 80, 64, 1, 0.5, "sdpa", "resident")  # another layout: needs a reload, which fails
    with pytest.raises(OSError, match="file vanished"):
        runner.render(_request(image, tmp_path / "c.mp4", other), files)
    monkeypatch.setattr(loading, "load_dit", real)
    assert _digest(runner.render(_request(image, tmp_path / "d.mp4", swap), files)) == first


def test_the_first_render_conditions_during_the_load_and_renders_the_same(demo, tmp_path: Path, monkeypatch) -> None:
    """A fresh engine computes the first render's text and image conditioning while the
    experts load (resident plans); the video is bit for bit the one the render computes
    itself, the sidecar says which stages ran during the load and leaves them out of
    render_s, a plan with stage hooks (swap) does not do it, and a failure there only
    means the render does the work."""
    from wanrender.engine import Engine
    from wanrender.runner import Runner

    files, image, _ = demo
    spec = SPECS[0]
    req = _request(image, tmp_path / "a.mp4", spec)
    early = Runner("cpu").render(req, files)
    assert early.meta["during_load"] == ["text_encode", "vae_encode"]
    side = json.loads(early.sidecar.read_text())
    assert side["during_load"] == ["text_encode", "vae_encode"]
    spent = side["timings_s"]
    assert side["render_s"] == pytest.approx(sum(v for k, v in spent.items()
                                                 if k not in ("sampling", "text_encode", "vae_encode")), abs=2e-3)  # fmt: skip

    late_runner = Runner("cpu")
    prep = late_runner.prepare(req, files)
    late_runner.ensure_engine(prep.config, files)  # loaded without the request: the render conditions
    late = late_runner.render(_request(image, tmp_path / "b.mp4", spec), files)
    assert late.meta["during_load"] == []
    assert _digest(early) == _digest(late)

    swap = Runner("cpu").render(_request(image, tmp_path / "c.mp4", SPECS[3]), files)
    assert swap.meta["during_load"] == []  # the text encoder and VAE move with the memory plan there

    calls = []
    real = Engine._encode

    def flaky(self, *a, **k):  # fails during the load only
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of something")
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "_encode", flaky)
    again = Runner("cpu").render(_request(image, tmp_path / "d.mp4", spec), files)
    assert len(calls) == 2 and again.meta["during_load"] == []  # the render did the work itself
    assert _digest(again) == _digest(early)


def test_an_encoder_handed_back_open_writes_the_video_generate_writes(demo, tmp_path: Path) -> None:
    """A service worker renders with ``write=False, encode=True``: the encoder is fed during
    the decode and finished later on another thread; the video equals ``generate``'s, and an
    abandoned encoder leaves no file."""
    import threading

    from wanrender.media.video import read_video
    from wanrender.outputs import video_partial, write_outputs
    from wanrender.runner import Runner

    files, image, _ = demo
    runner = Runner("cpu")
    direct = runner.render(_request(image, tmp_path / "direct.mp4", SPECS[0]), files)
    req = _request(image, tmp_path / "later.mp4", SPECS[0])
    result = runner.render(req, files, write=False, encode=True)
    assert result.encoder is not None and result.video is None
    assert not (tmp_path / "later.mp4").exists()  # nothing published before the finish
    done = []
    t = threading.Thread(target=lambda: done.append(write_outputs(
        req, result.frames, result.frames, result.timings, lambda: {"k": 1}, stream=result.encoder)))  # fmt: skip
    t.start()
    t.join(120)
    video, sidecar = done[0]
    assert json.loads(sidecar.read_text()) == {"k": 1}
    a, fps_a = read_video(direct.video)
    b, fps_b = read_video(video)
    assert fps_a == fps_b and a.shape == b.shape and (a == b).all()
    assert not video_partial(video).exists()

    dropped = runner.render(_request(image, tmp_path / "dropped.mp4", SPECS[0]), files, write=False, encode=True)
    dropped.encoder.abort()
    assert not video_partial(tmp_path / "dropped.mp4").exists() and not (tmp_path / "dropped.mp4").exists()
    plain = _request(image, tmp_path / "plain.mp4", SPECS[0])
    assert runner.render(plain, files, write=False).encoder is None  # without encode: no encoder at all
    runner.close()


def test_a_worker_stops_encoders_nobody_will_finish(tmp_path: Path) -> None:
    """The worker's two ways of dropping an open encoder (a render whose awaiting was
    cancelled, a finishing task that ended without finishing): the encoder thread stops and
    its partial file goes, without the caller waiting for the backlog."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import numpy as np

    pytest.importorskip("nats")
    from wanrender.media.video import StreamingWriter
    from wanrender.service.worker import _abort, _abort_rendered

    noise = np.random.default_rng(2).integers(0, 256, size=(4, 256, 256, 3), dtype=np.uint8)

    def fed(name: str) -> StreamingWriter:
        w = StreamingWriter(tmp_path / name)
        for _ in range(10):
            w.put(noise)
        return w

    def gone(w: StreamingWriter) -> bool:
        deadline = time.monotonic() + 30
        while w.running and time.monotonic() < deadline:
            time.sleep(0.01)
        return not w.running and not w.path.exists()

    a = fed("a.mp4")
    t0 = time.perf_counter()
    _abort(a)  # from the event loop: returns at once, the abort runs on its own thread
    assert time.perf_counter() - t0 < 0.05 and gone(a)
    b = fed("b.mp4")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: (None, SimpleNamespace(encoder=b), {}))
        running.add_done_callback(_abort_rendered)
    assert gone(b)
    with ThreadPoolExecutor(1) as pool:  # a render that failed, or returned no encoder: nothing to do
        pool.submit(lambda: 1 / 0).add_done_callback(_abort_rendered)
        pool.submit(lambda: SimpleNamespace(encoder=None)).add_done_callback(_abort_rendered)


def test_a_finishing_task_cancelled_before_its_first_step_stops_its_encoder(tmp_path: Path) -> None:
    """A worker stopping while job N's finish still waits for job N-1's: the finishing task
    is cancelled before it ever ran (its own ``finally`` never runs), yet the encoder stops,
    its file goes and the finish coroutine is closed, not left "never awaited"."""
    import asyncio
    import time

    import numpy as np

    pytest.importorskip("nats")
    from wanrender.media.video import StreamingWriter
    from wanrender.service.worker import Worker

    w = StreamingWriter(tmp_path / "n.mp4")
    w.put(np.zeros((4, 64, 64, 3), dtype=np.uint8))
    ran = []

    async def finish() -> None:
        ran.append("finish")

    async def main() -> None:
        worker = Worker.__new__(Worker)  # only what _render touches
        worker.overlap, worker._finishing = True, asyncio.get_running_loop().create_future()  # job N-1, unfinished

        async def attempt(*_):
            return finish(), w

        async def keep_lease(_):
            await asyncio.sleep(3600)

        worker._attempt, worker._keep_lease = attempt, keep_lease
        await worker._render(None, None, 1, asyncio.Event())
        task = worker._finishing
        task.cancel()  # before its first step
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while w.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == [] and not w.running and not w.path.exists()
