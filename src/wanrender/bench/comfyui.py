"""The ``comfyui`` engine of ``bench run``: a case rendered by a ComfyUI server the user runs.

The lab never installs or starts ComfyUI. Per case, on the case's ``server``:
upload the image (``POST /upload/image``), then for the warm-up and each timed
repeat: ``POST /prompt`` with the patched workflow (comfy_workflow.py says what is
patched), follow ``/ws?clientId=`` for each node's start and finish
(``executing``), progress and the end (``execution_success``, ``execution_error``,
``execution_interrupted``), then ``GET /history/{id}`` and ``GET /view`` for the
output file. A case past its timeout gets ``POST /interrupt`` and is dropped from
the queue. Peak VRAM is ``GET /system_stats`` polled during the case: the largest
``vram_total - vram_free`` of the device. That is device-wide (every process on
the GPU counts) and ComfyUI counts memory torch holds in its cache as free, so it
is what the prompt's tensors occupied, not what the process reserved.

The rows have the schema of wanrender's (results.py), with ``engine: comfyui``:
stages ``text_encode`` (CLIPTextEncode), ``vae_encode`` (WanImageToVideo),
``pass1``/``pass2`` (the samplers in execution order: with the KSamplerAdvanced
pair, the high-noise then the low-noise expert), ``vae_decode`` (VAEDecode) and
``video_encode`` (CreateVideo and the save nodes); ``total`` runs from
``execution_start`` to the end of the prompt (loaders and any other node
included, queueing and the output's download not).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from wanrender.bench import comfy_workflow as cw
from wanrender.bench import results as res
from wanrender.bench.matrix import Case
from wanrender.bench.wsclient import WebSocket, WebSocketError
from wanrender.errors import WanrenderError

HTTP_TIMEOUT_S = 30.0
VRAM_POLL_S = 0.1
HISTORY_WAIT_S = 10.0  # how long an ended prompt may take to appear in /history
STAGE_OF_NODE = {"CLIPTextEncode": "text_encode", "WanImageToVideo": "vae_encode", "VAEDecode": "vae_decode",
                 "VAEDecodeTiled": "vae_decode", "CreateVideo": "video_encode", "SaveVideo": "video_encode",
                 "VHS_VideoCombine": "video_encode", "SaveAnimatedWEBP": "video_encode", "SaveWEBM": "video_encode"}  # fmt: skip
OOM_TEXT = ("out of memory", "outofmemoryerror")


class Unreachable(OSError):
    pass


def http(method: str, url: str, body: bytes | None = None, ctype: str = "application/json",
         timeout: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:  # fmt: skip
    """(status, body); an HTTP error status is an answer, no answer at all raises Unreachable."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or e
        raise Unreachable(str(getattr(why, "strerror", None) or why)) from None


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def probe(server: str, timeout: float = 5.0) -> dict:
    """ComfyUI's ``/system_stats``, or a one-line error saying how to make the server reachable."""
    try:
        status, body = http("GET", f"{server}/system_stats", timeout=timeout)
    except Unreachable as e:
        raise WanrenderError(f"ComfyUI at {server} is not reachable ({e}) — start ComfyUI there first (the lab "
                             "never starts it) or fix the case's server:") from None  # fmt: skip
    stats = _json(body)
    if status != 200 or not isinstance(stats, dict) or not isinstance(stats.get("devices"), list):
        raise WanrenderError(f"{server} answered /system_stats with HTTP {status}, not ComfyUI's system stats — "
                             "point server: at a ComfyUI")  # fmt: skip
    return stats


def check_servers(cases: list[Case]) -> None:
    """Every comfyui case's server answers, before the sweep starts anything."""
    for server in dict.fromkeys(c.server for c in cases if c.engine == "comfyui"):
        probe(server)


def upload_image(server: str, image: Path, name: str) -> str:
    """``POST /upload/image`` (field ``image``, ``overwrite=true``): the name LoadImage takes."""
    boundary = uuid.uuid4().hex
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
              "Content-Type: application/octet-stream\r\n\r\n").encode() + image.read_bytes() + b"\r\n"]  # fmt: skip
    for k, v in (("overwrite", "true"), ("type", "input")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, data = http("POST", f"{server}/upload/image", body, f"multipart/form-data; boundary={boundary}")
    got = _json(data)
    if status != 200 or not isinstance(got, dict) or not got.get("name"):
        raise RuntimeError(f"ComfyUI refused the image upload (HTTP {status}): {data[:200]!r}")
    return f"{got['subfolder']}/{got['name']}" if got.get("subfolder") else str(got["name"])


class VramPoller:
    """``/system_stats`` every VRAM_POLL_S: (seconds since t0, device bytes in use) of the busiest device."""

    def __init__(self, server: str, t0: float) -> None:
        self.server, self.t0 = server, t0
        self.samples: list[tuple[float, int]] = []
        self.total: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="comfy-vram", daemon=True)

    def start(self) -> VramPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                _, body = http("GET", f"{self.server}/system_stats", timeout=2.0)
                devs = [d for d in (_json(body) or {}).get("devices", []) if d.get("vram_total")]
            except (Unreachable, AttributeError):
                devs = []
            if devs:
                used = max(int(d["vram_total"]) - int(d.get("vram_free") or 0) for d in devs)
                self.total = max(int(d["vram_total"]) for d in devs)
                self.samples.append((round(time.time() - self.t0, 3), used))
            self._stop.wait(VRAM_POLL_S)

    def peak(self, windows: list[tuple[float, float]] | None = None) -> int | None:
        vals = [u for t, u in self.samples if windows is None or any(a <= t <= b for a, b in windows)]
        return max(vals) if vals else None


