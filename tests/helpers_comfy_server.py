"""A stand-in for a ComfyUI server, written from ComfyUI's documented routes and websocket
messages (it is not ComfyUI, and runs no model): stdlib http.server plus a minimal
WebSocket server side, so the tests need nothing that may be missing.

Routes: POST /upload/image, POST /prompt (checks the prompt is a mapping of nodes with
class_type and inputs whose links resolve, and that LoadImage names an uploaded file;
a 400 with node_errors otherwise), GET /ws (WebSocket: status, execution_start,
execution_cached, executing, progress, executed, execution_success / execution_error /
execution_interrupted), GET /history/{id}, GET /view, GET /system_stats, POST /interrupt,
POST /queue. Like ComfyUI it caches a node's output while its inputs and its ancestors'
are unchanged. A prompt asks for a failure through its CLIPTextEncode text:
``simulate:oom`` (an execution_error with the allocator's words at the first sampler's
first step), ``simulate:hang`` (the first sampler blocks until /interrupt),
``simulate:reject`` (a 400 from /prompt with node_errors).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from wanrender.bench.wsclient import CLOSE, TEXT, accept_key, encode_frame

GIB = 2**30
HISTORY_LAG_S = 0.05  # ComfyUI files a prompt's history a moment after its end message
OUTPUTS = ("SaveVideo", "VHS_VideoCombine", "SaveAnimatedWEBP")
KNOWN = ("UNETLoader", "CLIPLoader", "VAELoader", "LoraLoaderModelOnly", "ModelSamplingSD3", "CLIPTextEncode",
         "LoadImage", "WanImageToVideo", "KSamplerAdvanced", "KSampler", "VAEDecode", "CreateVideo",
         "RepeatImageBatch") + OUTPUTS  # fmt: skip


def small_mp4(path: Path) -> bytes:
    import numpy as np

    from wanrender.media.video import write_video

    frames = np.zeros((5, 64, 80, 3), np.uint8) + np.arange(5, dtype=np.uint8)[:, None, None, None] * 40
    write_video(frames, path)
    return path.read_bytes()


def _links(node: dict) -> list[str]:
    return [str(v[0]) for v in (node.get("inputs") or {}).values() if isinstance(v, list)]


class StandIn:
    def __init__(self, folder: Path, node_s: float = 0.01, step_s: float = 0.03) -> None:
        self.node_s, self.step_s = node_s, step_s
        self.video = small_mp4(folder / "stand-in.mp4")
        self.uploads: dict[str, bytes] = {}
        self.prompts: list[dict] = []  # every accepted prompt, as received
        self.history: dict[str, dict] = {}
        self.interrupts: list[dict] = []
        self.deleted: list[str] = []
        self.cache: set[str] = set()
        self.ui_cache: dict[str, dict] = {}
        self.ignore_nonce = False  # a test switch: a server whose cache would not see the lab's input
        self.clients: dict[str, tuple] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.stop_flag = threading.Event()
        self.interrupt_flag = threading.Event()
        self.used = 1 * GIB
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self  # type: ignore[attr-defined]
        self.threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True),
                        threading.Thread(target=self._work, daemon=True)]  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> StandIn:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.interrupt_flag.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- /prompt --------------------------------------------------------------------------
    def check(self, prompt: object) -> tuple[dict, dict]:
        """(error, node_errors), both empty when the prompt would run."""
        if not isinstance(prompt, dict) or not prompt:
            return {"type": "invalid_prompt", "message": "Cannot execute because the prompt is not a dict"}, {}
        errs: dict = {}
        for nid, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
                return {"type": "invalid_prompt", "message": f"Node {nid} has no class_type or inputs"}, {}
            kind, inp = node["class_type"], node["inputs"]
            problem = None
            if kind not in KNOWN:
                problem = (f"Node '{kind}' not found", "")
            elif any(link not in prompt for link in _links(node)):
                problem = ("Bad linked input", "a link to a node that does not exist")
            elif kind == "LoadImage" and inp.get("image") not in self.uploads:
                problem = ("Invalid image file", str(inp.get("image")))
            elif kind == "CLIPTextEncode" and "simulate:reject" in str(inp.get("text")):
                problem = ("Value not in list", "sampler_name: 'fancy' not in ['euler', 'uni_pc']")
            if problem:
                errs[nid] = {"errors": [{"type": "value_not_in_list", "message": problem[0], "details": problem[1]}],
                             "dependent_outputs": [], "class_type": kind}  # fmt: skip
        if errs:
            return {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}, errs
        if not any(n["class_type"] in OUTPUTS for n in prompt.values()):
            return {"type": "prompt_no_outputs", "message": "Prompt has no outputs"}, {}
        return {}, {}

    # --- execution ------------------------------------------------------------------------
    def send(self, client: str, kind: str, data: dict) -> None:
        conn = self.clients.get(client)
        if conn is None:
            return
        wfile, lock = conn
        with lock:
            try:  # the handler's wfile writes through to the socket; it is closed once the client has gone
                wfile.write(encode_frame(TEXT, json.dumps({"type": kind, "data": data}).encode(), mask=False))
            except (OSError, ValueError):
                self.clients.pop(client, None)

    def _order(self, prompt: dict) -> list[str]:
        out: list[str] = []

        def visit(nid: str) -> None:
            if nid in out:
                return
            for up in _links(prompt[nid]):
                visit(up)
            out.append(nid)

        for nid, node in prompt.items():
            if node["class_type"] in OUTPUTS:
                visit(nid)
        return out

    def _signature(self, prompt: dict, nid: str) -> str:
        node = prompt[nid]
        ups = {k: self._signature(prompt, str(v[0])) if isinstance(v, list) else v for k, v in node["inputs"].items()
               if not (self.ignore_nonce and k == "wanrender_run")}  # fmt: skip
        return json.dumps([node["class_type"], ups], sort_keys=True)

    def _work(self) -> None:
        while not self.stop_flag.is_set():
            try:
                pid, prompt, client = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self.interrupt_flag.clear()
            self._execute(pid, prompt, client)

    def _execute(self, pid: str, prompt: dict, client: str) -> None:
        text = " ".join(str(n["inputs"].get("text")) for n in prompt.values() if n["class_type"] == "CLIPTextEncode")
        order = self._order(prompt)
        sigs = {nid: self._signature(prompt, nid) for nid in order}
        # Output nodes are cached too, with their UI (a real ComfyUI 0.3.64 served a whole
        # repeated prompt from its cache, outputs included, in 4 ms).
        cached = [nid for nid in order if sigs[nid] in self.cache]
        self.send(client, "execution_start", {"prompt_id": pid, "timestamp": int(time.time() * 1000)})
        self.send(client, "execution_cached", {"nodes": cached, "prompt_id": pid})
        outputs: dict = {}
        first_sampler = True
        for nid in order:
            if nid in cached:
                if sigs[nid] in self.ui_cache:
                    outputs[nid] = self.ui_cache[sigs[nid]]
                continue
            kind, inp = prompt[nid]["class_type"], prompt[nid]["inputs"]
            self.send(client, "executing", {"node": nid, "display_node": nid, "prompt_id": pid})
            if kind in ("KSamplerAdvanced", "KSampler"):
                steps = int(inp.get("steps", 1))
                a = int(inp.get("start_at_step", 0)) if kind == "KSamplerAdvanced" else 0
                b = min(int(inp.get("end_at_step", steps)), steps) if kind == "KSamplerAdvanced" else steps
                self.used += 3 * GIB
                try:
                    for i in range(max(1, b - a)):
                        if first_sampler and "simulate:hang" in text:
                            self.interrupt_flag.wait()
                            if self.stop_flag.is_set():
                                return
                            self.send(client, "execution_interrupted",
                                      {"prompt_id": pid, "node_id": nid, "node_type": kind, "executed": []})  # fmt: skip
                            return
                        time.sleep(self.step_s)
                        self.send(client, "progress", {"value": i + 1, "max": b - a, "prompt_id": pid, "node": nid})
                        if first_sampler and "simulate:oom" in text:
                            msg = ("Allocation on device 0 would exceed allowed memory. (out of memory)\n"
                                   "Currently allocated     : 139.20 GiB")  # fmt: skip
                            self.send(client, "execution_error",
                                      {"prompt_id": pid, "node_id": nid, "node_type": kind, "executed": [],
                                       "exception_message": msg, "exception_type": "torch.OutOfMemoryError",
                                       "traceback": [], "current_inputs": {}, "current_outputs": {}})  # fmt: skip
                            return
                finally:
                    self.used -= 3 * GIB
                first_sampler = False
            else:
                time.sleep(self.node_s)
            self.cache.add(sigs[nid])
            if kind in OUTPUTS:
                name = f"wan_{len(self.history) + 1:05d}_.mp4"
                ui = {"images": [{"filename": name, "subfolder": "video", "type": "output"}], "animated": [True]}
                outputs[nid] = self.ui_cache[sigs[nid]] = ui
                self.send(client, "executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid})
        self.send(client, "execution_success", {"prompt_id": pid, "timestamp": int(time.time() * 1000)})
        self.send(client, "executing", {"node": None, "prompt_id": pid})
        time.sleep(HISTORY_LAG_S)  # like ComfyUI: the history is filed after the end is announced
        self.history[pid] = {"prompt": [0, pid, prompt, {}, list(outputs)], "outputs": outputs,
                             "status": {"status_str": "success", "completed": True, "messages": []}}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:  # quiet: the tests read the lab's logs, not these
        pass

    @property
    def app(self) -> StandIn:
        return self.server.app  # type: ignore[attr-defined]

    def _reply(self, status: int, body: object, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket(q.get("clientId") or uuid.uuid4().hex)
        if u.path == "/system_stats":
            total = 24 * GIB
            dev = {"name": "cuda:0 stand-in GPU", "type": "cuda", "index": 0, "vram_total": total,
                   "vram_free": total - self.app.used, "torch_vram_total": 0, "torch_vram_free": 0}  # fmt: skip
            return self._reply(200, {"system": {"os": "posix", "comfyui_version": "stand-in", "python_version": "",
                                                "pytorch_version": "", "argv": []}, "devices": [dev]})  # fmt: skip
        if u.path.startswith("/history/"):
            pid = u.path.split("/", 2)[2]
            return self._reply(200, {pid: self.app.history[pid]} if pid in self.app.history else {})
        if u.path == "/view":
            known = any(it.get("filename") == q.get("filename") for h in self.app.history.values()
                        for o in h["outputs"].values() for it in o.get("images", []))  # fmt: skip
            return self._reply(200, self.app.video, "video/mp4") if known else self._reply(404, b"", "text/plain")
        self._reply(404, b"", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        u = urlsplit(self.path)
        body = self._body()
        if u.path == "/upload/image":
            msg = BytesParser(policy=HTTP).parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
            )
            fields = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
            if "image" not in fields:
                return self._reply(400, b"", "text/plain")
            name = fields["image"].get_filename()
            self.app.uploads[name] = fields["image"].get_payload(decode=True)
            return self._reply(200, {"name": name, "subfolder": "", "type": "input"})
        data = json.loads(body or b"{}")
        if u.path == "/prompt":
            error, node_errors = self.app.check(data.get("prompt"))
            if error:
                return self._reply(400, {"error": error, "node_errors": node_errors})
            pid = uuid.uuid4().hex
            self.app.prompts.append(data["prompt"])
            self.app.jobs.put((pid, data["prompt"], data.get("client_id")))
            return self._reply(200, {"prompt_id": pid, "number": len(self.app.prompts), "node_errors": {}})
        if u.path == "/interrupt":
            self.app.interrupts.append(data)
            self.app.interrupt_flag.set()
            return self._reply(200, b"", "text/plain")
        if u.path == "/queue":
            self.app.deleted += data.get("delete") or []
            return self._reply(200, b"", "text/plain")
        self._reply(404, b"", "text/plain")

    def _websocket(self, client: str) -> None:
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept_key(self.headers["Sec-WebSocket-Key"]))
        self.end_headers()
        self.wfile.flush()
        self.app.clients[client] = (self.wfile, threading.Lock())
        self.app.send(client, "status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client})
        try:
            while not self.app.stop_flag.is_set():  # read the client's frames until it closes
                head = self.rfile.read(2)
                if len(head) < 2:
                    break
                n = head[1] & 0x7F
                if n == 126:
                    n = int.from_bytes(self.rfile.read(2), "big")
                elif n == 127:
                    n = int.from_bytes(self.rfile.read(8), "big")
                self.rfile.read(4 + n)  # the mask and the payload: nothing a client says matters here
                if head[0] & 0x0F == CLOSE:
                    break
        except OSError:
            pass
        self.app.clients.pop(client, None)
        self.close_connection = True
