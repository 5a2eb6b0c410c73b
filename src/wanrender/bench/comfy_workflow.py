"""What the lab reads from and writes into a ComfyUI workflow (API format) for a ``comfyui`` case.

The API (prompt) format is a mapping of node id -> ``{"class_type", "inputs"}``;
an input is a literal value or a link ``[node_id, output_index]``. The editor (UI)
format cannot be sent to ``/prompt`` as it is (its widget values are positional,
and turning them into named inputs needs ComfyUI's node definitions), so it is
refused with how to export the API format.

Read from the workflow (to fill the case's fields the matrix does not set) and
written back from the case (only literal inputs; a linked one is left as it is):

- ``LoadImage.image``: the uploaded image (every LoadImage node);
- ``WanImageToVideo.width / height / length``: resolution and frames;
- ``KSamplerAdvanced.steps / noise_seed`` and, with two of them, the switch
  (the first pass's ``end_at_step``, the second's ``start_at_step``);
  ``KSampler.steps / seed``.

Every node that does not load or patch a model (its type names neither a
``Loader`` nor ``ModelSampling``) also gets an input ComfyUI does not declare,
``wanrender_run``, set per render: ComfyUI passes a node only the inputs it
declares, but keys its output cache on all of them, so each timed render runs
again from the image and the text on, while the loaded models stay cached, as in
wanrender's timed renders. (Checked against a real ComfyUI 0.3.64 server: with the
input only on CLIPTextEncode, a workflow without one was served whole from the
cache, in 0.004 s.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from wanrender.errors import WanrenderError

SAMPLERS = ("KSamplerAdvanced", "KSampler")
# The case fields a workflow can give (Case field -> where it is read).
FIELDS = ("frames", "width", "height", "steps", "switch", "seed")
NONCE = "wanrender_run"
KEEP_CACHED = ("Loader", "ModelSampling")  # node types whose outputs (models) stay cached between renders


def _literal(v: object) -> bool:
    return not isinstance(v, list)  # a list is a link [node_id, output]


def read_workflow(path: Path) -> dict:
    """The workflow at ``path`` in API format, checked node by node (one-line errors)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WanrenderError(f"workflow {path} not found — fix the path in the matrix") from None
    except OSError as e:
        raise WanrenderError(f"workflow {path}: cannot read it ({e.strerror}) — check the file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WanrenderError(f"workflow {path}: not JSON ({str(e).splitlines()[0]}) — export it from ComfyUI "
                             "with Workflow → Export (API)") from None  # fmt: skip
    return check_api(doc, str(path))


def check_api(doc: object, where: str) -> dict:
    if isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and "links" in doc:
        raise WanrenderError(f"workflow {where} is in ComfyUI's editor (UI) format — the lab sends the API format: "
                             "export it with Workflow → Export (API) and name that file")  # fmt: skip
    if isinstance(doc, dict) and isinstance(doc.get("prompt"), dict):
        doc = doc["prompt"]  # a saved /prompt request body
    if not isinstance(doc, dict) or not doc:
        raise WanrenderError(f"workflow {where}: not a ComfyUI API workflow (a mapping of node id -> "
                             "{class_type, inputs}) — export it with Workflow → Export (API)")  # fmt: skip
    for nid, node in doc.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WanrenderError(f"workflow {where}: node {nid!r} has no class_type — export the workflow with "
                                 "Workflow → Export (API)")  # fmt: skip
        if not isinstance(node.get("inputs", {}), dict):
            raise WanrenderError(f"workflow {where}: node {nid!r} ({node['class_type']}) has inputs that are not a "
                                 "mapping — export the workflow again")  # fmt: skip
        for name, v in (node.get("inputs") or {}).items():
            if isinstance(v, list) and (len(v) != 2 or str(v[0]) not in doc):
                raise WanrenderError(f"workflow {where}: node {nid} ({node['class_type']}) input {name!r} links to "
                                     f"{v!r}, which is not a node of the workflow — export it again")  # fmt: skip
    if not any(n["class_type"] == "LoadImage" for n in doc.values()):
        raise WanrenderError(f"workflow {where} has no LoadImage node — the lab uploads the case's image into one; "
                             "use an image-to-video workflow")  # fmt: skip
    return doc


