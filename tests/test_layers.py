"""The import contracts of docs/architecture.md, read from the source (every import,
also the lazy ones inside functions, counts as an edge).

- nothing below the command line imports ``cli`` or ``bench``;
- prediction code (the planner and its models of memory, time and GPUs) imports no
  request, generation or execution code;
- ``models/`` imports nothing above it;
- ``spec`` and ``errors``, the lowest layer, import nothing of wanrender but each other;
- the service (``service/``) sits above the runner and below the command line: only
  the CLI imports it, and it imports no ``bench`` code;
- the workflow reader (``workflow/``) imports only the request model, the model
  inventory and the errors (and itself); only the CLI and the bench lab (its ComfyUI
  engine exports workflows) import it;
- there are no import cycles between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "wanrender"
CLI = ("wanrender.cli",)  # cli.py and the cli_* modules
BENCH = ("wanrender.bench",)
PREDICTION = (
    "wanrender.runtime.planner",
    "wanrender.runtime.memory",
    "wanrender.runtime.timing",
    "wanrender.runtime.gpus",
    "wanrender.runtime.multigpu",
)
NOT_FOR_PREDICTION = ("wanrender.request", "wanrender.runner", "wanrender.engine", "wanrender.outputs",
                      "wanrender.pipeline", "wanrender.runtime.offload", "wanrender.runtime.streaming",
                      "wanrender.runtime.plan", "wanrender.media", "wanrender.demo", "wanrender.interp",
                      "wanrender.parallel")  # fmt: skip
MODELS_MAY_IMPORT = ("wanrender.models", "wanrender.errors", "wanrender.spec", "wanrender.paths")
LOWEST = ("wanrender.spec", "wanrender.errors")
SERVICE = ("wanrender.service",)
WORKFLOW = ("wanrender.workflow",)
WORKFLOW_MAY_IMPORT = WORKFLOW + ("wanrender.spec", "wanrender.request", "wanrender.models.inventory",
                                  "wanrender.errors")  # fmt: skip


def _name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the longest known module the name refers to (``from a import b``: a.b if it is a module, else a)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("wanrender"):
                    edges.add(t)
        graph[mod] = edges
    return graph


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") or mod.startswith(p + "_") for p in prefixes)


def test_nothing_below_the_cli_imports_cli_or_bench() -> None:
    bad = [(m, t) for m, ts in _graph().items() if not _under(m, CLI + BENCH) for t in ts if _under(t, CLI + BENCH)]
    assert not bad, bad


def test_prediction_imports_no_request_generation_or_execution_code() -> None:
    g = _graph()
    bad = [(m, t) for m in PREDICTION for t in g[m] if _under(t, NOT_FOR_PREDICTION)]
    assert not bad, bad


def test_models_import_nothing_above_them() -> None:
    bad = [(m, t) for m, ts in _graph().items() if _under(m, ("wanrender.models",)) for t in ts
           if not _under(t, MODELS_MAY_IMPORT)]  # fmt: skip
    assert not bad, bad


def test_the_lowest_layer_imports_only_itself() -> None:
    g = _graph()
    bad = [(m, t) for m in LOWEST for t in g[m] if not _under(t, LOWEST)]
    assert not bad, bad


def test_only_the_cli_imports_the_service() -> None:
    g = _graph()
    bad = [(m, t) for m, ts in g.items() if not _under(m, CLI + SERVICE) for t in ts if _under(t, SERVICE)]
    assert not bad, bad
    bad = [(m, t) for m, ts in g.items() if _under(m, SERVICE) for t in ts if _under(t, BENCH)]
    assert not bad, bad
    assert (
        "wanrender.service.worker" in g["wanrender.cli_serve"] and "wanrender.runner" in g["wanrender.service.worker"]
    )


def test_the_workflow_reader_sits_between_the_request_and_the_cli() -> None:
    g = _graph()
    bad = [(m, t) for m, ts in g.items() if _under(m, WORKFLOW) for t in ts if not _under(t, WORKFLOW_MAY_IMPORT)]
    assert not bad, bad
    bad = [(m, t) for m, ts in g.items() if not _under(m, CLI + BENCH + WORKFLOW) for t in ts if _under(t, WORKFLOW)]
    assert not bad, bad
    assert "wanrender.workflow.reader" in g["wanrender.cli_workflow"]


def test_no_import_cycles() -> None:
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_contracts_see_real_edges() -> None:
    """The checks above would pass on an empty graph: make sure they read imports."""
    g = _graph()
    assert "wanrender.runner" in g["wanrender.cli_render"]
    assert "wanrender.engine" in g["wanrender.runner"]
    assert "wanrender.spec" in g["wanrender.request"]
