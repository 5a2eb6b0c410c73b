"""Evaluate a workflow backwards from its output node, symbolically.

Only what the output needs is visited: a muted node, a bypassed one (its inputs pass
through to outputs of the same type), the unchosen side of a switch, or a branch no
output reads never counts. Nodes compute descriptions, not tensors: a loader gives a
file name, a sampler its settings; every scalar is a ``Val`` that carries where it
came from (node id, type, widget or link), so ``workflow show`` can say it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from wanrender.errors import WanrenderError, shown
from wanrender.workflow import expr
from wanrender.workflow.graph import Graph, Link, Node
from wanrender.workflow.nodes import CONTROL, OTHER_FAMILY, OUTPUTS, SPECS


@dataclass(frozen=True)
class Val:
    value: Any
    src: str
    control: str | None = None  # a seed's control_after_generate


@dataclass(frozen=True)
class Model:
    file: Val
    loras: tuple[tuple[Val, Val, str], ...] = ()  # (name, strength, node)
    shift: Val | None = None


@dataclass(frozen=True)
class Clip:
    file: Val
    type: Val


@dataclass(frozen=True)
class Vae:
    file: Val


@dataclass(frozen=True)
class Cond:
    text: Val
    clip: Clip


@dataclass(frozen=True)
class Image:
    file: Val


@dataclass(frozen=True)
class I2V:
    node: str
    positive: Any
    negative: Any
    vae: Any
    image: Any
    width: Val
    height: Val
    length: Val
    batch: Val


@dataclass(frozen=True)
class I2VOut:
    i2v: I2V
    slot: int  # 0 positive, 1 negative, 2 latent


@dataclass(frozen=True)
class Sampled:
    node: str
    type: str
    model: Any
    positive: Any
    negative: Any
    latent: Any
    vals: dict = field(hash=False)


@dataclass(frozen=True)
class Frames:
    samples: Any
    vae: Any
    interps: tuple[tuple[str, str, Val], ...] = ()  # (node, type, multiplier)


@dataclass(frozen=True)
class Video:
    frames: Any
    fps: Val


@dataclass(frozen=True)
class Output:
    node: str
    frames: Any
    fps: Val
    crf: Val | None = None
    format: Val | None = None


@dataclass(frozen=True)
class Absent:
    why: str
    fallback: bool = False  # an unconnected subgraph input: the inner widget's own value stands


class Evaluator:
    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.cache: dict[str, Any] = {}
        self.busy: set[str] = set()
        self.visited: set[str] = set()
        self.passed: set[str] = set()  # bypassed nodes whose inputs were passed through
        self.unchosen: dict[str, str] = {}  # first node of a switched-off branch -> the switch
        self.decisions: list[str] = []

    # --- following links -------------------------------------------------------------
    def resolve(self, link: Link | None, why: str = "not connected") -> tuple[Node, int] | Absent:
        for _ in range(10_000):
            if link is None:
                return Absent(why)
            node = self.g.nodes.get(link[0])
            if node is None:
                return Absent(f"linked to node #{link[0]}, which the file does not have")
            slot = link[1]
            if slot < 0:
                return Absent(f"linked to output {slot} of {node.label}, which has no such output")
            if node.role == "sg_in":
                names = list(node.in_types)
                name = names[slot] if slot < len(names) else None
                self.visited.add(node.id)
                if name is not None and node.links.get(name) is not None:
                    link = node.links[name]
                    continue
                if name is not None and name in node.widgets:
                    return node, slot
                return Absent(f"{node.type}: '{name}' is not connected", fallback=True)
            if node.mode == 2:
                return Absent(f"{node.label} is muted (mode never)")
            if node.mode == 4:
                self.passed.add(node.id)
                link = self._bypass(node, slot)
                if link is None:
                    return Absent(f"{node.label} is bypassed and has no input of its output's type to pass through")
                continue
            if node.type == "Reroute":
                self.visited.add(node.id)
                link = next((v for v in node.links.values() if v is not None), None)
                why = f"{node.label} is not connected"
                continue
            if node.role == "sg_out":
                self.visited.add(node.id)
                link = node.sg_outs[slot] if slot < len(node.sg_outs) else None
                why = f"{node.type}: output {slot} is not connected inside it"
                continue
            return node, slot
        raise WanrenderError("the workflow's links form a loop — check its reroutes and subgraphs")

    def _bypass(self, node: Node, slot: int) -> Link | None:
        out_type = node.out_types[slot] if slot < len(node.out_types) else "*"
        names = list(node.in_types)

        def fits(name: str) -> bool:
            t = node.in_types[name]
            return node.links.get(name) is not None and (t == out_type or "*" in (t, out_type))

        if slot < len(names) and fits(names[slot]):
            return node.links[names[slot]]
        return next((node.links[n] for n in names if fits(n)), None)

    def output_of(self, link: Link | None, why: str = "not connected") -> Any:
        found = self.resolve(link, why)
        if isinstance(found, Absent):
            return found
        node, slot = found
        if node.role == "sg_in":
            name = list(node.in_types)[slot]
            return Val(node.widgets[name], node.widget_src.get(name, f"{node.type} · {name}"))
        if node.id in self.busy:
            raise WanrenderError(f"the workflow has a cycle through {node.label} — remove the loop")
        if node.id not in self.cache:
            self.busy.add(node.id)
            self.visited.add(node.id)
            try:
                self.cache[node.id] = self.run(node)
            finally:
                self.busy.discard(node.id)
        result = self.cache[node.id]
        return result[slot] if isinstance(result, tuple) else result

    # --- a node's inputs ---------------------------------------------------------------
    def val(self, node: Node, name: str, default: Any = ..., kind: type | None = None) -> Val:
        link = node.links.get(name)
        got = self.output_of(link) if link is not None else None
        if isinstance(got, Val):
            v = replace(got, src=f"{got.src} → {node.label}.{name}")
        elif got is not None and not isinstance(got, Absent):
            raise WanrenderError(f"{node.label}: input '{name}' is connected to something that is not a value "
                                 "— connect a number or text")  # fmt: skip
        elif isinstance(got, Absent) and not got.fallback:
            raise WanrenderError(f"{node.label}: input '{name}' comes from nothing: {got.why} — connect it")
        elif name in node.widgets:
            control = node.widgets.get(CONTROL) if name in ("seed", "noise_seed", "value") else None
            v = Val(node.widgets[name], node.widget_src.get(name, f"{node.label}.{name}"), control)
        elif default is not ...:
            return Val(default, f"{node.label}.{name} (ComfyUI's default)")
        else:
            raise WanrenderError(f"{node.label}: no value for '{name}' — re-save the workflow in ComfyUI")
        return _typed(v, kind, node, name) if kind else v

    def obj(self, node: Node, name: str, required: bool = True) -> Any:
        got = self.output_of(node.links.get(name))
        if isinstance(got, Absent):
            if required:
                raise WanrenderError(f"{node.label}: its '{name}' input is missing: {got.why} — connect it")
            return None
        return got

    # --- the nodes ---------------------------------------------------------------------
    def run(self, node: Node) -> Any:
        t = node.type
        if t in ("PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean", "PrimitiveString", "PrimitiveStringMultiline",
                 "PrimitiveNode"):  # fmt: skip
            return self.val(node, "value")
        if t in ("MathExpression|pysssss", "SimpleMath+"):
            return self._math(node)
        if t in ("ComfySwitchNode", "Switch any [Crystools]"):
            return self._switch(node)
        if t == "UNETLoader":
            return Model(self.val(node, "unet_name", kind=str))
        if t == "LoraLoaderModelOnly":
            m = self.obj(node, "model")
            lora = (self.val(node, "lora_name", kind=str), self.val(node, "strength_model", kind=float), node.label)
            return replace(_want(m, Model, node, "model"), loras=m.loras + (lora,))
        if t == "ModelSamplingSD3":
            m = _want(self.obj(node, "model"), Model, node, "model")
            return replace(m, shift=self.val(node, "shift", kind=float))
        if t == "CLIPLoader":
            return Clip(self.val(node, "clip_name", kind=str), self.val(node, "type", "stable_diffusion", kind=str))
        if t == "VAELoader":
            return Vae(self.val(node, "vae_name", kind=str))
        if t == "CLIPTextEncode":
            return Cond(self.val(node, "text", kind=str), _want(self.obj(node, "clip"), Clip, node, "clip"))
        if t == "LoadImage":
            return Image(self.val(node, "image", kind=str)), None
        if t == "WanImageToVideo":
            return self._i2v(node)
        if t in ("KSamplerAdvanced", "KSampler"):
            return self._sampler(node)
        if t == "VAEDecode":
            return Frames(self.obj(node, "samples"), _want(self.obj(node, "vae"), Vae, node, "vae"))
        if t in ("RIFE VFI", "FILM VFI"):
            f = _want(self.obj(node, "frames"), Frames, node, "frames")
            return replace(f, interps=f.interps + ((node.label, t, self.val(node, "multiplier", 2, kind=int)),))
        if t == "CreateVideo":
            if node.links.get("audio") is not None and not isinstance(self.output_of(node.links["audio"]), Absent):
                raise WanrenderError(f"{node.label}: an audio track is connected — wanrender writes silent video; "
                                     "disconnect the audio")  # fmt: skip
            return Video(self.obj(node, "images"), self.val(node, "fps", kind=float))
        raise unsupported(node)

    def _math(self, node: Node) -> tuple[Val, Val]:
        text = self.val(node, "expression" if node.type.startswith("MathExpression") else "value", kind=str)
        variables: dict[str, Any] = {}
        used = []
        for name in ("a", "b", "c"):
            if node.links.get(name) is not None:
                v = self.val(node, name)
                if isinstance(v.value, bool) or not isinstance(v.value, (int, float)):
                    raise WanrenderError(f"{node.label}: input {name} is {shown(v.value)!r}, not a number — "
                                         "connect a number")  # fmt: skip
                variables[name] = v.value
                used.append(f"{name} = {v.value} from {v.src}")
        try:
            r = expr.evaluate(text.value, variables)
        except expr.ExprError as e:
            raise WanrenderError(f"{node.label}: {e}") from None
        src = f"{node.label} `{text.value}`" + (f" ({'; '.join(used)})" if used else "")
        as_int = int(r) if node.type.startswith("MathExpression") else round(r)  # pysssss truncates, essentials rounds
        return Val(as_int, src), Val(float(r), src)

    def _switch(self, node: Node) -> Any:
        flag = "switch" if node.type == "ComfySwitchNode" else "boolean"
        cond = self.val(node, flag)
        on = bool(cond.value) if not isinstance(cond.value, str) else cond.value.lower() in ("true", "1", "yes")
        chosen, other = ("on_true", "on_false") if on else ("on_false", "on_true")
        if node.links.get(other) is not None:
            self.unchosen[node.links[other][0]] = node.label
        self.decisions.append(f"{node.label}: {flag} is {on} ({cond.src}), so '{chosen}' is used")
        got = self.output_of(node.links.get(chosen), f"its '{chosen}' input is not connected")
        if isinstance(got, Absent):
            raise WanrenderError(f"{node.label} chooses '{chosen}', which comes from nothing: {got.why} — connect it "
                                 f"or flip {flag}")  # fmt: skip
        if isinstance(got, Val):
            return replace(got, src=f"{got.src} (via {node.label})")
        return got

    def _i2v(self, node: Node) -> tuple[I2VOut, I2VOut, I2VOut]:
        if node.links.get("clip_vision_output") is not None and not isinstance(
            self.output_of(node.links["clip_vision_output"]), Absent
        ):
            raise WanrenderError(f"{node.label}: a CLIP vision input is connected — that is the Wan 2.1 I2V workflow; "
                                 "Wan 2.2 14B uses none, disconnect it")  # fmt: skip
        image = self.obj(node, "start_image", required=False)
        if image is None:
            raise WanrenderError(f"{node.label} has no start image: that is text-to-video, and wanrender renders "
                                 "Wan 2.2 14B image-to-video — connect a LoadImage to start_image")  # fmt: skip
        i2v = I2V(node.label, self.obj(node, "positive"), self.obj(node, "negative"),
                  _want(self.obj(node, "vae"), Vae, node, "vae"), _want(image, Image, node, "start_image"),
                  self.val(node, "width", 832, kind=int), self.val(node, "height", 480, kind=int),
                  self.val(node, "length", 81, kind=int), self.val(node, "batch_size", 1, kind=int))  # fmt: skip
        return I2VOut(i2v, 0), I2VOut(i2v, 1), I2VOut(i2v, 2)

    def _sampler(self, node: Node) -> Sampled:
        names = [n for n in SPECS[node.type].widgets if n != CONTROL]
        kinds = {"steps": int, "start_at_step": int, "end_at_step": int, "cfg": float, "denoise": float,
                 "seed": int, "noise_seed": int}  # fmt: skip
        defaults = {"start_at_step": 0, "end_at_step": 10000, "denoise": 1.0}
        vals = {n: self.val(node, n, defaults.get(n, ...), kind=kinds.get(n)) for n in names}
        return Sampled(node.label, node.type, self.obj(node, "model"), self.obj(node, "positive"),
                       self.obj(node, "negative"), self.obj(node, "latent_image"), vals)  # fmt: skip

    def output(self, node: Node) -> Output:
        """What an output node writes: its frames, rate and (Video Helper Suite) crf."""
        self.visited.add(node.id)
        if node.type == "SaveVideo":
            video = _want(self.obj(node, "video"), Video, node, "video")
            return Output(node.label, video.frames, video.fps)
        if node.type == "SaveAnimatedWEBP":
            return Output(node.label, self.obj(node, "images"), self.val(node, "fps", 6.0, kind=float))
        crf = self.val(node, "crf", kind=int) if "crf" in node.widgets else None
        fmt = self.val(node, "format", "video/h264-mp4")
        return Output(node.label, self.obj(node, "images"), self.val(node, "frame_rate", 8, kind=float), crf, fmt)


def unsupported(node: Node) -> WanrenderError:
    if node.type in OTHER_FAMILY:
        return WanrenderError(
            f"this workflow renders {OTHER_FAMILY[node.type]} ({node.label}) — wanrender renders Wan 2.2 14B "
            "image-to-video; start from ComfyUI's Wan 2.2 14B i2v template"
        )
    where = f" in {node.where}" if node.where else ""
    return WanrenderError(
        f"{node.label}{where} is on the active path and wanrender has no equivalent for it — bypass (Ctrl+B) or "
        "remove it, or render this workflow in ComfyUI ('wanrender workflow show --help' lists the supported nodes)"
    )


def output_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes.values() if n.type in OUTPUTS and n.mode == 0 and not n.role]


def _want(got: Any, cls: type, node: Node, name: str) -> Any:
    if not isinstance(got, cls):
        what = type(got).__name__ if not isinstance(got, Val) else f"the value {shown(got.value)!r}"
        raise WanrenderError(f"{node.label}: its '{name}' input gets {what}, not a {cls.__name__} — "
                             "connect it as in ComfyUI's Wan 2.2 14B i2v template")  # fmt: skip
    return got


def _typed(v: Val, kind: type, node: Node, name: str) -> Val:
    value = v.value
    try:
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return v
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError
        if kind is int:
            if float(value) != int(value):
                raise TypeError
            return replace(v, value=int(value))
        return replace(v, value=float(value))
    except (TypeError, ValueError, OverflowError):
        raise WanrenderError(f"{v.src}: {shown(value)!r} is not {'text' if kind is str else 'a number'} as "
                             f"{node.label}.{name} needs — fix the value in the workflow") from None  # fmt: skip
