"""The benchmark lab end to end on the CPU with the demo models.

One small sweep runs once per module (interrupted by Ctrl-C after two cases,
then resumed): two ok cases at 5 and 9 frames, one in the other pass order, a
simulated allocator OOM, a hang ended by the timeout, a segfault, and a case
the machine cannot run. The other tests read its results: statuses and log
tails, stage timings, compare (including a real regression), the HTML report
(in headless Chromium when installed), tune and ``generate --profile auto``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from wanrender.cli import app
from wanrender.errors import WanrenderError

OK_STAGES = {"text_encode", "vae_encode", "pass1", "pass2", "vae_decode", "video_encode"}
MATRIX = {
    "name": "lab-test",
    "defaults": {"preset": "demo", "resolution": "80x64", "device": "cpu", "attention": "sdpa",
                 "precision": "bf16", "repeats": 2, "timeout_s": 120},
    "axes": {"frames": [5, 9]},
    "cases": [
        {"frames": 5, "pass_order": "low->high", "repeats": 1, "vram_cap": "32GiB"},
        {"name": "simulated-oom", "inject": "oom", "repeats": 1},
        {"name": "simulated-hang", "inject": "hang", "timeout_s": 15},
        {"name": "simulated-crash", "inject": "crash"},
        {"name": "cannot-run", "attention": "sdpa-cudnn"},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANRENDER_HOME", str(home))
    mp.delenv("WANRENDER_BENCH_STEP_DELAY", raising=False)
    from wanrender.demo import demo_image, ensure_demo_models

    files = ensure_demo_models()  # built before the sweep, so no case pays for it
    yield {"home": home, "root": tmp_path_factory.mktemp("lab"), "files": files, "image": demo_image()}
    mp.undo()


def _rows(path: Path) -> list[dict]:
    from wanrender.bench.results import read_rows

    return list(read_rows(path).rows)


def _children_of_sweep(out_dir: Path) -> list[int]:
    """Processes whose command line names this sweep's folder (its case children)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "wanrender.bench.child" in cmd and str(out_dir) in cmd:
                found.append(int(p.name))
    return found


