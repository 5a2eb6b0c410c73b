"""Read a workflow file into a ``Reading``: choose its output, evaluate backwards, map
to request fields, and list every node that did not count, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wanrender.errors import WanrenderError
from wanrender.workflow.evaluate import Evaluator, output_nodes, unsupported
from wanrender.workflow.graph import Graph, load, parse
from wanrender.workflow.mapping import Reading, read_output
from wanrender.workflow.nodes import OTHER_FAMILY, PASSIVE


def read(path: Path) -> Reading:
    return read_graph(load(path))


def read_data(data: Any) -> Reading:
    return read_graph(parse(data))


def read_graph(graph: Graph) -> Reading:
    outs = output_nodes(graph)
    if not outs:
        family = next((n for n in graph.nodes.values() if n.type in OTHER_FAMILY and n.mode == 0), None)
        if family is not None:
            raise unsupported(family)
        images = [n for n in graph.nodes.values() if n.type in ("SaveImage", "PreviewImage") and n.mode == 0]
        why = "it saves images, not a video: " if images else ""
        raise WanrenderError(f"no active video output in the workflow ({why}SaveVideo, SaveAnimatedWEBP or "
                             "VHS_VideoCombine) — add one, or unmute it")  # fmt: skip
    readings: list[tuple[Reading, Evaluator]] = []
    for node in outs:
        ev = Evaluator(graph)
        try:
            readings.append((read_output(ev.output(node)), ev))
        except RecursionError:
            raise WanrenderError(f"the path to {node.label} is too long to follow (thousands of nodes in a row) "
                                 "— simplify the workflow") from None  # fmt: skip
    reading, ev = _choose(readings)
    reading.format = graph.format
    reading.notes = graph.notes + ev.decisions + reading.notes
    others = set().union(*(e.visited for _, e in readings)) - ev.visited
    reading.ignored = _ignored(graph, ev.visited, ev.passed - ev.visited, ev.unchosen, reading, others)
    return reading


def _choose(readings: list[tuple[Reading, Evaluator]]) -> tuple[Reading, Evaluator]:
    """Several video outputs of one render (say, before and after interpolation): the
    interpolated one is the product. Outputs of different renders are refused."""
    if len(readings) == 1:
        return readings[0]
    core = [{k: v for k, v in r.fields.items() if k not in ("fps", "interpolate", "crf")} for r, _ in readings]
    if any(c != core[0] for c in core[1:]):
        names = ", ".join(r.output for r, _ in readings)
        raise WanrenderError(f"the workflow has {len(readings)} video outputs of different renders ({names}) — "
                             "mute (Ctrl+M) all but the one to render")  # fmt: skip
    best = sorted(readings, key=lambda re: (re[0].fields.get("interpolate", "off") != "off", re[0].fields["fps"]))
    return best[-1]


def _ignored(graph: Graph, used: set[str], passed: set[str], unchosen: dict[str, str], reading: Reading,
             others: set[str]) -> list[tuple[str, str, str]]:  # fmt: skip
    off: dict[str, str] = {}
    for start, switch in unchosen.items():  # the switched-off branch: everything upstream of it not used
        stack = [start]
        while stack:
            nid = stack.pop()
            if nid in used or nid in off or nid not in graph.nodes:
                continue
            off[nid] = f"switched off by {switch}"
            stack.extend(link[0] for link in graph.nodes[nid].links.values() if link is not None)
    out = []
    for node in graph.nodes.values():
        if node.id in used or node.role == "sg_in":
            continue
        if node.id in others:
            why = f"another output of the same render, or on its way (the request follows {reading.output})"
        elif node.id in passed:
            why = "bypassed: its inputs pass through"
        elif node.mode == 2:
            why = "muted (mode never)"
        elif node.mode == 4:
            why = "bypassed"
        elif node.id in off:
            why = off[node.id]
        elif node.type in PASSIVE:
            why = PASSIVE[node.type]
        else:
            why = "not on the path to the output"
        where = ", ".join(x for x in (f"group '{node.group}'" if node.group else "", node.where) if x)
        out.append((node.id, node.type, why + (f" ({where})" if where else "")))
    return out