@dataclass
class Run:
    """One prompt's course as the websocket told it."""

    status: str = "ok"
    message: str = ""
    prompt_id: str = ""
    submitted: float | None = None  # POST /prompt
    start: float | None = None  # execution_start
    end: float | None = None
    nodes: list[list] = field(default_factory=list)  # [node id, class_type, start, end]
    steps: dict[str, int] = field(default_factory=dict)  # node -> progress max
    cached: list[str] = field(default_factory=list)
    last_progress: str = ""


class Session:
    """One case's connection to ComfyUI: its websocket, its log."""

    def __init__(self, server: str, log) -> None:
        self.server, self.log = server, log
        self.client_id = uuid.uuid4().hex
        self.current = ""  # the prompt being followed: what a Ctrl-C interrupts
        u = urlsplit(server)
        scheme = "wss" if u.scheme == "https" else "ws"
        self.ws = WebSocket.connect(f"{scheme}://{u.netloc}{u.path}/ws?clientId={self.client_id}")

    def say(self, msg: str) -> None:
        self.log.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
        self.log.flush()

    def submit(self, prompt: dict) -> tuple[str | None, str]:
        """(prompt_id, '') or (None, why ComfyUI refused it)."""
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        status, data = http("POST", f"{self.server}/prompt", body)
        got = _json(data)
        if status == 200 and isinstance(got, dict) and got.get("prompt_id"):
            return str(got["prompt_id"]), ""
        return None, _refusal(status, got, data)

    def follow(self, run: Run, deadline: float, limit_s: float) -> None:
        """Read the websocket until the prompt ends or the deadline passes (then status timeout)."""
        current: list | None = None
        kinds = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                run.status = "timeout"
                where = f" at node {current[0]} ({current[1]}){run.last_progress}" if current else ""
                run.message = (
                    f"no result from ComfyUI within the case's timeout_s ({limit_s:g} s){where}: interrupted the prompt"
                )
                return
            msg = self.ws.recv(min(left, 1.0))
            if not isinstance(msg, str):
                continue  # a timeout slice, or a binary preview image
            m = _json(msg)
            if not isinstance(m, dict) or not isinstance(m.get("data"), dict):
                continue
            kind, d, now = m.get("type"), m["data"], time.time()
            if d.get("prompt_id") not in (None, run.prompt_id):
                continue  # another client's prompt
            if kind == "execution_start":
                run.start = now
            elif kind == "execution_cached":
                run.cached = [str(n) for n in d.get("nodes") or []]
            elif kind == "executing" and "prompt_id" in d:
                if current is not None:
                    current[3] = now
                if d.get("node") is None:
                    run.end = now
                    return
                nid = str(d["node"])
                kinds.setdefault(nid, self.prompt.get(nid, {}).get("class_type", "?"))
                current = [nid, kinds[nid], now, None]
                run.nodes.append(current)
            elif kind == "progress":
                run.steps[str(d.get("node"))] = int(d.get("max") or 0)
                run.last_progress = f", step {d.get('value')}/{d.get('max')}"
            elif kind == "execution_success":
                if current is not None and current[3] is None:
                    current[3] = now
                run.end = now
                return
            elif kind in ("execution_error", "execution_interrupted"):
                run.end = now
                run.status, run.message = _failure(kind, d)
                return

    def interrupt(self, prompt_id: str) -> None:
        """Stop the prompt if it runs, drop it from the queue if it waits (best effort)."""
        for path, body in (("/interrupt", {"prompt_id": prompt_id}), ("/queue", {"delete": [prompt_id]})):
            try:
                http("POST", f"{self.server}{path}", json.dumps(body).encode(), timeout=5.0)
            except Unreachable:
                pass

    def output(self, prompt_id: str, dest: Path) -> Path | None:
        """The prompt's first output file (``/history`` then ``/view``), saved as dest + its suffix."""
        # ComfyUI announces the end ("executing" with node null) before it files the
        # prompt's history: a real 0.3.64 server answered {} for a few milliseconds.
        give_up = time.monotonic() + HISTORY_WAIT_S
        while True:
            status, data = http("GET", f"{self.server}/history/{quote(prompt_id)}")
            hist = (_json(data) or {}).get(prompt_id) if status == 200 else None
            if isinstance(hist, dict) or time.monotonic() > give_up:
                break
            time.sleep(0.05)
        if not isinstance(hist, dict):
            raise RuntimeError(f"ComfyUI has no history for prompt {prompt_id} (HTTP {status})")
        for node_out in (hist.get("outputs") or {}).values():
            for items in (node_out or {}).values():
                for it in items if isinstance(items, list) else []:
                    if isinstance(it, dict) and it.get("filename"):
                        q = urlencode({"filename": it["filename"], "subfolder": it.get("subfolder", ""),
                                       "type": it.get("type", "output")})  # fmt: skip
                        status, blob = http("GET", f"{self.server}/view?{q}")
                        if status != 200 or not blob:
                            raise RuntimeError(f"ComfyUI would not send the output {it['filename']} (HTTP {status})")
                        path = dest.with_suffix(Path(it["filename"]).suffix or ".bin")
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(blob)
                        return path
        return None

    def render(self, prompt: dict, deadline: float, limit_s: float) -> Run:
        self.prompt = prompt
        t = time.time()
        pid, why = self.submit(prompt)
        if pid is None:
            return Run(status="error", message=why)
        run = Run(prompt_id=pid, submitted=t)
        self.current = pid
        self.say(f"prompt {pid} queued")
        self.follow(run, deadline, limit_s)
        if run.status == "timeout":
            self.interrupt(pid)
        self.current = ""
        for nid, kind, a, b in run.nodes:
            self.say(f"node {nid} ({kind}): {((b or a) - a):.3f} s")
        self.say(f"prompt {pid}: {run.status} {run.message}".rstrip())
        return run


