"""The lab's comfyui engine, tested against a stand-in server (tests/helpers_comfy_server.py).

ComfyUI cannot be installed here, so what is tested is the lab against a small server
written in these tests from ComfyUI's documented routes (/upload/image, /prompt, /ws,
/history, /view, /system_stats, /interrupt, /queue) and websocket messages. It is not
ComfyUI: it runs no model and sleeps a fixed time per node and per step. One sweep
names both engines (the wanrender case on the demo models on the CPU) and ComfyUI
cases that finish, run out of memory, hang past their timeout, and are refused by
/prompt; report and compare then show both engines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_comfy_server import StandIn

SRC = Path(__file__).resolve().parents[1] / "src"


def workflow(text: str = "slow dolly-in") -> dict:
    """ComfyUI's Wan 2.2 14B i2v template in API format, at the size of the demo case."""
    sampler = {"cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "positive": ["10", 0],
               "negative": ["10", 1], "steps": 4}  # fmt: skip
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 5.0}},
        "6": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 5.0}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["3", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, static", "clip": ["3", 0]}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "10": {"class_type": "WanImageToVideo", "inputs": {"positive": ["7", 0], "negative": ["8", 0], "vae": ["4", 0],
               "start_image": ["9", 0], "width": 832, "height": 1216, "length": 81, "batch_size": 1}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {**sampler, "model": ["5", 0], "add_noise": "enable",
               "noise_seed": 42, "latent_image": ["10", 2], "start_at_step": 0, "end_at_step": 2,
               "return_with_leftover_noise": "enable"}},
        "12": {"class_type": "KSamplerAdvanced", "inputs": {**sampler, "model": ["6", 0], "add_noise": "disable",
               "noise_seed": 42, "latent_image": ["11", 0], "start_at_step": 2, "end_at_step": 10000,
               "return_with_leftover_noise": "disable"}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["4", 0]}},
        "14": {"class_type": "CreateVideo", "inputs": {"images": ["13", 0], "fps": 16}},
        "15": {"class_type": "SaveVideo", "inputs": {"video": ["14", 0], "filename_prefix": "video/wan", "format": "auto", "codec": "auto"}},
    }  # fmt: skip
    return wf


# No text encoder and no model: the shape of the workflow checked against a real ComfyUI
# 0.3.64 server, which served its repeats whole from the cache before every node got the
# per-render input.
PLAIN = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 9}},
    "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 16.0}},
    "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "video/x", "format": "auto",
                                                "codec": "auto"}},
}  # fmt: skip


