"""Issue #16 for the bench lab: nothing lost, fail before the work, one line and no traceback.

Every check runs the CLI as a subprocess from a folder of its own (relative paths
are the point of several of them). One real sweep of one tiny demo case supplies
the results that compare and report are fed, whole and mangled.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MATRICES = ROOT / "benchmarks" / "matrices"
TINY = {
    "name": "tiny",
    "defaults": {"preset": "demo", "resolution": "80x64", "device": "cpu", "attention": "sdpa", "precision": "bf16",
                 "frames": 5, "repeats": 1, "warmup": False, "timeout_s": 120},
}  # fmt: skip


@pytest.fixture(scope="module")
def home(demo_set) -> Path:
    return demo_set[0]  # models built once, before any case: no case pays for it


def _cli(args: list[str], cwd: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(SRC), "WANRENDER_HOME": str(home), **env}
    full.pop("WANRENDER_BENCH_STEP_DELAY", None)
    return subprocess.run([sys.executable, "-m", "wanrender.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run failed with ``code``, saying so on one line of stderr, without a traceback."""
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _write_matrix(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sweep(home, tmp_path_factory) -> dict:
    """The tiny matrix run by its relative path with no --out: bench-results/tiny in the user's folder."""
    cwd = tmp_path_factory.mktemp("user")
    _write_matrix(cwd / "m.yaml", TINY)
    res = _cli(["bench", "run", "m.yaml"], cwd, home)
    return {"cwd": cwd, "res": res, "out": cwd / "bench-results" / "tiny"}


# --- 1. bench run: relative paths, and an exit status that says whether the sweep worked ------------


def test_run_resolves_relative_paths_against_the_users_folder(sweep, home) -> None:
    res = sweep["res"]
    assert res.returncode == 0 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    (row,) = _rows(sweep["out"] / "results.jsonl")
    assert row["status"] == "ok", row["message"]
    assert Path(row["log"]).is_absolute() and Path(row["log"]).is_file()
    assert not (sweep["out"] / "work").exists()  # the cases' work folders are cleaned up
    # an explicit relative --out, a level down, from the same folder
    again = _cli(["bench", "run", "m.yaml", "--out", "runs/second", "--only", "case"], sweep["cwd"], home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [r["status"] for r in _rows(sweep["cwd"] / "runs" / "second" / "results.jsonl")] == ["ok"]


def test_usage_in_the_cpu_demo_matrix_works_as_written(home, tmp_path) -> None:
    """The commands in cpu-demo.yaml's header, verbatim, from a copy of its folder layout
    (a case the matrix makes crash on purpose keeps it short; that crash is a result)."""
    shutil.copytree(MATRICES, tmp_path / "benchmarks" / "matrices")
    head = (MATRICES / "cpu-demo.yaml").read_text().split("\nname:")[0]
    commands = [ln.split("wanrender ", 1)[1].split() for ln in head.splitlines() if ln.startswith("#   wanrender ")]
    assert [c[:2] for c in commands] == [["bench", "run"], ["bench", "report"]]
    run = _cli(commands[0] + ["--only", "simulated-crash"], tmp_path, home)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert "1 crash" in run.stdout
    (row,) = _rows(tmp_path / "bench-results" / "cpu-demo" / "results.jsonl")
    assert row["status"] == "crash" and "SIGSEGV" in row["message"]
    report = _cli(commands[1], tmp_path, home)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "simulated-crash" in (tmp_path / "cpu-demo.html").read_text()


def test_run_exits_1_naming_the_log_when_a_case_crashed_by_no_ones_request(home, tmp_path) -> None:
    # The harness failing under the case: its process exits before it runs anything (what a
    # child started from the wrong folder did). Python's own start-up hook makes it fail.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\nif 'wanrender.bench.child' in sys.orig_argv:\n    os._exit(1)\n"
    )
    _write_matrix(tmp_path / "m.yaml", TINY)
    res = _cli(["bench", "run", "m.yaml", "--out", "out"], tmp_path, home, PYTHONPATH=f"{SRC}{os.pathsep}{hook}")
    line = _one_line_error(res, 1, "1 of 1 case crashed", "log: ")
    log = Path(line.split("log: ", 1)[1].strip())
    assert log.is_file() and log.parent == tmp_path / "out" / "logs"
    (row,) = _rows(tmp_path / "out" / "results.jsonl")  # the row is kept all the same
    assert row["status"] == "crash" and "before recording a result" in row["message"]


def test_run_exits_1_when_no_case_finished_ok(home, tmp_path) -> None:
    doc = copy.deepcopy(TINY)
    doc["defaults"]["attention"] = "sdpa-cudnn"  # a CUDA-only backend: the case cannot run on a CPU
    _write_matrix(tmp_path / "m.yaml", doc)
    res = _cli(["bench", "run", "m.yaml", "--out", "out"], tmp_path, home)
    _one_line_error(res, 1, "none of the 1 case that ran finished ok", "1 error", str(tmp_path / "out" / "logs"))


def test_run_refuses_an_unwritable_out_and_bad_matrices_before_any_case(home, tmp_path) -> None:
    _write_matrix(tmp_path / "m.yaml", TINY)
    (tmp_path / "taken").write_text("keep me\n")
    res = _cli(["bench", "run", "m.yaml", "--out", "taken"], tmp_path, home)
    _one_line_error(res, 2, "--out", "cannot write the results folder")
    assert (tmp_path / "taken").read_text() == "keep me\n"
    (tmp_path / "bad.yaml").write_bytes(b"name: x\ndefaults: {prompt: \xff\xfe}\n")
    _one_line_error(_cli(["bench", "run", "bad.yaml"], tmp_path, home), 2, "invalid UTF-8")
    doc = {**TINY, "cases": [{"name": "same", "frames": 5}, {"name": "same", "frames": 9}]}
    _write_matrix(tmp_path / "twice.yaml", doc)
    _one_line_error(_cli(["bench", "run", "twice.yaml"], tmp_path, home), 2, "labelled 'same'")
    doc = copy.deepcopy(TINY)
    doc["defaults"]["timeout_s"] = "nan"
    _write_matrix(tmp_path / "nan.yaml", doc)
    _one_line_error(_cli(["bench", "run", "nan.yaml"], tmp_path, home), 2, "timeout_s 'nan' is invalid")
    assert not (tmp_path / "bench-results").exists()


# --- 2. bench compare: a gate that can fail ----------------------------------------------------------


@pytest.fixture()
def base(sweep, tmp_path) -> Path:
    """Two cases: the real one and a copy under another configuration hash."""
    (row,) = _rows(sweep["out"] / "results.jsonl")
    other = {**copy.deepcopy(row), "case_hash": "0" * 12, "label": "other"}
    other["key"] = other["case_hash"] + "-" + row["env_fingerprint"]
    return _write_rows(tmp_path / "base.jsonl", [row, other])


def test_compare_passes_only_when_every_baseline_case_was_compared(sweep, base, home, tmp_path) -> None:
    same = _cli(["bench", "compare", str(base), str(base)], tmp_path, home)
    assert same.returncode == 0 and "0 regressions in 2 matched cases" in " ".join(same.stdout.split()), same.stdout
    # a run's folder stands for its results.jsonl
    folder = _cli(["bench", "compare", str(sweep["out"]), str(sweep["out"])], tmp_path, home)
    assert folder.returncode == 0, folder.stdout + folder.stderr
    # one of the two baseline cases is missing from NEW: a partial run is no pass ...
    partial = _cli(["bench", "compare", str(sweep["out"]), str(base)], tmp_path, home)
    _one_line_error(partial, 1, "1 case(s) of BASE missing from NEW (other)", "--allow-missing")
    # ... unless asked for
    allowed = _cli(["bench", "compare", str(sweep["out"]), str(base), "--allow-missing"], tmp_path, home)
    assert allowed.returncode == 0 and "Traceback" not in allowed.stderr, allowed.stdout + allowed.stderr
    # no case in common: nothing was compared
    (row,) = _rows(sweep["out"] / "results.jsonl")
    stranger = _write_rows(tmp_path / "stranger.jsonl", [{**row, "case_hash": "f" * 12, "key": "f" * 12 + "-e"}])
    none = _cli(["bench", "compare", str(stranger), str(sweep["out"]), "--allow-missing"], tmp_path, home)
    _one_line_error(none, 1, "nothing compared")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-slowdown", "nan%"], "--max-slowdown 'nan%' is invalid"),
        (["--max-slowdown", "inf"], "--max-slowdown 'inf' is invalid"),
        (["--max-slowdown", "-5%"], "--max-slowdown '-5%' is invalid"),
        (["--max-slowdown", "five"], "--max-slowdown 'five' is invalid"),
        (["--limit", "pass=nan"], "--limit pass 'nan' is invalid"),
        (["--limit", "total=-3s"], "--limit total '-3s' is invalid"),
        (["--limit", "vram=0GiB"], "--limit 'vram=0GiB' is invalid"),
        (["--metric", " , "], "names no metric"),
        (["--metric", "speed"], "--metric 'speed' is unknown"),
    ],
)
def test_compare_refuses_thresholds_that_make_no_sense(flags, needle, home, tmp_path) -> None:
    # The files do not exist: the options are checked first.
    res = _cli(["bench", "compare", "new.jsonl", "base.jsonl", *flags], tmp_path, home)
    _one_line_error(res, 2, needle)