@pytest.fixture(scope="module")
def sweep(lab):
    """Run the matrix from the CLI, Ctrl-C it after two rows, then --resume it."""
    root: Path = lab["root"]
    mfile = root / "matrix.yaml"
    mfile.write_text(yaml.safe_dump(MATRIX))
    out = root / "sweep"
    t0 = time.monotonic()
    log = root / "interrupted.log"
    with open(log, "w") as fh:
        # SIGINT back to its default before exec: a shell that starts the tests in the
        # background leaves it ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen([sys.executable, "-m", "wanrender.cli", "bench", "run", str(mfile), "--out", str(out)],
                                stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    results = out / "results.jsonl"
    while time.monotonic() - t0 < 240:
        if results.exists() and len(_rows(results)) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended early: {log.read_text()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    output = " ".join(log.read_text().split())
    before = results.read_bytes()
    interrupted = {"returncode": proc.returncode, "output": output, "rows": len(_rows(results)),
                   "orphans": _children_of_sweep(out)}  # fmt: skip
    res = CliRunner().invoke(app, ["bench", "run", str(mfile), "--out", str(out), "--resume"])
    return {"out": out, "results": results, "matrix": mfile, "before": before, "interrupted": interrupted,
            "resume": res, "seconds": time.monotonic() - t0}  # fmt: skip


def _by_label(rows: list[dict]) -> dict[str, dict]:
    return {r["case"]["name"] or r["label"]: r for r in rows}


# --- the sweep ---------------------------------------------------------------------------------


def test_interrupted_sweep_resumes_without_rerunning_or_rewriting(sweep) -> None:
    it = sweep["interrupted"]
    assert it["returncode"] == 130, it["output"]
    assert "--resume" in it["output"]
    assert it["rows"] == 2  # the case in flight was killed, not recorded
    assert it["orphans"] == []  # and its process group is gone
    res = sweep["resume"]
    assert res.exit_code == 0, res.output
    assert "2 skipped (already done)" in " ".join(res.output.split())
    data = sweep["results"].read_bytes()
    assert data.startswith(sweep["before"])  # append-only: the first rows are byte-identical
    rows = _rows(sweep["results"])
    assert len(rows) == len({r["key"] for r in rows}) == 7
    # resuming a finished sweep runs nothing; a fresh run into the same folder is refused
    again = CliRunner().invoke(app, ["bench", "run", str(sweep["matrix"]), "--out", str(sweep["out"]), "--resume"])
    assert again.exit_code == 0 and "7 skipped" in " ".join(again.output.split())
    assert sweep["results"].read_bytes() == data
    fresh = CliRunner().invoke(app, ["bench", "run", str(sweep["matrix"]), "--out", str(sweep["out"])])
    assert fresh.exit_code == 2 and "use --resume" in " ".join(fresh.output.split())


def test_each_failure_ends_only_its_case_with_status_and_log_tail(sweep) -> None:
    rows = _by_label(_rows(sweep["results"]))
    assert {k: r["status"] for k, r in rows.items() if r["status"] != "ok"} == {
        "simulated-oom": "oom", "simulated-hang": "timeout", "simulated-crash": "crash", "cannot-run": "error"}  # fmt: skip
    assert sum(r["status"] == "ok" for r in rows.values()) == 3
    oom = rows["simulated-oom"]
    assert "ran out of memory" in oom["message"] and "inject oom" in oom["log_tail"]
    assert oom["memory"]["plan"]  # what was known before the failure stays in its row
    hang = rows["simulated-hang"]
    assert hang["returncode"] == -signal.SIGKILL and 15 <= hang["wall_s"] < 50
    if "inject hang" in hang["log_tail"]:  # reached the hang before the limit: the stacks show where
        assert "Thread 0x" in hang["log_tail"] or "Current thread" in hang["log_tail"]
    crash = rows["simulated-crash"]
    assert crash["returncode"] == -signal.SIGSEGV and "SIGSEGV" in crash["message"]
    assert "Fatal Python error" in crash["log_tail"]  # faulthandler's stack in the log
    assert "'sdpa-cudnn' cannot run here" in rows["cannot-run"]["message"]
    for r in rows.values():
        if r["status"] != "ok":
            assert r["log_tail"].strip() and Path(r["log"]).is_file()


def test_ok_cases_have_stage_stats_memory_and_telemetry(sweep) -> None:
    rows = [r for r in _rows(sweep["results"]) if r["status"] == "ok"]
    for r in rows:
        assert set(r["stages"]) >= OK_STAGES
        n = r["case"]["repeats"]
        assert r["total"]["n"] == n and all(s["n"] == n for s in r["stages"].values())
        assert 0 < r["total"]["p50"] <= r["total"]["p90"] <= r["total"]["max"]
        assert (
            abs(r["total"]["p50"] - _median([sum(v) for v in zip(*(s["values"] for s in r["stages"].values()))])) < 1e-3
        )
        assert r["s_per_step"]["p50"] > 0 and r["warmup_s"] > 0 and r["load_s"] > 0
        assert r["memory"]["host_rss_peak"] > 50 * 2**20 and r["memory"]["torch_allocated_peak"] is None
        tel = r["telemetry"]
        assert tel["fields"][:3] == ["t", "cpu_pct", "rss_mib"] and len(tel["samples"]) >= 3
        phases = [p[0] for p in tel["phases"]]
        assert phases[0] == "warmup" and phases[1:] == [f"repeat {i + 1}" for i in range(n)]  # warm-up not timed
        assert r["energy_j"] is None  # no GPU energy counter on a CPU
        assert r["env"]["fingerprint"] == r["env_fingerprint"] and r["key"].endswith(r["env_fingerprint"])
    low = next(r for r in rows if r["case"]["pass_order"] == "low-high")
    assert low["pass1_expert"] == "low" and any("vram_cap recorded" in n for n in low["notes"])
    assert {r["case"]["frames"] for r in rows} == {5, 9}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


# --- compare ------------------------------------------------------------------------------------


def test_compare_passes_on_itself_and_fails_on_a_real_regression(sweep, lab, monkeypatch) -> None:
    base = sweep["results"]
    same = CliRunner().invoke(app, ["bench", "compare", str(base), str(base)])
    assert same.exit_code == 0, same.output
    assert "0 regressions in 7 matched cases" in " ".join(same.output.split())
    # The same 5-frame case again with a known slowdown: 1 s slept after every timed step.
    doc = {**MATRIX, "axes": {"frames": [5]}, "cases": [], "defaults": {**MATRIX["defaults"], "repeats": 1}}
    mfile = lab["root"] / "slow.yaml"
    mfile.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("WANRENDER_BENCH_STEP_DELAY", "1.0")
    run = CliRunner().invoke(app, ["bench", "run", str(mfile), "--out", str(lab["root"] / "slow")])
    assert run.exit_code == 0, run.output
    new = lab["root"] / "slow" / "results.jsonl"
    (slow,) = _rows(new)
    base_row = next(r for r in _rows(base) if r["case_hash"] == slow["case_hash"])
    assert slow["env_fingerprint"] != base_row["env_fingerprint"]  # the hook's env var is part of the environment
    assert slow["stages"]["pass1"]["p50"] >= 2.0 and slow["stages"]["pass2"]["p50"] >= 2.0
    res = CliRunner().invoke(app, ["bench", "compare", str(new), str(base), "--metric", "pass", "--limit", "pass=1.5s"])
    assert res.exit_code == 1, res.output
    flat = " ".join(res.output.split())
    assert "REGRESSION" in flat and "over the limit pass=1.5s" in flat and "1 regression in 1 matched case" in flat
    assert "6 case(s) missing from NEW" in flat


def test_compare_rules_on_rows() -> None:
    from wanrender.bench.compare import compare, parse_limit, parse_percent
    from wanrender.bench.results import Rows

    def row(h: str, status: str, total: float | None, pass1: float = 1.0) -> dict:
        return {"key": h + "-e", "case_hash": h, "label": h, "status": status, "total": {"p50": total},
                "stages": {"pass1": {"p50": pass1}, "pass2": {"p50": 1.0}}, "memory": {"torch_allocated_peak": 30 * 2**30}}  # fmt: skip

    base = Rows((row("a", "ok", 10.0), row("b", "ok", 10.0), row("c", "ok", 10.0), row("d", "ok", 10.0)), 0)
    new = Rows((row("a", "ok", 10.4), row("b", "ok", 10.6), row("c", "oom", None), row("d", "ok", 9.0, pass1=90.0)), 1)
    cmp = compare(new, base, parse_percent("5%"), parse_limit("pass=85s") + parse_limit("vram=29GiB"))
    problems = {v.case_hash: v.problems for v in cmp.verdicts}
    assert [p for p in problems["a"] if "ratio" in p or "p50" in p] == []  # 4% is within 5%
    assert any("1.060x > 1.050x" in p for p in problems["b"])
    assert problems["c"][0] == "status ok -> oom"
    assert any(p.startswith("pass1 90.000s over the limit") for p in problems["d"])
    assert all(any("over the limit vram=29GiB" in p for p in ps) for ps in problems.values())
    assert "NEW: 1 unreadable line" in cmp.notes[0]
    # memory over the timed renders only, beside the whole case's (loading included)
    timed = Rows(
        (row("a", "ok", 10.0) | {"memory": {"nvml_used_peak": 60 * 2**30, "nvml_used_timed_peak": 30 * 2**30}},), 0
    )
    assert compare(timed, timed, 0.05, parse_limit("nvml_timed=32GiB")).regressions == []
    assert compare(timed, timed, 0.05, parse_limit("nvml=32GiB")).regressions
    with pytest.raises(WanrenderError, match="unknown metric 'speed'"):
        parse_limit("speed=3s")
    with pytest.raises(WanrenderError, match="use a percentage"):
        parse_percent("five")


# --- report -------------------------------------------------------------------------------------


class _Dom(HTMLParser):
    """Counts what the report must contain: plots with drawn data, table rows, log tails."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: list[dict] = []
        self.stack: list[str] = []
        self.summary_rows = 0
        self.logs: list[str] = []
        self._in_log = False
        self._in_summary_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "plot" in (a.get("class") or ""):
            self.plots.append(
                {"plot": a.get("data-plot"), "points": int(a.get("data-points") or 0), "paths": 0, "shapes": 0}
            )
        elif self.plots and tag == "path" and "series" in (a.get("class") or "") and len(a.get("d", "")) > 4:
            self.plots[-1]["paths"] += 1
        elif self.plots and tag in ("circle", "rect") and a.get("class") in (None, "bar"):
            self.plots[-1]["shapes"] += 1
        if tag == "tbody" and self.stack and self.stack[-1] == "table#summary-table":
            self._in_summary_body = True
        if tag == "tr" and self._in_summary_body:
            self.summary_rows += 1
        if tag == "pre" and a.get("class") == "log":
            self._in_log = True
            self.logs.append("")
        if tag == "table":
            self.stack.append(f"table#{a.get('id')}")

    def handle_endtag(self, tag):
        if tag == "table" and self.stack:
            self.stack.pop()
            self._in_summary_body = False
        if tag == "pre":
            self._in_log = False

    def handle_data(self, data):
        if self._in_log:
            self.logs[-1] += data


def _check_report_dom(html: str) -> None:
    dom = _Dom()
    dom.feed(html)
    kinds = {p["plot"] for p in dom.plots}
    assert {"stages", "time-vs-frames", "vram-vs-frames", "telemetry"} <= kinds
    for p in dom.plots:
        if p["plot"] in ("time-vs-frames", "vram-vs-frames"):
            assert p["points"] >= 2 and p["paths"] >= 1 and p["shapes"] >= 2, p
        if p["plot"] == "stages":
            assert p["points"] >= 3 * 6 and p["shapes"] >= 18, p
    timelines = [p for p in dom.plots if p["plot"] == "telemetry"]
    assert len(timelines) >= 7 * 2 and all(p["paths"] >= 1 for p in timelines)
    assert dom.summary_rows == 7
    assert len(dom.logs) == 4 and all(len(t.strip()) > 20 for t in dom.logs)


def test_report_is_one_offline_file_with_plots_tables_and_failures(sweep, lab) -> None:
    out = lab["root"] / "report.html"
    res = CliRunner().invoke(app, ["bench", "report", str(sweep["results"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html
    _check_report_dom(html)
    assert "card" not in html.split('data-plot="vram-vs-frames"')[1].split("</svg>")[0]  # no card on a CPU run
    assert "host RAM" in html  # the host's limit is named (off the scale of a tiny demo)
    assert " (case)</span>" in html  # a failed case shows its whole-case memory peak


def test_report_names_environments_and_what_sets_them_apart(sweep, tmp_path) -> None:
    import copy

    from wanrender.bench.report import write_report
    from wanrender.bench.results import append_row, read_rows

    rows = [r for r in read_rows(sweep["results"]).latest_by_key().values() if r["status"] == "ok"]
    assert rows and all(r["memory"]["host_rss_timed_peak"] for r in rows)  # the runner stores the timed peak
    other = copy.deepcopy(rows[0])
    other["env_fingerprint"], other["key"] = "f" * 12, other["case_hash"] + "-" + "f" * 12
    other["env"]["env_vars"] = {**other["env"]["env_vars"], "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    del other["memory"]["host_rss_timed_peak"]  # a row written before the field existed
    path = tmp_path / "two-envs.jsonl"
    for r in [*rows, other]:
        append_row(path, r)
    html = write_report(path, tmp_path / "r.html").read_text()
    table = html.split('id="summary-table"')[1].split("</table>")[0]
    assert ">environment</th>" in table and table.count(">env 1</td>") == len(rows) and table.count(">env 2</td>") == 1
    assert "PYTORCH_CUDA_ALLOC_CONF expandable_segments:True -&gt; max_split_size_mb:512" in html
    # the old row's timed RSS peak comes from its own telemetry samples: a number, not a dash
    cell = table.split(">env 2</td>")[0].rsplit("<tr>", 1)[1]
    nvml, rss = (c.rsplit(">", 1)[1] for c in cell.split("</span>")[-3:-1])
    assert nvml == "—" and float(rss) > 0, (nvml, rss)  # no NVML on a CPU; RSS from the samples
    single = write_report(sweep["results"], tmp_path / "one.html").read_text()
    assert ">environment</th>" not in single and "differs from env 1" not in single


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (CI installs Debian's package: .ci/run)")
def test_report_renders_in_headless_chromium(sweep, lab, tmp_path) -> None:
    from PIL import Image

    out = lab["root"] / "report.html"
    if not out.exists():
        from wanrender.bench.report import write_report

        write_report(sweep["results"], out)
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run(base + ["--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    _check_report_dom(dom.stdout)
    shot = tmp_path / "shot.png"
    run = subprocess.run(base + ["--window-size=1280,2400", f"--screenshot={shot}", out.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, bars, lines: not a blank page
    white = (
        max(count for count, c in colors if c == (255, 255, 255)) if any(c == (255, 255, 255) for _, c in colors) else 0
    )
    assert white < 0.97 * img.width * img.height


# --- tune and profiles --------------------------------------------------------------------------


def test_tune_writes_a_profile_that_generate_uses_unless_overridden(lab, tmp_path) -> None:
    from wanrender.runtime.profiles import user_dir

    runner = CliRunner()
    res = runner.invoke(app, ["tune", "--budget", "3m", "--attention", "sdpa,reference", "--compile", "off",
                              "--repeats", "1", "--device", "cpu", "--work", str(tmp_path / "tune")])  # fmt: skip
    assert res.exit_code == 0, res.output
    (path,) = user_dir().glob("*.yaml")
    doc = yaml.safe_load(path.read_text())
    (bucket,) = doc["buckets"]
    assert doc["estimated"] is False and doc["provenance"]["source"] == "wanrender tune"
    assert doc["provenance"]["env_fingerprint"] and doc["provenance"]["complete"] is True
    assert {t["knobs"]["attention"] for t in bucket["tried"]} == {"sdpa", "reference"}
    assert all(t["status"] == "ok" and t["total_p50_s"] > 0 for t in bucket["tried"])
    best = min(bucket["tried"], key=lambda t: t["total_p50_s"])["knobs"]["attention"]
    assert bucket["knobs"]["attention"] == best and bucket["measured"]["total_p50_s"] > 0

    files, image = lab["files"], lab["image"]
    args = ["generate", str(image), "--prompt", "a slow pan", "--preset", "demo", "--frames", "5", "--size", "80x64",
            "--high", str(files.high), "--low", str(files.low), "--vae", str(files.vae),
            "--text-encoder", str(files.text_encoder), "--lora-high", str(files.lora_high),
            "--lora-low", str(files.lora_low), "--device", "cpu"]  # fmt: skip
    res = runner.invoke(app, args + ["--out", str(tmp_path / "auto.mp4")])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "auto.json").read_text())
    assert side["plan"]["runtime"]["attention"] == best
    assert side["request"]["extra"]["profile"]["applied"]["attention"] == best
    other = "sdpa" if best == "reference" else "reference"
    res = runner.invoke(app, args + ["--attention", other, "--out", str(tmp_path / "explicit.mp4")])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "explicit.json").read_text())
    assert side["plan"]["runtime"]["attention"] == other  # what the user set wins
    assert "attention" not in side["request"]["extra"]["profile"]["applied"]
    path.unlink()


def test_shipped_profiles_match_their_gpus_with_provenance(lab) -> None:
    from wanrender.request import from_preset
    from wanrender.runtime.profiles import all_profiles, apply_profile, find_profile

    h200 = find_profile("NVIDIA H200")
    assert h200 is not None and not h200.estimated
    assert h200.provenance["note"] == "measured 2026-11-21 and 2026-11-22, docs/benchmarks.md"
    b = h200.bucket_for(81, 832, 1216)
    assert b.knobs == {"precision": "fp8", "attention": "sage8", "compile": "default", "memory_plan": "auto"}
    assert b.measured["ratio_to_peer_2026_11_22"] == {"fp8_sage8_compile-default": 0.789}
    assert b.measured["ratio_to_peer"] == {"fp8_sdpa-cudnn_compile-default": 0.973, "bf16_sdpa-cudnn_eager": 1.198}
    h100 = find_profile("NVIDIA H100 80GB HBM3")
    assert h100 is not None and not h100.estimated and h100.provenance["source"] == "wanrender tune"
    assert h100.provenance["device_measured"] == "NVIDIA H100 80GB HBM3" and len(h100.provenance["runs"]) == 2
    fast = {"precision": "fp8", "attention": "sage8", "compile": "default", "memory_plan": "auto"}
    for size, secs in (((832, 1216), 50.289), ((832, 480), 12.932)):
        b = h100.bucket_for(81, *size)
        assert (b.width, b.height) == size and b.knobs == fast and b.measured["total_p50_s"] == secs
        assert min(b.measured["tried"].values()) == secs  # the knobs chosen are the fastest tried
    assert find_profile("NVIDIA H100 PCIe") is h100 or find_profile("NVIDIA H100 PCIe").path == h100.path
    for name in ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 5090", "NVIDIA A100-SXM4-80GB"):
        p = find_profile(name)
        assert p is not None and p.estimated and p.provenance["reasoning"], name
    assert find_profile("NVIDIA A100-SXM4-40GB").bucket_for(81, 832, 480).knobs["precision"] == "bf16"  # no fp8 on sm80
    assert find_profile("cpu some laptop") is None
    assert len(all_profiles()) >= 5
    req = from_preset("demo", lab["image"], "x", frames=5, width=80, height=64)
    h200_file = Path(h200.path)
    with pytest.raises(WanrenderError, match="does not fit this device: precision fp8 cannot run here"):
        apply_profile(req, str(h200_file), "cpu", set())
    # the same profile with only the knobs a CPU can run is applied; explicit knobs stay
    same, line = apply_profile(req, str(h200_file), "cpu", {"precision", "attention", "compile"})
    assert same.knobs.attention == req.knobs.attention and "nothing (all set explicitly)" in line


# --- matrix, results, env: the parts without a render ---------------------------------------------


def test_matrix_expansion_and_errors(tmp_path) -> None:
    from wanrender.bench.matrix import expand, load, parse_seconds
    from wanrender.spec import parse_bytes

    m = expand({"defaults": {"repeats": 1}, "axes": {"frames": [5, 9], "attention": ["sdpa", "reference"]},
                "exclude": [{"frames": 9, "attention": "reference"}],
                "cases": [{"frames": 5, "compile": False, "inject": "oom"}]})  # fmt: skip
    assert [(c.frames, c.attention, c.inject) for c in m.cases] == [
        (5, "sdpa", "none"), (5, "reference", "none"), (9, "sdpa", "none"), (5, "auto", "oom")]  # fmt: skip
    assert m.cases[-1].compile == "off"  # YAML's bare off
    from dataclasses import replace

    c = m.cases[0]
    assert replace(c, repeats=7, name="x", timeout_s=3).case_hash == c.case_hash  # not part of the identity
    assert replace(c, frames=9).case_hash != c.case_hash
    # The one unit rule (spec.py): GB = 10^9 bytes, GiB = 2^30 bytes; a matrix's bare number is bytes.
    assert parse_bytes("32GiB") == 32 * 2**30 and parse_bytes("32GB") == 32 * 10**9 and parse_bytes(1024) == 1024
    assert expand({"cases": [{"vram_cap": "24GB"}]}).cases[0].vram_cap_bytes == 24 * 10**9
    assert parse_seconds("1h30m") == 5400 and parse_seconds("250ms") == 0.25 and parse_seconds("20m") == 1200
    for doc, msg in (({"axes": {"fps": [1]}}, "unknown key 'fps'"), ({"axes": {"frames": [6]}}, "try 5"),
                     ({"axes": {"frames": 5}}, "must be a non-empty list"),
                     ({"cases": [{"pass_order": "sideways"}]}, "use high->low or low->high"),
                     ({"cases": [{"frames": 5}, {"frames": 5, "name": "again"}]}, "are the same render"),
                     ({"cases": [{"image": "nope.png"}]}, "not found"),
                     ({"cases": [{"attention": "sdpa-cudn"}]}, "attention 'sdpa-cudn' is unknown")):  # fmt: skip
        with pytest.raises(WanrenderError, match=msg):
            expand(doc, tmp_path / "m.yaml")
    (tmp_path / "bad.yaml").write_text("axes: [frames\n")
    with pytest.raises(WanrenderError, match="not valid YAML"):
        load(tmp_path / "bad.yaml")


def test_shipped_matrices_expand() -> None:
    from wanrender.bench.matrix import load

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "matrices"
    gpu = load(root / "gpu-h200.yaml")
    assert len(gpu.cases) >= 12
    assert {c.attention for c in gpu.cases} >= {"sdpa-cudnn", "sdpa-flash", "sdpa"}
    assert {c.precision for c in gpu.cases} >= {"fp8", "bf16"} and {c.compile for c in gpu.cases} >= {"off", "default"}
    assert 32 * 2**30 in {c.vram_cap_bytes for c in gpu.cases}
    assert {c.pass_order for c in gpu.cases} == {"high-low", "low-high"} and len({c.frames for c in gpu.cases}) >= 3
    cpu = load(root / "cpu-demo.yaml")
    assert {c.inject for c in cpu.cases} == {"none", "oom", "hang", "crash"} and all(
        c.device == "cpu" for c in cpu.cases
    )


def test_results_file_survives_a_torn_write(tmp_path) -> None:
    from wanrender.bench.results import append_row, read_rows

    path = tmp_path / "r.jsonl"
    append_row(path, {"key": "a-1", "case_hash": "a", "status": "ok"})
    with open(path, "ab") as fh:  # a crash in the middle of a row
        fh.write(b'{"key": "b-1", "case_hash": "b", "sta')
    assert [r["key"] for r in read_rows(path).rows] == ["a-1"] and read_rows(path).skipped_lines == 1
    append_row(path, {"key": "c-1", "case_hash": "c", "status": "oom"})
    rows = read_rows(path)
    assert [r["key"] for r in rows.rows] == ["a-1", "c-1"] and rows.skipped_lines == 1
    assert path.read_bytes().startswith(b'{"key":"a-1"')


class _FakeGpu:
    """Stands in for NVML: 300 W, an energy counter at 300 J/s, 10 GiB used, a power cap."""

    total = 80 * 2**30

    def __init__(self) -> None:
        self.t0 = time.time()

    def sample(self) -> list:
        dt = time.time() - self.t0
        return [97, 40, 10240.0, 71, 300.0, 1980, 2619, 0x4 | 0x1, int(300_000 * dt)]

    def close(self) -> None:
        pass


def test_sampler_gpu_path_peaks_throttle_and_energy(monkeypatch) -> None:
    from wanrender.bench import telemetry

    monkeypatch.setattr(telemetry, "open_nvml", lambda index: (_FakeGpu(), None))
    t0 = time.time()
    s = telemetry.Sampler(os.getpid(), gpu_index=0, interval=0.02, t0=t0).start()
    time.sleep(0.5)
    s.stop()
    window = (t0 + 0.1, t0 + 0.4)
    summary = s.summary([window])
    assert summary["fields"] == list(telemetry.HOST_FIELDS + telemetry.GPU_FIELDS)
    assert summary["nvml_used_peak_bytes"] == 10 * 2**30 and summary["temp_max_c"] == 71
    assert summary["nvml_used_timed_peak_bytes"] == 10 * 2**30
    assert 10 * 2**20 < summary["rss_timed_peak_bytes"] <= s.peak_rss
    assert s.summary([(t0 + 5, t0 + 6)])["nvml_used_timed_peak_bytes"] is None  # no sample in the window
    assert summary["throttle_reasons"] == ["sw_power_cap"]  # idle is not a throttle
    (joules,) = summary["energy_j"]
    assert joules == pytest.approx(90.0, rel=0.1)  # 300 W for 0.3 s, from the counter
    ts, power = s.column("t"), s.column("power_w")
    assert telemetry.energy(ts, power, [None] * len(ts), 0.1, 0.4) == pytest.approx(90.0, rel=0.02)  # integrated power
    assert s.peak_rss and s.peak_rss > 10 * 2**20 and len(s.thinned()) <= telemetry.MAX_POINTS


def test_env_snapshot_and_fingerprint(monkeypatch) -> None:
    from wanrender.bench.env import fingerprint, snapshot

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    res = CliRunner().invoke(app, ["env"])
    assert res.exit_code == 0
    env = json.loads(res.stdout)
    assert env["env_vars"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # the CLI's default, recorded
    for key in (
        "python",
        "torch",
        "cuda",
        "cudnn",
        "triton",
        "driver",
        "gpus",
        "cpu",
        "ram_gib",
        "os",
        "packages",
        "env_vars",
    ):
        assert key in env, key
    assert env["packages"]["torch"] and env["cpu"]["logical_cores"] >= 1 and env["ram_gib"] > 0
    assert env["fingerprint"] == fingerprint(env)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    changed = snapshot()
    assert changed["env_vars"]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"
    assert changed["fingerprint"] != env["fingerprint"]


def test_plot_ticks_never_repeat_a_label() -> None:
    """A sweep of one frame count drew the frames axis as 80, 80, 81, 82, 82 (half-frame
    steps rounded): whole-number data gets whole steps, and a fractional tick keeps its
    decimal."""
    import re

    from wanrender.bench.svg import Series, xy_chart

    svg = xy_chart([Series("a", ((81, 67.8),), "#d62728"), Series("b", ((81, 70.8),), "#1f77b4")], plot="t", title="t",
                   x_label="frames", y_label="s")  # fmt: skip
    labels = re.findall(r'<text[^>]*text-anchor="middle"[^>]*>([^<]+)</text>', svg)
    frames = [t for t in labels if t.strip().isdigit() and 70 < int(t) < 90]
    assert frames and len(frames) == len(set(frames)), labels
    half = xy_chart([Series("a", ((10.0, 1.0), (12.5, 2.0)), "#d62728")], plot="h", title="h", x_label="x", y_label="y")
    ticks = re.findall(r'<text[^>]*text-anchor="middle"[^>]*>([^<]+)</text>', half)
    assert len([t for t in ticks if t not in ("x",)]) == len({t for t in ticks if t not in ("x",)}), ticks