def cli(*args: str, cwd: Path, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANRENDER_HOME": str(home), "COLUMNS": "250"}
    env.pop("WANRENDER_BENCH_STEP_DELAY", None)
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for f in fragments:
        assert f in " ".join(out.split()), (f, out)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # steps long enough for several /system_stats polls inside each sampler pass
    s = StandIn(tmp_path_factory.mktemp("standin"), step_s=0.2).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANRENDER_HOME", str(home))
    from wanrender.demo import ensure_demo_models

    ensure_demo_models()  # built before the sweep, so its case does not pay for it
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def sweep(server, home, tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    for name, text in (("ok", "slow dolly-in"), ("oom", "simulate:oom"), ("hang", "simulate:hang"),
                       ("reject", "simulate:reject")):  # fmt: skip
        (root / f"wf-{name}.json").write_text(json.dumps(workflow(text)))
    (root / "wf-plain.json").write_text(json.dumps(PLAIN))
    comfy = {"engine": "comfyui", "server": server.url}
    matrix = {
        "name": "two-engines",
        "defaults": {"preset": "demo", "resolution": "80x64", "frames": 5, "seed": 0, "device": "cpu",
                     "attention": "sdpa", "precision": "bf16", "repeats": 1, "timeout_s": 120},
        "cases": [
            {"name": "wan"},
            {"name": "comfy", **comfy, "workflow": "wf-ok.json", "repeats": 2},
            {"name": "comfy-oom", **comfy, "workflow": "wf-oom.json"},
            {"name": "comfy-hang", **comfy, "workflow": "wf-hang.json", "timeout_s": 3},
            {"name": "comfy-reject", **comfy, "workflow": "wf-reject.json"},
            {"name": "comfy-plain", **comfy, "workflow": "wf-plain.json", "repeats": 2},
        ],
    }  # fmt: skip
    (root / "m.yaml").write_text(yaml.safe_dump(matrix))
    p = cli("bench", "run", "m.yaml", "--out", "out", cwd=root, home=home)
    from wanrender.bench.results import read_rows

    rows = {r["case"]["name"]: r for r in read_rows(root / "out" / "results.jsonl").rows}
    return {"root": root, "proc": p, "rows": rows, "out": root / "out"}


def test_one_sweep_runs_both_engines_with_their_statuses(sweep, server) -> None:
    p, rows = sweep["proc"], sweep["rows"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert {k: (r["engine"], r["status"]) for k, r in rows.items()} == {
        "wan": ("wanrender", "ok"), "comfy": ("comfyui", "ok"), "comfy-oom": ("comfyui", "oom"),
        "comfy-hang": ("comfyui", "timeout"), "comfy-reject": ("comfyui", "error"),
        "comfy-plain": ("comfyui", "ok")}  # fmt: skip
    ok = rows["comfy"]
    assert {"text_encode", "vae_encode", "pass1", "pass2", "vae_decode", "video_encode"} <= set(ok["stages"])
    assert ok["total"]["n"] == 2 and ok["total"]["p50"] >= ok["stages"]["pass1"]["p50"] + ok["stages"]["pass2"]["p50"]
    assert 0.19 < ok["s_per_step"]["p50"] < 1.0  # the stand-in sleeps 0.2 s a step
    assert ok["memory"]["server_vram_timed_peak"] == 4 * 2**30 and ok["memory"]["device_total"] == 24 * 2**30
    assert ok["warmup_s"] > 0 and ok["comfyui"]["version"] == "stand-in"
    from wanrender.media.video import probe_video

    assert probe_video(ok["output"]).frames == 5  # the output, fetched through /history and /view
    assert (
        "out of memory" in rows["comfy-oom"]["message"] and "node 11 (KSamplerAdvanced)" in rows["comfy-oom"]["message"]
    )
    hang = rows["comfy-hang"]
    assert "timeout" in hang["message"] and "node 11 (KSamplerAdvanced)" in hang["message"]
    assert server.interrupts and server.deleted  # the hung prompt was interrupted and dropped from the queue
    assert (
        "HTTP 400" in rows["comfy-reject"]["message"] and "node 7 (CLIPTextEncode)" in rows["comfy-reject"]["message"]
    )
    for r in rows.values():
        if r["status"] != "ok":
            assert r["log_tail"] and Path(r["log"]).is_file()


def test_the_workflow_is_patched_from_the_case_and_every_timed_render_runs(sweep, server) -> None:
    sent = [pr for pr in server.prompts if "7" in pr and "slow dolly-in" in pr["7"]["inputs"]["text"]]
    assert len(sent) == 3  # warm-up and two timed renders of the "comfy" case
    for pr in sent:
        assert pr["9"]["inputs"]["image"] in server.uploads  # the uploaded demo image
        assert {k: pr["10"]["inputs"][k] for k in ("width", "height", "length")} == {
            "width": 80,
            "height": 64,
            "length": 5,
        }
        assert pr["11"]["inputs"]["noise_seed"] == 0 and pr["11"]["inputs"]["end_at_step"] == 2
    assert len({pr["7"]["inputs"]["wanrender_run"] for pr in sent}) == 3  # ComfyUI's cache cannot skip a render
    log = Path(sweep["rows"]["comfy"]["log"]).read_text()
    assert log.count("(KSamplerAdvanced)") == 6 and log.count("(UNETLoader)") == 2  # models loaded once


def test_report_and_compare_show_both_engines(sweep, home) -> None:
    root = sweep["root"]
    p = cli("bench", "report", "out", "-o", "r.html", cwd=root, home=home)
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    html = (root / "r.html").read_text()
    table = html.split('id="summary-table"')[1].split("</table>")[0]
    assert ">engine</th>" in table and ">comfyui</td>" in table and ">wanrender</td>" in table
    comfy_row = next(tr for tr in table.split("<tr>") if ">comfyui</td>" in tr)
    assert comfy_row.count(">—</td>") >= 3  # wanrender's knobs do not apply to ComfyUI's rows
    engines = html.split('id="engines-table"')[1].split("</table>")[0]
    assert "5f 80x64 4 steps seed 0, demo image" in engines and engines.count("<tr>") == 1 + 4  # wan x 4 comfy rows
    assert "(device)</span>" in table  # ComfyUI's VRAM is the device-wide peak
    p = cli("bench", "compare", "out", "out", cwd=root, home=home)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Traceback" not in out, out
    assert "comfyui" in out and "wanrender and ComfyUI in out" in out and "comfy-reject" in out


def test_rows_of_older_results_still_load_and_wanrender_case_hashes_are_unchanged(tmp_path) -> None:
    from wanrender.bench.matrix import Case
    from wanrender.bench.peers import engine
    from wanrender.bench.results import read_results

    # Hashes of the lab before the comfyui engine: old results keep matching (--resume, compare).
    assert Case().case_hash == "f379c226ccbe"
    assert Case(frames=9, attention="sdpa", image="x.png", image_sha256="ab").case_hash == "a55a60941f09"
    old = {"key": "a-b", "case_hash": "a", "status": "ok", "case": {"frames": 5}}  # no engine field
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    rows = read_results(tmp_path / "old.jsonl").rows
    assert engine(rows[0]) == "wanrender" and Case.from_json(rows[0]["case"]).engine == "wanrender"


def _matrix(root: Path, case: dict, wf: object = None) -> None:
    if wf is not None:
        (root / "wf.json").write_text(json.dumps(wf))
    (root / "m.yaml").write_text(yaml.safe_dump({"name": "bad", "cases": [case]}))


@pytest.mark.parametrize(
    ("case", "wf", "fragments"),
    [
        ({"engine": "comfy"}, None, ["engine 'comfy' is unknown", "use one of wanrender, comfyui"]),
        ({"engine": "comfyui", "workflow": "missing.json"}, None, ["workflow 'missing.json' not found"]),
        ({"engine": "comfyui", "workflow": "wf.json", "server": "127.0.0.1:8188"}, workflow(),
         ["server '127.0.0.1:8188' is not an http(s) URL"]),
        ({"engine": "comfyui", "workflow": "wf.json"}, {"nodes": [], "links": [], "version": 0.4},
         ["editor (UI) format", "Export (API)"]),
        ({"engine": "comfyui", "workflow": "wf.json"}, {"1": {"class_type": "KSampler", "inputs": {"model": ["9", 0]}}},
         ["links to ['9', 0], which is not a node"]),
        ({"engine": "comfyui", "workflow": "wf.json", "inject": "oom"}, workflow(), ["inject is a test hook"]),
    ],
)  # fmt: skip
def test_bad_comfyui_cases_fail_at_load_in_one_line(tmp_path, home, case, wf, fragments) -> None:
    _matrix(tmp_path, case, wf)
    one_line_error(cli("bench", "run", "m.yaml", "--out", "out", cwd=tmp_path, home=home), *fragments)
    assert not (tmp_path / "out").exists()


def test_an_unreachable_server_stops_the_sweep_before_any_case(tmp_path, home) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cases = [
        {"name": "wan"},
        {"name": "c", "engine": "comfyui", "workflow": "wf.json", "server": f"http://127.0.0.1:{port}"},
    ]
    (tmp_path / "wf.json").write_text(json.dumps(workflow()))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"name": "x", "defaults": {"device": "cpu"}, "cases": cases}))
    p = cli("bench", "run", "m.yaml", "--out", "out", cwd=tmp_path, home=home)
    one_line_error(p, f"ComfyUI at http://127.0.0.1:{port} is not reachable", "start ComfyUI there first")
    assert not (tmp_path / "out").exists()