def _refusal(status: int, got: object, raw: bytes) -> str:
    """ComfyUI's 400 for /prompt in one line: the error, then the first node error."""
    if not isinstance(got, dict):
        return f"ComfyUI refused the prompt (HTTP {status}): {raw[:200].decode(errors='replace')}"
    err = got.get("error") or {}
    text = err.get("message") if isinstance(err, dict) else str(err)
    for nid, ne in (got.get("node_errors") or {}).items():
        first = ((ne or {}).get("errors") or [{}])[0]
        detail = f": {first.get('details')}" if first.get("details") else ""
        text = f"{text}; node {nid} ({(ne or {}).get('class_type')}): {first.get('message')}{detail}"
        break
    return f"ComfyUI refused the workflow (HTTP {status}): {text} — fix the workflow or the case"


def _failure(kind: str, d: dict) -> tuple[str, str]:
    where = f"node {d.get('node_id')} ({d.get('node_type')})"
    if kind == "execution_interrupted":
        return "error", f"ComfyUI interrupted the prompt at {where} (stopped from another client?)"
    text = f"{d.get('exception_type') or 'error'}: {str(d.get('exception_message') or '').strip()}"
    status = "oom" if any(t in text.lower() for t in OOM_TEXT) else "error"
    return status, f"ComfyUI failed at {where}: {text.splitlines()[0][:400]}"


def stages(run: Run) -> dict[str, float]:
    """Seconds per stage name (see the module doc); samplers are numbered in execution order."""
    out: dict[str, float] = {}
    n = 0
    for _, kind, a, b in run.nodes:
        if b is None:
            continue
        if kind in cw.SAMPLERS:
            n += 1
            name = f"pass{n}"
        else:
            name = STAGE_OF_NODE.get(kind)
            if name is None:
                continue
        out[name] = out.get(name, 0.0) + (b - a)
    return out


def _image(case: Case) -> Path:
    if case.image == "demo":
        from wanrender.demo import demo_image

        return Path(demo_image())
    return Path(case.image_path or case.image)


def _workflow(case: Case) -> dict:
    if not case.workflow:
        return cw.exported_workflow(case)
    return cw.read_workflow(Path(case.workflow_path or case.workflow))