def _of(wf: dict, kind: str) -> list[tuple[str, dict]]:
    return [(nid, n.get("inputs") or {}) for nid, n in wf.items() if n["class_type"] == kind]


def _advanced(wf: dict) -> list[tuple[str, dict]]:
    """The KSamplerAdvanced nodes in pass order (by start step)."""
    nodes = _of(wf, "KSamplerAdvanced")
    return sorted(nodes, key=lambda kv: kv[1].get("start_at_step") if _literal(kv[1].get("start_at_step")) else 0)


def settings(wf: dict) -> dict:
    """The case fields the workflow sets as literals: frames, width, height, steps, switch, seed."""
    out: dict = {}
    for _, inp in _of(wf, "WanImageToVideo")[:1]:
        for field, key in (("frames", "length"), ("width", "width"), ("height", "height")):
            if _literal(inp.get(key)) and isinstance(inp.get(key), int):
                out[field] = inp[key]
    adv = _advanced(wf)
    plain = _of(wf, "KSampler")
    for _, inp in adv[:1] or plain[:1]:
        if _literal(inp.get("steps")) and isinstance(inp.get("steps"), int):
            out["steps"] = inp["steps"]
    seeded = [inp for _, inp in adv if inp.get("add_noise", "enable") == "enable"] or [i for _, i in adv]
    for inp in seeded[:1]:
        if isinstance(inp.get("noise_seed"), int):
            out["seed"] = inp["noise_seed"]
    for _, inp in plain[:1]:
        if "seed" not in out and isinstance(inp.get("seed"), int):
            out["seed"] = inp["seed"]
    if len(adv) == 2:
        end = adv[0][1].get("end_at_step")
        if isinstance(end, int) and end < out.get("steps", end + 1):
            out["switch"] = end
    return out


def patch(wf: dict, image_name: str, values: dict, run: str) -> dict:
    """A copy of ``wf`` with the uploaded image, the case's values and the per-render input (see the module doc)."""
    out = copy.deepcopy(wf)

    def put(inp: dict, key: str, value: object) -> None:
        if value is not None and key in inp and _literal(inp[key]):
            inp[key] = value

    for nid, node in out.items():
        inp = node.setdefault("inputs", {})
        kind = node["class_type"]
        if kind == "LoadImage":
            inp["image"] = image_name
        elif kind == "WanImageToVideo":
            put(inp, "length", values.get("frames"))
            put(inp, "width", values.get("width"))
            put(inp, "height", values.get("height"))
        elif kind == "KSamplerAdvanced":
            put(inp, "steps", values.get("steps"))
            put(inp, "noise_seed", values.get("seed"))
        elif kind == "KSampler":
            put(inp, "steps", values.get("steps"))
            put(inp, "seed", values.get("seed"))
        if not any(word in kind for word in KEEP_CACHED):
            inp[NONCE] = run
    adv = _advanced(out)
    if len(adv) == 2 and values.get("switch") is not None:
        put(adv[0][1], "end_at_step", values["switch"])
        put(adv[1][1], "start_at_step", values["switch"])
    return out


def exported_workflow(case: object) -> dict:
    """The workflow of a case without ``workflow:``: what ``wanrender workflow export``
    writes for the case's request (the Wan 2.2 i2v template's shape and model file
    names), so ComfyUI renders what the matching wanrender case renders."""
    from wanrender.request import from_preset
    from wanrender.workflow.export import to_api

    image = Path(getattr(case, "image_path", None) or "input.png")  # LoadImage is patched to the upload anyway
    req = from_preset(case.preset, image, case.prompt, frames=case.frames, width=case.width, height=case.height,
                      steps=case.steps, switch=case.switch, seed=case.seed)  # fmt: skip
    return to_api(req)