def test_workflow_settings_fill_the_case_and_patching_keeps_links() -> None:
    from wanrender.bench import comfy_workflow as cw
    from wanrender.bench.matrix import expand

    wf = workflow()
    assert cw.settings(wf) == {"frames": 81, "width": 832, "height": 1216, "steps": 4, "seed": 42, "switch": 2}
    wf["10"]["inputs"]["length"] = ["9", 1]  # a linked value is not the lab's to change
    out = cw.patch(wf, "img.png", {"frames": 9, "width": 96, "height": 64, "steps": 8, "seed": 7, "switch": 3}, "r1")
    assert out["10"]["inputs"]["length"] == ["9", 1] and out["10"]["inputs"]["width"] == 96
    assert (out["11"]["inputs"]["end_at_step"], out["12"]["inputs"]["start_at_step"]) == (3, 3)
    assert out["11"]["inputs"]["steps"] == out["12"]["inputs"]["steps"] == 8 and out["11"]["inputs"]["noise_seed"] == 7
    assert wf["11"]["inputs"]["steps"] == 4  # the workflow itself is untouched
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "wf.json").write_text(json.dumps(workflow()))
        m = expand({"cases": [{"engine": "comfyui", "workflow": "wf.json", "steps": 6},
                              {"engine": "comfyui", "workflow": "wf.json"}]}, Path(d) / "m.yaml")  # fmt: skip
    a, b = m.cases
    assert (a.frames, a.width, a.height, a.steps, a.seed) == (81, 832, 1216, 6, 42)  # the matrix's steps win
    assert b.steps == 4 and a.case_hash != b.case_hash and m.labels == ("steps=6", "steps=4")