def _garbage(tmp_path: Path, kind: str, good: Path) -> Path:
    p = tmp_path / f"{kind}.jsonl"
    row = _rows(good)[0]
    if kind == "empty":
        p.write_text("")
    elif kind == "text":
        p.write_text("these are not the results\nyou are looking for\n")
    elif kind == "binary":
        p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage\n")
    elif kind == "other-json":
        _write_rows(p, [{"name": "a"}, [1, 2]])
    elif kind == "bad-status":
        _write_rows(p, [{**row, "status": "splendid"}])
    elif kind == "bad-timing":
        _write_rows(p, [{**row, "total": {"p50": "fast"}}])
    elif kind == "newer-schema":
        _write_rows(p, [{**row, "schema": 99}])
    elif kind == "folder":
        p = tmp_path / "a-folder"
        p.mkdir()
    elif kind == "missing":
        p = tmp_path / "nowhere.jsonl"
    return p


GARBAGE = {"empty": "empty, no case results", "text": "line 1: not JSON", "binary": "not a bench results file",
           "other-json": "line 1: no key", "bad-status": "status 'splendid'", "bad-timing": "total is not a p50/p90",
           "newer-schema": "schema 99", "folder": "a folder without results.jsonl",
           "missing": "no such results file"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_compare_and_report_refuse_garbage_in_one_line(kind, sweep, home, tmp_path) -> None:
    good = sweep["out"] / "results.jsonl"
    bad = _garbage(tmp_path, kind, good)
    _one_line_error(_cli(["bench", "compare", str(bad), str(good)], tmp_path, home), 2, GARBAGE[kind])
    if kind in ("empty", "binary", "folder"):  # the baseline is read the same way: a few are enough
        _one_line_error(_cli(["bench", "compare", str(good), str(bad)], tmp_path, home), 2, GARBAGE[kind])
    (tmp_path / "r.html").write_text("the earlier report")
    report = _cli(["bench", "report", str(bad), "-o", "r.html"], tmp_path, home)
    _one_line_error(report, 2, GARBAGE[kind])
    assert (tmp_path / "r.html").read_text() == "the earlier report"  # left as it was


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_results_file_is_one_line(sweep, home, tmp_path) -> None:
    p = tmp_path / "locked.jsonl"
    shutil.copy(sweep["out"] / "results.jsonl", p)
    p.chmod(0)
    try:
        _one_line_error(_cli(["bench", "report", str(p)], tmp_path, home), 2, "cannot read the results file")
    finally:
        p.chmod(0o644)


# --- 3. bench report: inputs and outputs ---------------------------------------------------------------


def test_report_takes_a_run_folder_and_keeps_its_results(sweep, home, tmp_path) -> None:
    out = sweep["out"]
    results = out / "results.jsonl"
    before = results.read_bytes()
    ok = _cli(["bench", "report", str(out), "-o", "rep.html"], tmp_path, home)
    assert ok.returncode == 0 and (tmp_path / "rep.html").read_text().startswith("<!DOCTYPE html>"), ok.stderr
    _one_line_error(
        _cli(["bench", "report", str(out), "-o", str(results)], tmp_path, home), 2, "the results file itself"
    )
    (tmp_path / "dir.html").mkdir()
    _one_line_error(_cli(["bench", "report", str(out), "-o", "dir.html"], tmp_path, home), 2, "a folder")
    assert results.read_bytes() == before


# --- 4. labels that can be told apart ------------------------------------------------------------------


class _Visible(HTMLParser):
    """The lines a reader sees in the report's bar labels and legends (tooltips apart), and the tooltips."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.bar_labels: list[list[str]] = []
        self.legends: dict[str, list[list[str]]] = {}
        self.titles: list[str] = []
        self.plot = ""

    def handle_starttag(self, tag, attrs):
        if tag in ("meta", "br", "hr", "img", "link", "input"):
            return  # no end tag follows
        a = dict(attrs)
        if tag == "svg":
            self.plot = a.get("data-plot") or ""
        if tag == "text" and a.get("class") == "bar-label":
            self.bar_labels.append([])
        if tag == "g" and a.get("class") == "legend":
            self.legends.setdefault(self.plot, []).append([])
        if tag == "tspan" and "bar-label" in self.stack:
            self.bar_labels[-1].append("")
        elif tag == "tspan" and "legend" in self.stack:
            self.legends[self.plot][-1].append("")
        self.stack.append(a.get("class") if a.get("class") in ("bar-label", "legend") else tag)

    def handle_endtag(self, tag):
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "title":
            self.titles.append(data)
        elif self.stack and self.stack[-1] == "tspan" and "bar-label" in self.stack:
            self.bar_labels[-1][-1] += data
        elif self.stack and self.stack[-1] == "tspan" and "legend" in self.stack:
            self.legends[self.plot][-1][-1] += data


def test_report_labels_that_differ_only_at_the_end_stay_distinguishable(sweep, home, tmp_path) -> None:
    (row,) = _rows(sweep["out"] / "results.jsonl")
    stem = "5f attention=sdpa precision=bf16 a long shared description of this sweep's case, seed="
    prompt = "slow dolly-in, gentle camera motion, soft light, a long prompt that fills any legend, take "
    rows = []
    for i, tail in enumerate(("17", "18")):
        r = copy.deepcopy(row)
        r["case_hash"] = f"{i:012d}"
        r["key"] = f"{r['case_hash']}-{row['env_fingerprint']}"
        r["label"], r["case"]["prompt"] = stem + tail, prompt + tail
        rows.append(r)
    _write_rows(tmp_path / "long.jsonl", rows)
    res = _cli(["bench", "report", "long.jsonl", "-o", "long.html"], tmp_path, home)
    assert res.returncode == 0, res.stderr
    dom = _Visible()
    dom.feed((tmp_path / "long.html").read_text())
    a, b = dom.bar_labels
    assert a != b and a[-1].endswith("17") and b[-1].endswith("18"), dom.bar_labels
    assert len(a) <= 3 and all(len(line) <= 40 for line in a + b)  # still fits beside its bar
    for plot in ("time-vs-frames", "vram-vs-frames"):
        one, two = dom.legends[plot]
        assert one != two and one[-1].endswith("17") and two[-1].endswith("18"), dom.legends
        assert len(one) <= 3 and all(len(line) <= 30 for line in one + two)
    assert {stem + "17", stem + "18"} <= set(dom.titles)  # the full label on hover
    assert {f"prompt={prompt}17", f"prompt={prompt}18"} <= set(dom.titles)


def test_fit_labels_keeps_every_name_apart() -> None:
    from wanrender.bench.labels import fit_labels, fit_lines, wrap

    groups = [
        ["x" * 60 + "1" + "y" * 60, "x" * 60 + "2" + "y" * 60],  # no words, the difference in the middle
        ["a b c d e f g h i j k l m n o p q r s t", "a b c d e f X h i j k l m n o p q r s t", "short"],
        ["same start " * 5 + "A", "same start " * 5 + "B", "other " * 9],
        ["ab" * 30, "ab" * 30 + "c", "ab" * 29],
    ]
    for names in groups:
        shown = fit_labels(names, 20)
        assert len(set(shown)) == len(set(names)) and all(len(s) <= 20 for s in shown), shown
        assert [s for s, n in zip(shown, names) if len(n) <= 20] == [n for n in names if len(n) <= 20]
        lines = fit_lines(names, 12, 2)
        assert len({tuple(ls) for ls in lines}) == len(set(names))
        assert all(len(ls) <= 2 and all(len(x) <= 12 for x in ls) for ls in lines), lines
    assert wrap("a long-enough-word here", 8) == ["a", "long-eno", "ugh-word", "here"]


# --- 5. the shipped matrices say what they do ------------------------------------------------------------

_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def test_case_counts_in_the_matrices_comments_are_right() -> None:
    from wanrender.bench.matrix import load

    for path in sorted(MATRICES.glob("*.yaml")):
        m = load(path)
        doc = yaml.safe_load(path.read_text())
        crossed = math.prod(len(v) for v in (doc.get("axes") or {}).values())
        comments = " ".join(ln for ln in path.read_text().splitlines() if ln.lstrip().startswith("#"))
        for n in re.findall(r"\b(\d+|[a-z]+) cases\b", comments.lower()):
            count = int(n) if n.isdigit() else _WORDS.get(n)
            if count is not None:
                assert count in (len(m.cases), crossed), f"{path.name} says {n} cases, runs {len(m.cases)}"