def run_case(case: Case, label: str, key: str, out_dir: Path, env: dict, run_id: str) -> dict:
    """Render the case on its ComfyUI server: warm-up, then ``repeats`` timed renders; its row."""
    out_dir = Path(out_dir).absolute()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "logs" / f"{key}.log"
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.time()
    deadline = time.monotonic() + case.timeout_s
    poller = VramPoller(case.server, t0)
    runs: list[tuple[str, Run]] = []
    info: dict = {"server": case.server}
    status, message, output, session = "ok", "", None, None
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"=== {started} case {label} ({key}) run {run_id} on ComfyUI {case.server}\n")
        try:
            stats = probe(case.server)
            info.update(version=(stats.get("system") or {}).get("comfyui_version"),
                        devices=[d.get("name") for d in stats.get("devices") or []])  # fmt: skip
            poller.start()
            session = Session(case.server, log)
            wf = _workflow(case)
            name = upload_image(case.server, _image(case), f"wanrender-{case.case_hash}{_image(case).suffix}")
            values = {k: getattr(case, k) for k in cw.FIELDS}
            plan = (["warmup"] if case.warmup else []) + [f"repeat {i + 1}" for i in range(case.repeats)]
            for phase in plan:
                session.say(f"{phase}: render")
                run = session.render(cw.patch(wf, name, values, f"{run_id}-{phase}"), deadline, case.timeout_s)
                runs.append((phase, run))
                if run.status != "ok":
                    status, message = run.status, run.message
                    break
                skipped = [n for n, nd in session.prompt.items() if nd["class_type"] in cw.SAMPLERS
                           and n not in {x[0] for x in run.nodes}]  # fmt: skip
                if not run.nodes and phase != "warmup":
                    status = "error"
                    message = (f"ComfyUI served the whole render from its cache (no node ran): nothing to time — "
                               f"its cache ignored the lab's per-render input {cw.NONCE!r}; report this with the version")  # fmt: skip
                    break
                if skipped and phase != "warmup":
                    status = "error"
                    message = (f"ComfyUI served sampler node {skipped[0]} from its cache: nothing to time — its "
                               f"cache ignored the lab's per-render input {cw.NONCE!r}; report this with the version")  # fmt: skip
                    break
                output = session.output(run.prompt_id, out_dir / "outputs" / key) or output
        except (WanrenderError, Unreachable, WebSocketError, RuntimeError, OSError) as e:
            status, message = "error", str(e).splitlines()[0] if str(e) else type(e).__name__
            session and session.say(f"error: {message}")
        except BaseException:  # Ctrl-C: ComfyUI must not go on rendering for a sweep that is gone
            if session is not None and session.current:
                session.interrupt(session.current)
            raise
        finally:
            poller.stop()
            if session is not None:
                session.ws.close()
    return _row(case, label, key, env, run_id, started, t0, runs, status, message, poller, info, output, log_path)


def _row(case, label, key, env, run_id, started, t0, runs, status, message, poller, info, output, log_path) -> dict:
    timed = [r for phase, r in runs if phase != "warmup" and r.status == "ok" and r.start and r.end]
    warm = next((r for phase, r in runs if phase == "warmup"), None)
    per = [stages(r) for r in timed]
    order = ("text_encode", "vae_encode", "pass", "vae_decode", "video_encode")  # the render's order
    names = sorted({k for s in per for k in s}, key=lambda k: (order.index(k.rstrip("0123456789")), k))
    windows = [(r.start - t0, r.end - t0) for r in timed]
    steps = [sum(r.steps.get(n[0], 0) for n in r.nodes if n[1] in cw.SAMPLERS) for r in timed]
    spp = [sum(v for k, v in s.items() if k.startswith("pass")) / n for s, n in zip(per, steps) if n]
    phases = [(p, round(r.start - t0, 3), round(r.end - t0, 3)) for p, r in runs if r.start and r.end]
    return {
        "schema": res.SCHEMA, "key": key, "case_hash": case.case_hash, "env_fingerprint": env["fingerprint"],
        "run_id": run_id, "label": label, "case": case.to_json(), "engine": "comfyui", "status": status,
        "message": message, "started": started, "wall_s": round(time.time() - t0, 3), "returncode": None,
        "stages": {k: res.stats([s.get(k, 0.0) for s in per]) for k in names},
        "total": res.stats([r.end - r.start for r in timed]), "s_per_step": res.stats(spp),
        "wall": res.stats([r.end - (r.submitted or r.start) for r in timed]),
        "load_s": None, "warmup_s": round(warm.end - warm.start, 3) if warm and warm.start and warm.end else None,
        "pass1_expert": "high" if any(n[1] == "KSamplerAdvanced" for r in timed for n in r.nodes) else None,
        "memory": {"server_vram_peak": poller.peak(), "server_vram_timed_peak": poller.peak(windows),
                   "device_total": poller.total},
        "energy_j": None,
        "telemetry": {"fields": ["t", "server_vram_mib"], "phases": phases,
                      "samples": [[t, round(u / 2**20, 1)] for t, u in poller.samples[:: max(1, len(poller.samples) // 400)]]},
        "plan": None, "device": f"comfyui {case.server}", "gpu": {"name": ", ".join(info.get("devices") or [])} or None,
        "comfyui": info, "output": str(output) if output else None,
        "notes": ["peak VRAM: ComfyUI's /system_stats, device-wide (total - free), not per process"],
        "log": str(log_path), "log_tail": "", "env": env,  # the runner adds the tail
    }  # fmt: skip
