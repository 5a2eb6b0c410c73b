"""Both ComfyUI JSON formats read into one flat graph.

The editor (UI) format: ``nodes`` with positional ``widgets_values``, ``links`` as
[id, from, from_slot, to, to_slot, type] (or objects in newer files), ``groups``, node
``mode`` (0 active, 2 muted, 4 bypassed), and ``definitions.subgraphs``: each subgraph
is inlined under the id of the node that uses it ("12:5" is node 5 inside node 12),
with one pseudo node for its inputs (``sg_in``, reached by inner links from -10) and
the using node itself for its outputs (``sg_out``, fed by inner links to -20).
The API (prompt) format: {id: {class_type, inputs}}; an input that is [id, slot] is a
link, anything else a widget value. It has no modes: the editor leaves muted and
bypassed nodes out of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanrender.errors import WanrenderError, shown
from wanrender.workflow.nodes import CONTROL, SPECS

Link = tuple[str, int]
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
_MAX_DEPTH = 16


@dataclass
class Node:
    id: str
    type: str
    mode: int = 0
    title: str = ""
    widgets: dict[str, Any] = field(default_factory=dict)
    widget_src: dict[str, str] = field(default_factory=dict)  # where a promoted value was set
    links: dict[str, Link | None] = field(default_factory=dict)  # input name -> source
    in_types: dict[str, str] = field(default_factory=dict)
    out_types: list[str] = field(default_factory=list)
    group: str = ""
    where: str = ""  # the subgraph it sits in
    role: str = ""  # "", "sg_in" (a subgraph's inputs) or "sg_out" (a subgraph node, by its outputs)
    sg_outs: list[Link | None] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"#{self.id} {self.type}"


@dataclass
class Graph:
    nodes: dict[str, Node]
    format: str  # "ui" or "api"
    notes: list[str] = field(default_factory=list)


def load(path: Path) -> Graph:
    """Read a workflow file; one-line errors for files that are not ComfyUI workflows."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WanrenderError(f"{shown(path)}: no such workflow file — check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WanrenderError(f"{shown(path)}: cannot read it ({e}) — pass a ComfyUI workflow .json") from None
    except ValueError as e:
        raise WanrenderError(f"{shown(path)}: not JSON ({e}) — pass a ComfyUI workflow .json") from None
    return parse(data, str(path))


def parse(data: Any, name: str = "workflow") -> Graph:
    try:
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):
            return _from_ui(data)
        if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
            data = data["prompt"]  # a /prompt request body
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
            return _from_api(data)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
        # A file edited by hand or by a tool: a field of the wrong shape somewhere.
        raise WanrenderError(f"{shown(name)}: a malformed ComfyUI workflow ({type(e).__name__}: {e}) — "
                             "open it in ComfyUI and save it again") from None  # fmt: skip
    raise WanrenderError(
        f"{shown(name)}: not a ComfyUI workflow (neither the editor format with 'nodes' nor the API format "
        "with 'class_type') — save it from ComfyUI with Workflow > Save or Export (API)"
    )


# --- API format ------------------------------------------------------------------------


def _from_api(data: dict) -> Graph:
    nodes: dict[str, Node] = {}
    for nid, raw in data.items():
        node = Node(str(nid), str(raw["class_type"]), title=str((raw.get("_meta") or {}).get("title") or ""))
        for name, value in (raw.get("inputs") or {}).items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                node.links[name] = (str(value[0]), value[1])
            else:
                node.widgets[name] = value
        nodes[node.id] = node
    return Graph(nodes, "api")


# --- editor (UI) format ------------------------------------------------------------------


