"""``wanrender bench run``: every case in its own child process, under a timeout.

An OOM, a segfault or a deadlock ends only its case: the parent waits with a
wall-clock limit, asks a hung child for its Python stacks (SIGUSR1, written to
the case's log), kills its process group, and records the status with the log's
tail. Rows are appended to ``results.jsonl`` as each case ends, keyed by the
case's identity hash plus the environment fingerprint, so an interrupted sweep
resumes where it stopped (``--resume``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wanrender.bench import results as res
from wanrender.bench.matrix import Case, Matrix
from wanrender.bench.telemetry import Sampler
from wanrender.errors import WanrenderError
from wanrender.spec import Stage

LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000
STACK_DUMP_WAIT_S = 1.0
# The rows' stage names (schema 1): the render's stages, with the two passes shortened.
_STAGE_OF = {Stage.PASS1_HIGH.value: "pass1", Stage.PASS2_LOW.value: "pass2"}
STAGES = tuple(
    _STAGE_OF.get(s.value, s.value)
    for s in (
        Stage.TEXT_ENCODE,
        Stage.VAE_ENCODE,
        Stage.EXPERT_INSTALL,
        Stage.PASS1_HIGH,
        Stage.PASS2_LOW,
        Stage.VAE_DECODE,
        Stage.INTERPOLATE,
        Stage.VIDEO_ENCODE,
    )
)
# Engine.render's timing names -> the lab's (passes are numbered: pass order is an axis).

# The status each ``inject`` test hook asks for: a result, not a failure of the sweep.
INJECTED_STATUS = {"oom": "oom", "hang": "timeout", "crash": "crash"}
# (event, detail) -> None; events: "start", "skip", "done" with the case, label, row.
Events = Callable[[str, dict], None]


@dataclass(frozen=True)
class SweepResult:
    out_dir: Path
    results: Path
    ran: tuple[dict, ...]
    skipped: tuple[str, ...]
    env: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.ran:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def failure(self) -> str | None:
        """Why the sweep itself failed, in one line, or None.

        An oom, a timeout or an error is a case's result and the sweep goes on. The
        sweep fails when a case crashed (its process died without recording a result:
        a segfault, a kill, or the harness could not start it) or when cases ran and
        none finished ok: nothing was measured. Failures a case's ``inject`` test hook
        asks for are results too.
        """
        if not self.ran:
            return None  # everything was already done (--resume)
        asked = [r for r in self.ran if INJECTED_STATUS.get((r.get("case") or {}).get("inject")) == r["status"]]
        crashed = [r for r in self.ran if r["status"] == "crash" and r not in asked]
        logs = self.out_dir / "logs"
        n = len(self.ran)
        if crashed:
            where = f"log: {crashed[0]['log']}" if len(crashed) == 1 else f"logs in {logs}"
            names = ", ".join(r["label"] for r in crashed[:3]) + (", ..." if len(crashed) > 3 else "")
            return (f"{len(crashed)} of {n} case{'s' if n != 1 else ''} crashed ({names}): the process died without "
                    f"a result — {where}")  # fmt: skip
        if not any(r["status"] == "ok" for r in self.ran) and len(asked) < n:
            counts = ", ".join(f"{c} {s}" for s, c in sorted(self.counts().items()))
            return f"none of the {n} case{'s' if n != 1 else ''} that ran finished ok ({counts}) — logs in {logs}"
        return None


def case_key(case: Case, env_fp: str) -> str:
    return f"{case.case_hash}-{env_fp}"


def log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-LOG_TAIL_CHARS * 4 :]
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(lines)[-LOG_TAIL_CHARS:]


def _gpu_index(case: Case) -> int | None:
    dev = case.device
    if dev == "auto":
        import torch

        return 0 if torch.cuda.is_available() else None
    if dev.startswith("cuda"):
        return int(dev.split(":")[1]) if ":" in dev else 0
    return None


def _kill_group(proc: subprocess.Popen, dump_stacks: bool) -> None:
    """Stacks first (faulthandler on SIGUSR1), then SIGKILL to the whole group."""
    if proc.poll() is not None:
        return
    if dump_stacks:
        try:
            os.kill(proc.pid, signal.SIGUSR1)
            proc.wait(timeout=STACK_DUMP_WAIT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def classify(result: dict | None, returncode: int | None, timed_out: bool) -> tuple[str, str]:
    """(status, message) from the child's result file, exit code and the parent's timeout."""
    if timed_out:
        return "timeout", "no result before the wall-clock limit: killed (stacks at the end of the log)"
    if result is not None:
        return result["status"], result.get("message", "")
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        why = " (the kernel's OOM killer sends SIGKILL: check host memory)" if -returncode == signal.SIGKILL else ""
        return "crash", f"killed by {sig}{why}"
    # The child records every failure of the case itself; an exit code without a
    # result means it never got that far (its spec, its imports, its environment).
    return "crash", f"the case's process exited with code {returncode} before recording a result — see its log"


def _summarise(case: Case, result: dict | None) -> dict:
    """Per-stage and total stats over the timed repeats."""
    out: dict = {"stages": {}, "total": res.stats([]), "s_per_step": res.stats([])}
    reps = (result or {}).get("repeats") or []
    if not reps:
        return out
    stage_values: dict[str, list[float]] = {}
    totals = []
    for r in reps:
        named = {_STAGE_OF.get(k, k): v for k, v in r["timings"].items() if k != "sampling"}
        for k, v in named.items():
            stage_values.setdefault(k, []).append(v)
        totals.append(sum(named.values()))
    out["stages"] = {k: res.stats(v) for k, v in sorted(stage_values.items(), key=lambda kv: _stage_rank(kv[0]))}
    out["total"] = res.stats(totals)
    out["s_per_step"] = res.stats([r["s_per_step"] for r in reps if r.get("s_per_step") is not None])
    out["wall"] = res.stats([r["wall_s"] for r in reps])
    return out


def _stage_rank(name: str) -> int:
    return STAGES.index(name) if name in STAGES else len(STAGES)


def _peak(values: list) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _child_env() -> dict[str, str]:
    """The sweep's environment, with this wanrender importable from the child's working
    folder (a source checkout run as PYTHONPATH=src would not be: the path is relative)."""
    import site

    import wanrender

    env = dict(os.environ)
    root = Path(wanrender.__file__).resolve().parents[1]
    installed = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    if (
        root in installed
    ):  # an installed package: the child finds it anyway (site-packages before the stdlib would be wrong)
        return env
    parts = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in parts if p != str(root)])
    return env


def run_case(case: Case, label: str, out_dir: Path, env: dict, run_id: str, keep_work: bool = False) -> dict:
    """Run one case and return its row (not yet written): a wanrender case in a child process,
    a comfyui case on its ComfyUI server (bench/comfyui.py)."""
    if case.engine == "comfyui":
        from wanrender.bench import comfyui

        row = comfyui.run_case(case, label, case_key(case, env["fingerprint"]), out_dir, env, run_id)
        row["log_tail"] = log_tail(Path(row["log"])) if row["status"] != "ok" else ""
        return row
    # The child runs in its own work folder: a path relative to the user's folder
    # would point somewhere else there (every case once "crashed" that way).
    out_dir = Path(out_dir).absolute()
    key = case_key(case, env["fingerprint"])
    work = out_dir / "work" / key
    logs = out_dir / "logs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{key}.log"
    (work / "spec.json").write_text(json.dumps({"case": case.to_json(), "parent_pid": os.getpid()}))
    cmd = [sys.executable, "-m", "wanrender.bench.child", str(work / "spec.json")]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.time()
    log = open(log_path, "ab")
    log.write(f"=== {started} case {label} ({key}) run {run_id}\n".encode())
    log.flush()
    proc = sampler = None
    timed_out = False
    # Everything after the spawn is inside the try: a Ctrl-C that lands while the
    # sampler starts must still kill the case (it once outlived the sweep that way).
    try:
        # A session of its own: the sweep's Ctrl-C does not reach the child directly,
        # and a kill takes the whole group (compile workers included).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(work), env=_child_env())  # fmt: skip
        sampler = Sampler(proc.pid, _gpu_index(case), t0=t0).start()
        try:
            proc.wait(timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, dump_stacks=True)
    except BaseException:  # Ctrl-C or any parent failure: the case must not outlive the sweep
        if proc is not None:
            _kill_group(proc, dump_stacks=False)
        raise
    finally:
        log.close()
        if sampler is not None:
            sampler.stop()
    wall = time.time() - t0
    result = None
    if not timed_out and (work / "result.json").is_file():
        result = json.loads((work / "result.json").read_text())
    status, message = classify(result, proc.returncode, timed_out)
    windows = [(a, b) for name, a, b in (result or {}).get("windows", []) if name != "warmup"]
    tel = sampler.summary(windows)
    reps = (result or {}).get("repeats") or []
    energies = [e for e in tel.pop("energy_j", []) if e is not None]
    row = {
        "schema": res.SCHEMA, "key": key, "case_hash": case.case_hash, "env_fingerprint": env["fingerprint"],
        "run_id": run_id, "label": label, "case": case.to_json(), "status": status, "message": message,
        "started": started, "wall_s": round(wall, 3), "returncode": proc.returncode,
        **_summarise(case, result),
        "load_s": (result or {}).get("load_s"), "warmup_s": (result or {}).get("warmup_s"),
        "pass1_expert": (result or {}).get("pass1_expert"),
        "memory": {
            "torch_allocated_peak": _peak([r.get("torch_allocated_peak") for r in reps]),
            "torch_reserved_peak": _peak([r.get("torch_reserved_peak") for r in reps]),
            "nvml_used_peak": tel.pop("nvml_used_peak_bytes", None),  # the whole case, loading included
            "nvml_used_timed_peak": tel.pop("nvml_used_timed_peak_bytes", None),  # the timed renders only
            "host_rss_peak": (result or {}).get("host_rss_peak_bytes") or sampler.peak_rss,
            "host_rss_timed_peak": tel.pop("rss_timed_peak_bytes", None),
            "device_total": (result or {}).get("device_total_bytes") or sampler.gpu_total_bytes,
            "cap": case.vram_cap_bytes,
            "plan": (result or {}).get("memory_plan"),
            "predicted_peak_gib": ((result or {}).get("predicted") or {}).get("predicted_peak_gib"),
            "predicted_s": ((result or {}).get("predicted") or {}).get("predicted_seconds"),
        },
        "energy_j": {**res.stats(energies), "per": "video (one timed render)"} if energies else None,
        "telemetry": {**tel, "phases": [(n, round(a - t0, 3), round(b - t0, 3)) for n, a, b in (result or {}).get("windows", [])],
                      "samples": sampler.thinned()},
        "plan": (result or {}).get("plan"), "device": (result or {}).get("device"), "gpu": (result or {}).get("gpu"),
        "notes": (result or {}).get("notes", []) + ([tel["note"]] if tel.get("note") else []),
        "log": str(log_path), "log_tail": log_tail(log_path) if status != "ok" else "",
        "env": env, "engine": "wanrender",
    }  # fmt: skip
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return row


def run_sweep(
    matrix: Matrix,
    out_dir: Path,
    resume: bool = False,
    retry_failed: bool = False,
    events: Events | None = None,
    env: dict | None = None,
) -> SweepResult:
    """Run the matrix's cases one after another; rows are appended as cases end."""
    from wanrender.bench.env import snapshot

    out_dir = Path(out_dir).absolute()  # resolved here, against the user's folder, before any child starts
    results_path = out_dir / "results.jsonl"
    env = env or snapshot()
    done = res.read_rows_if_any(results_path).latest_by_key()
    keys = [case_key(c, env["fingerprint"]) for c in matrix.cases]
    already = [k for k in keys if k in done]
    if already and not resume:
        raise WanrenderError(
            f"{results_path} already has {len(already)} of these {len(keys)} cases — "
            "use --resume to skip them, or --out NEW_DIR for a fresh sweep"
        )
    todo = [c for c, k in zip(matrix.cases, keys) if k not in done or (retry_failed and done[k]["status"] != "ok")]
    if any(c.engine == "comfyui" for c in todo):
        from wanrender.bench.comfyui import check_servers

        check_servers(todo)  # an unreachable ComfyUI is the user's to fix, before any case runs
    from wanrender.media.atomic import atomic_write_text

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / f"env-{env['fingerprint']}.json", json.dumps(env, indent=1, default=str))
    except OSError as e:
        raise WanrenderError(f"--out {out_dir}: cannot write the results folder there ({e.strerror}) — "
                             "pass --out a writable folder") from None  # fmt: skip
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    ran: list[dict] = []
    skipped: list[str] = []
    for i, (case, label, key) in enumerate(zip(matrix.cases, matrix.labels, keys)):
        prev = done.get(key)
        if prev is not None and not (retry_failed and prev["status"] != "ok"):
            skipped.append(key)
            if events:
                events("skip", {"index": i, "total": len(keys), "label": label, "key": key, "status": prev["status"]})
            continue
        if events:
            events("start", {"index": i, "total": len(keys), "label": label, "key": key, "case": case})
        try:
            row = run_case(case, label, out_dir, env, run_id)
            res.append_row(results_path, row)
        except OSError as e:  # a full disk, a folder made read-only: the finished rows are kept
            raise WanrenderError(f"{out_dir}: cannot write case {label!r} ({e.strerror}) — free space or fix "
                                 "permissions, then continue with --resume") from None  # fmt: skip
        ran.append(row)
        if events:
            events("done", {"index": i, "total": len(keys), "label": label, "key": key, "row": row})
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    return SweepResult(out_dir, results_path, tuple(ran), tuple(skipped), env)