def test_a_case_without_workflow_runs_the_exported_template(tmp_path) -> None:
    """No ``workflow:``: the lab exports the case's own request with ``workflow export``'s
    exporter, so the ComfyUI side renders the same settings as the wanrender side."""
    from wanrender.bench import comfy_workflow as cw
    from wanrender.bench.matrix import load

    case = {"name": "c", "engine": "comfyui", "preset": "turbo", "frames": 33, "resolution": "480x832", "seed": 7}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"name": "x", "cases": [case]}))
    (c,) = load(tmp_path / "m.yaml").cases
    wf = cw.exported_workflow(c)
    samplers = sorted((n for n in wf.values() if n["class_type"] == "KSamplerAdvanced"),
                      key=lambda n: n["inputs"]["start_at_step"])  # fmt: skip
    assert [n["inputs"]["noise_seed"] for n in samplers] == [7, 7]
    assert [(n["inputs"]["start_at_step"], n["inputs"]["end_at_step"]) for n in samplers] == [(0, 2), (2, 10000)]
    (i2v,) = (n for n in wf.values() if n["class_type"] == "WanImageToVideo")
    assert (i2v["inputs"]["width"], i2v["inputs"]["height"], i2v["inputs"]["length"]) == (480, 832, 33)
    assert c.workflow_sha256 and c.workflow_path is None
    c2 = load(tmp_path / "m.yaml").cases[0]
    assert c2.case_hash == c.case_hash  # the export is deterministic: results keep matching on --resume


def test_a_workflow_without_text_encoder_still_runs_every_timed_render(sweep, server) -> None:
    """Every node but the loaders gets the per-render input, so a ComfyUI that caches
    outputs too (as 0.3.64 does) runs each timed render; the history, filed a moment
    after the end message, is waited for."""
    row = sweep["rows"]["comfy-plain"]
    assert row["status"] == "ok", row["message"]
    assert row["total"]["n"] == 2 and min(row["total"]["values"]) > 0
    assert row["output"] and Path(row["output"]).is_file()
    sent = [pr for pr in server.prompts if pr.get("2", {}).get("class_type") == "RepeatImageBatch"]
    assert len(sent) == 3 and len({pr["1"]["inputs"]["wanrender_run"] for pr in sent}) == 3
    log = Path(row["log"]).read_text()
    assert log.count("(SaveVideo)") == 3


def test_a_render_served_whole_from_the_cache_is_an_error_not_zero_seconds(tmp_path, home) -> None:
    """If a server ignores the per-render input, nothing runs in a timed render: the row
    says so instead of recording 0 s as a result."""
    s = StandIn(tmp_path / "srv").start()
    try:
        s.ignore_nonce = True
        (tmp_path / "wf.json").write_text(json.dumps(PLAIN))
        m = {"name": "x", "cases": [{"name": "c", "engine": "comfyui", "server": s.url, "workflow": "wf.json",
                                     "image": "demo", "repeats": 1, "timeout_s": 60}]}  # fmt: skip
        (tmp_path / "m.yaml").write_text(yaml.safe_dump(m))
        cli("bench", "run", "m.yaml", "--out", "out", cwd=tmp_path, home=home)
        from wanrender.bench.results import read_rows

        (row,) = read_rows(tmp_path / "out" / "results.jsonl").rows
        assert row["status"] == "error" and "served the whole render from its cache" in row["message"], row
    finally:
        s.stop()


def test_a_comfyui_case_exported_from_its_preset_pairs_with_the_wanrender_case() -> None:
    """The H200 sweep's two rows (docs/bench/comfyui-h200): neither case set `steps`, the
    comfyui one had no workflow of its own (the lab exported the turbo request), so both
    render 4 steps and belong in the side-by-side table; with a workflow file the steps are
    that file's, unknown to the row, and the rows do not pair."""
    from wanrender.bench.peers import pairs, render_key

    case = {"image_sha256": "ab" * 32, "frames": 81, "width": 832, "height": 1216, "steps": None, "seed": 42,
            "preset": "turbo"}  # fmt: skip
    wan = {"case": {**case, "engine": "wanrender", "workflow": ""}, "engine": "wanrender"}
    comfy = {"case": {**case, "engine": "comfyui", "workflow": ""}, "engine": "comfyui"}
    assert render_key(wan) == render_key(comfy) and render_key(wan)[4] == 4
    assert len(pairs([wan, comfy])) == 1
    own = {"case": {**case, "engine": "comfyui", "workflow": "wan22_i2v_api.json"}, "engine": "comfyui"}
    assert pairs([wan, own]) == []