def _link_table(links: list) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (origin node, origin slot, target node, target slot), from arrays or objects."""
    table: dict[int, tuple[int, int, int, int]] = {}
    for link in links or []:
        if isinstance(link, list) and len(link) >= 5 and isinstance(link[0], int):
            table[link[0]] = (link[1], link[2], link[3], link[4])
        elif isinstance(link, dict) and isinstance(link.get("id"), int):
            table[link["id"]] = (link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                                 link.get("target_slot"))  # fmt: skip
    return table


def _groups(graph: dict) -> list[tuple[str, list[float]]]:
    out = []
    for g in graph.get("groups") or []:
        box = g.get("bounding") or g.get("bound")
        if isinstance(box, list) and len(box) == 4:
            out.append((str(g.get("title") or "group"), box))
    return out


def _group_of(node: dict, groups: list[tuple[str, list[float]]]) -> str:
    pos = node.get("pos")
    if isinstance(pos, dict):
        pos = [pos.get("0"), pos.get("1")]
    if not isinstance(pos, list) or len(pos) < 2 or not all(isinstance(v, (int, float)) for v in pos[:2]):
        return ""
    for title, (x, y, w, h) in groups:
        if x <= pos[0] <= x + w and y <= pos[1] <= y + h:
            return title
    return ""


def _positional(names: tuple[str, ...] | list[str], values: list) -> dict[str, Any]:
    """Positional widget values by name; a seed's hidden control value is stored after it
    even where the table does not list it (promoted widgets), so a stray one is skipped."""
    out: dict[str, Any] = {}
    vi = 0
    for name in names:
        if vi >= len(values):
            break
        out[name] = values[vi]
        vi += 1
        if (name != CONTROL and vi < len(values) and values[vi] in CONTROL_VALUES
                and len(values) - vi > len(names) - len(out)):  # fmt: skip
            out.setdefault(CONTROL, values[vi])
            vi += 1
    return out


def _widgets(node: dict) -> dict[str, Any]:
    values = node.get("widgets_values")
    if isinstance(values, dict):  # Video Helper Suite keeps names
        return dict(values)
    if not isinstance(values, list):
        return {}
    spec = SPECS.get(str(node.get("type")))
    if spec is not None:
        return dict(zip(spec.widgets, values))
    names = [i["name"] for i in node.get("inputs") or [] if isinstance(i, dict) and i.get("widget")]
    return _positional(names, values)


def _from_ui(data: dict) -> Graph:
    defs = {}
    for sg in (data.get("definitions") or {}).get("subgraphs") or []:
        if isinstance(sg, dict) and "id" in sg:
            defs[str(sg["id"])] = sg
    graph = Graph({}, "ui")
    _flatten(data, "", defs, graph, sg_in=None, where="", depth=0, sg_outs=None)
    return graph


def _flatten(g: dict, prefix: str, defs: dict, graph: Graph, sg_in: str | None, where: str, depth: int,
             sg_outs: list | None) -> None:  # fmt: skip
    if depth > _MAX_DEPTH:
        raise WanrenderError("subgraphs are nested too deep (or one contains itself) — check the workflow's subgraphs")
    table = _link_table(g.get("links"))
    groups = _groups(g)

    def source(link_id) -> Link | None:
        if not isinstance(link_id, int) or link_id not in table:
            return None
        origin, slot = table[link_id][0], table[link_id][1]
        if origin == -10:
            return (sg_in, int(slot)) if sg_in else None
        return (f"{prefix}{origin}", int(slot or 0))

    if sg_outs is not None:
        for origin, oslot, target, tslot in table.values():
            if target == -20 and isinstance(tslot, int) and 0 <= tslot < len(sg_outs):
                sg_outs[tslot] = (sg_in, int(oslot)) if origin == -10 else (f"{prefix}{origin}", int(oslot or 0))
    for raw in g.get("nodes") or []:
        if not isinstance(raw, dict) or "id" not in raw:
            continue
        ntype = str(raw.get("type") or "")
        node = Node(f"{prefix}{raw['id']}", ntype, int(raw.get("mode") or 0), str(raw.get("title") or ""),
                    group=_group_of(raw, groups), where=where)  # fmt: skip
        for inp in raw.get("inputs") or []:
            if isinstance(inp, dict) and "name" in inp:
                node.links[inp["name"]] = source(inp.get("link"))
                node.in_types[inp["name"]] = str(inp.get("type") or "*")
        node.out_types = [str(o.get("type") or "*") for o in raw.get("outputs") or [] if isinstance(o, dict)]
        if ntype in defs:
            _expand(raw, node, defs, graph, depth)
        else:
            node.widgets = _widgets(raw)
        graph.nodes[node.id] = node


def _expand(raw: dict, node: Node, defs: dict, graph: Graph, depth: int) -> None:
    """Inline one use of a subgraph: its inner nodes, its input pseudo node, its promoted widgets."""
    sg = defs[node.type]
    name = str(sg.get("name") or node.type)
    node.role, node.type = "sg_out", f"subgraph '{name}'"
    inner = f"{node.id}:"
    pins_in = [p for p in sg.get("inputs") or [] if isinstance(p, dict)]
    pins_out = [p for p in sg.get("outputs") or [] if isinstance(p, dict)]
    outer_inputs = [i for i in raw.get("inputs") or [] if isinstance(i, dict)]
    by_name = {i.get("name"): i for i in outer_inputs}
    ins = Node(f"{inner}in", f"subgraph '{name}' inputs", node.mode, where=f"subgraph '{name}'", role="sg_in")
    for k, pin in enumerate(pins_in):
        pname = str(pin.get("name") or k)
        outer = by_name.get(pname) or (outer_inputs[k] if k < len(outer_inputs) else {})
        ins.links[pname] = node.links.get(outer.get("name")) if outer else None
        ins.in_types[pname] = str(pin.get("type") or "*")
    values = raw.get("widgets_values")
    proxies = (raw.get("properties") or {}).get("proxyWidgets")
    overrides: dict[str, dict[str, Any]] = {}
    if isinstance(values, list) and values:
        if isinstance(proxies, list) and proxies:
            if len(proxies) == len(values):
                for entry, value in zip(proxies, values):
                    if isinstance(entry, list) and len(entry) >= 2:
                        overrides.setdefault(str(entry[0]), {})[str(entry[1])] = value
            else:
                graph.notes.append(f"{node.label}: its promoted widgets ({len(proxies)}) and values ({len(values)}) "
                                   "disagree; the subgraph's own values are used")  # fmt: skip
        else:
            names = [str(i["name"]) for i in outer_inputs if i.get("widget")]
            ins.widgets.update(_positional(names, values))
    ins.widgets.update(overrides.pop("-1", {}))
    ins.widget_src = {k: f"{node.label} · {k} (promoted widget)" for k in ins.widgets}
    graph.nodes[ins.id] = ins
    node.sg_outs = [None] * len(pins_out)
    _flatten(sg, inner, defs, graph, ins.id, f"subgraph '{name}'", depth + 1, node.sg_outs)
    for inner_id, kv in overrides.items():
        target = graph.nodes.get(f"{inner}{inner_id}")
        if target is not None:
            target.widgets.update(kv)
            target.widget_src.update({k: f"{node.label} · {k} (promoted widget)" for k in kv})
    if node.mode in (2, 4):  # a muted or bypassed subgraph silences what is inside (its outputs too)
        for nid, n in graph.nodes.items():
            if nid.startswith(inner) and n.mode == 0:
                n.mode = node.mode
