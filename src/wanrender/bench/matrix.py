"""Benchmark matrices: a YAML file of axes expanded into cases.

```yaml
name: cpu-demo
defaults:            # every case starts from these
  preset: demo
  frames: 5
axes:                # the cross product, in this order
  frames: [5, 9]
  attention: [sdpa, reference]
exclude:             # drop product cases matching all fields of an entry
  - {frames: 9, attention: reference}
cases:               # extra cases after the product: defaults + these fields
  - {name: oom, inject: oom}
  - {name: comfy, engine: comfyui, server: "http://127.0.0.1:8188", workflow: wan22_i2v_api.json}
```

Without ``axes`` a matrix is its ``cases`` alone (or, with neither, the defaults).

Relative paths (``image``, ``models``) are relative to the matrix file, so a
matrix travels with its images. Each case has an identity hash over everything
that defines the render (not the name, repeats or timeout): it keys results,
``--resume`` and ``bench compare``.

A case with ``engine: comfyui`` is rendered by a ComfyUI server the user runs
(bench/comfyui.py): its ``workflow`` (API format) is what is rendered, and the
fields frames, resolution, steps, switch and seed that the matrix does not set
are read from it. Its identity is the workflow's content, the image and those
fields (the server is where it runs, like the machine, not what it renders).
A wanrender case ignores ``server`` and ``workflow``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from wanrender.errors import WanrenderError
from wanrender.runtime.profiles import read_yaml
from wanrender.spec import parse_bytes
from wanrender.spec import tokens as dit_tokens

PASS_ORDERS = ("high-low", "low-high")
INJECT = ("none", "oom", "hang", "crash")
INTERPOLATE = ("off", "rife", "dis")
ENGINES = ("wanrender", "comfyui")
# Fields that do not change what is rendered: excluded from the identity hash.
NOT_IDENTITY = ("name", "repeats", "timeout_s")
RESOLVED = ("image_path", "image_sha256", "models_path", "workflow_path", "workflow_sha256")
# Added with the comfyui engine: left out of a wanrender case's identity, which keeps the hashes of older results.
ENGINE_FIELDS = ("engine", "server", "workflow")
# What defines a comfyui case's render; the other fields are wanrender's and do not apply to it.
COMFY_IDENTITY = ("engine", "image", "workflow", "frames", "width", "height", "steps", "switch", "seed", "warmup")


@dataclass(frozen=True)
class Case:
    name: str = ""
    image: str = "demo"  # "demo" (the demo photo) or a path
    prompt: str = "slow dolly-in, gentle camera motion, soft light"
    models: str = "demo"  # "demo" (tiny random-weight models), "random" (full-size, GPU) or a model folder
    preset: str = "demo"
    frames: int = 5
    width: int = 80
    height: int = 64
    steps: int | None = None
    switch: int | None = None
    seed: int = 0
    pass_order: str = "high-low"
    attention: str = "auto"
    precision: str = "auto"
    compile: str = "off"
    memory_plan: str = "auto"
    vram_cap_bytes: int | None = None
    interpolate: str = "off"
    device: str = "auto"
    gpus: int = 1  # GPUs sharing each render (generate --gpus: sequence parallel); cpu: gloo processes
    repeats: int = 3
    warmup: bool = True
    timeout_s: float = 1800.0
    inject: str = "none"  # test hook: make the child run out of memory, hang or crash
    engine: str = "wanrender"  # or "comfyui": a ComfyUI server renders the workflow
    server: str = "http://127.0.0.1:8188"  # the comfyui engine's ComfyUI
    workflow: str = ""  # the comfyui engine's workflow file (API format)
    # Filled by expansion. The identity uses the image's content and the models folder
    # as written, so the same matrix on another machine keys the same cases.
    image_path: str | None = None
    image_sha256: str | None = None
    models_path: str | None = None
    workflow_path: str | None = None
    workflow_sha256: str | None = None

    def identity(self) -> dict:
        if self.engine == "comfyui":
            d = {k: getattr(self, k) for k in COMFY_IDENTITY}
            d["workflow"] = self.workflow_sha256 or self.workflow
        else:
            d = {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY + RESOLVED + ENGINE_FIELDS}
            if self.gpus == 1:  # keys cases of one GPU as before the field existed
                del d["gpus"]
        if self.image != "demo":
            d["image"] = self.image_sha256 or self.image
        return d

    @property
    def case_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def tokens(self) -> int:
        """Latent tokens of one DiT forward: what time and memory scale with."""
        return dit_tokens(self.frames, self.width, self.height)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Case:
        known = {f.name for f in fields(Case)}
        return Case(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Matrix:
    name: str
    path: Path | None
    cases: tuple[Case, ...]
    labels: tuple[str, ...]

    def only(self, patterns: str | None) -> Matrix:
        """The cases whose label matches one of the comma-separated shell patterns."""
        if not patterns:
            return self
        import fnmatch

        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        keep = [i for i, lab in enumerate(self.labels) if any(fnmatch.fnmatchcase(lab, p) for p in pats)]
        if not keep:
            raise WanrenderError(f"--only {patterns!r} matches no case — labels are: {', '.join(self.labels)}")
        return replace(self, cases=tuple(self.cases[i] for i in keep), labels=tuple(self.labels[i] for i in keep))


# Keys a matrix may use -> Case fields they set (resolution sets two).
KEYS = ("name", "image", "prompt", "models", "preset", "frames", "resolution", "steps", "switch", "seed",
        "pass_order", "attention", "precision", "compile", "memory_plan", "vram_cap", "interpolate", "device",
        "gpus", "repeats", "warmup", "timeout_s", "inject", "engine", "server", "workflow")  # fmt: skip


def parse_seconds(text: str | int | float, what: str = "duration") -> float:
    """'20m', '90s', '1h30m', '250ms', or a plain number of seconds."""
    bad = WanrenderError(f"{what} {text!r} is invalid — use a positive duration, e.g. 90s, 20m or 1h30m")
    if isinstance(text, bool):
        raise bad
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        parts = re.findall(r"([0-9]*\.?[0-9]+)\s*(ms|h|m|s)", str(text).lower())
        rebuilt = "".join(n + u for n, u in parts)
        if parts and rebuilt == re.sub(r"\s+", "", str(text).lower()):
            scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
            value = sum(float(n) * scale[u] for n, u in parts)
        else:
            try:
                value = float(text)
            except ValueError:
                raise bad from None
    # nan compares false with everything: a nan limit or timeout would never fire.
    if not math.isfinite(value) or value <= 0:
        raise bad
    return value


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise WanrenderError(f"resolution {text!r} is invalid — use WIDTHxHEIGHT, e.g. 832x1216") from None
    return w, h


def _pass_order(v: str) -> str:
    norm = str(v).lower().replace("->", "-").replace(">", "-").replace("_", "-").replace(" ", "")
    if norm not in PASS_ORDERS:
        raise WanrenderError(f"pass_order {v!r} is invalid — use high->low or low->high")
    return norm


def _interpolate(v: object) -> str:
    if v is True:
        return "rife"
    if v is False or v is None:
        return "off"
    if v not in INTERPOLATE:
        raise WanrenderError(f"interpolate {v!r} is invalid — use off, rife or dis (true means rife)")
    return str(v)


def _apply(case: Case, values: dict, where: str) -> Case:
    """Case + matrix keys, converted and checked one by one (the error names the key)."""
    out: dict = {}
    for key, v in values.items():
        if key not in KEYS:
            raise WanrenderError(f"{where}: unknown key {key!r} — use one of {', '.join(KEYS)}")
        try:
            if key == "resolution":
                out["width"], out["height"] = parse_resolution(v)
            elif key == "vram_cap":
                out["vram_cap_bytes"] = None if v in (None, False, "none", "off") else parse_bytes(v, "vram_cap")
            elif key == "pass_order":
                out[key] = _pass_order(v)
            elif key == "interpolate":
                out[key] = _interpolate(v)
            elif key == "compile" and isinstance(v, bool):  # YAML 1.1 reads a bare off/on as a boolean
                out[key] = "default" if v else "off"
            elif key == "inject":
                if (v or "none") not in INJECT:
                    raise WanrenderError(f"inject {v!r} is invalid — use one of {', '.join(INJECT)}")
                out[key] = v or "none"
            elif key == "timeout_s":
                out[key] = parse_seconds(v, "timeout_s")
            elif key == "engine":
                if v not in ENGINES:
                    raise WanrenderError(f"engine {v!r} is unknown — use one of {', '.join(ENGINES)}")
                out[key] = v
            elif key == "server":
                u = urlsplit(str(v))
                if u.scheme not in ("http", "https") or not u.hostname:
                    raise WanrenderError(f"server {v!r} is not an http(s) URL — use e.g. http://127.0.0.1:8188")
                out[key] = str(v).rstrip("/")
            elif key in ("frames", "repeats", "seed", "gpus") or (key in ("steps", "switch") and v is not None):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise WanrenderError(f"{key} {v!r} is invalid — use a whole number")
                out[key] = v
            elif key == "warmup":
                out[key] = bool(v)
            elif key in ("steps", "switch"):
                out[key] = None
            else:
                out[key] = str(v)
        except WanrenderError as e:
            raise WanrenderError(f"{where}: {e}") from None
    if out.get("repeats", case.repeats) < 1:
        raise WanrenderError(f"{where}: repeats must be at least 1 — use 1 or more")
    if out.get("gpus", case.gpus) < 1:
        raise WanrenderError(f"{where}: gpus must be at least 1 — use 1 or more")
    return replace(case, **out)


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    return (base / p).resolve() if not p.is_absolute() and base is not None else p


def _resolve_paths(case: Case, base: Path | None) -> Case:
    image_path = sha = models_path = None
    if case.engine == "comfyui":
        case = _resolve_workflow(case, base)
    if case.image != "demo":
        p = _resolve(case.image, base)
        if not p.is_file():
            raise WanrenderError(f"matrix image {case.image!r} not found (looked at {p}) — fix the path or use 'demo'")
        image_path, sha = str(p), hashlib.sha256(p.read_bytes()).hexdigest()
    if case.models not in ("demo", "random"):
        models_path = str(_resolve(case.models, base))
    return replace(case, image_path=image_path, image_sha256=sha, models_path=models_path)


def _resolve_workflow(case: Case, base: Path | None) -> Case:
    from wanrender.bench import comfy_workflow as cw

    if not case.workflow:  # exported from the case's own request: its hash keys the case
        text = json.dumps(cw.exported_workflow(case), sort_keys=True).encode()
        return replace(case, workflow_sha256=hashlib.sha256(text).hexdigest())
    p = _resolve(case.workflow, base)
    if not p.is_file():
        raise WanrenderError(f"workflow {case.workflow!r} not found (looked at {p}) — fix the path in the matrix")
    cw.read_workflow(p)
    return replace(case, workflow_path=str(p), workflow_sha256=hashlib.sha256(p.read_bytes()).hexdigest())


def _from_workflow(case: Case, given: set[str]) -> Case:
    """A comfyui case's frames, size, steps, switch and seed: the matrix's where it sets them, else the workflow's."""
    from wanrender.bench import comfy_workflow as cw

    if not case.workflow:  # exported from the case itself: nothing to read back
        return case
    found = cw.settings(cw.read_workflow(Path(case.workflow_path or case.workflow)))
    return replace(case, **{k: v for k, v in found.items() if k not in given})


def _check_comfy(case: Case) -> None:
    if case.inject != "none":
        raise WanrenderError("inject is a test hook of the wanrender engine — a comfyui case cannot use it")
    if case.frames < 1 or case.width < 1 or case.height < 1 or (case.steps is not None and case.steps < 1):
        raise WanrenderError("frames, resolution and steps must be positive — fix the case or its workflow")


def _check_request(case: Case) -> None:
    """Refuse a case the render would refuse (bad frames, size, steps) before a sweep starts."""
    from wanrender.request import from_preset

    from_preset(case.preset, Path(case.image if case.image != "demo" else "demo.png"), case.prompt,
                frames=case.frames, width=case.width, height=case.height, steps=case.steps, switch=case.switch,
                seed=case.seed, interpolate=case.interpolate)  # fmt: skip
    from wanrender.kernels.attention import REGISTRY

    if case.attention != "auto" and case.attention not in REGISTRY:  # a typo, not a case that cannot run here
        raise WanrenderError(f"attention {case.attention!r} is unknown — use auto or one of {', '.join(REGISTRY)}")
    for knob, allowed in (("precision", ("auto", "fp8", "bf16")), ("compile", ("off", "default", "max-autotune"))):
        if getattr(case, knob) not in allowed:
            raise WanrenderError(f"{knob} {getattr(case, knob)!r} is invalid — use one of {', '.join(allowed)}")
    if case.gpus > 1:
        from wanrender.runtime.multigpu import WAN_HEADS, check_heads
        from wanrender.runtime.planner import check_parallel_memory

        if case.models == "demo":
            from wanrender.models.dit import DiTConfig

            check_heads(case.gpus, DiTConfig.preset("demo").num_heads)
        elif case.models == "random":
            check_heads(case.gpus, WAN_HEADS)
        try:
            check_parallel_memory(case.memory_plan, case.gpus)
        except WanrenderError as e:
            raise WanrenderError(str(e).replace("memory ", "memory_plan ")) from None


def _matches(case: Case, pattern: dict, where: str) -> bool:
    probe = _apply(Case(), pattern, where)
    return all(getattr(case, f.name) == getattr(probe, f.name)
               for f in fields(Case) if f.name in _keys_to_fields(pattern))  # fmt: skip


def _keys_to_fields(d: dict) -> set[str]:
    out = set()
    for k in d:
        out |= {"width", "height"} if k == "resolution" else {"vram_cap_bytes"} if k == "vram_cap" else {k}
    return out


def _labels(cases: list[Case]) -> list[str]:
    """Short names: the case's own name, else the fields that vary across the matrix."""
    varying = [f.name for f in fields(Case) if f.name not in NOT_IDENTITY + RESOLVED + ("server",)
               and len({getattr(c, f.name) for c in cases}) > 1]  # fmt: skip
    out = []
    for c in cases:
        parts = []
        for k in varying:
            v = getattr(c, k)
            if c.engine == "comfyui" and k not in COMFY_IDENTITY:
                continue  # wanrender's knobs do not apply to it
            if k == "engine":
                parts.append(v)
                continue
            if k == "workflow":
                if v:
                    parts.append(Path(v).name)
                continue
            if k in ("width", "height"):
                if k == "width" or "width" not in varying:
                    parts.append(f"{c.width}x{c.height}")
                continue
            if k == "vram_cap_bytes":
                parts.append(f"cap={v / 2**30:.1f}GiB" if v else "cap=none")
            elif k == "image":
                parts.append(Path(v).name if v != "demo" else "demo")
            elif k == "frames":
                parts.append(f"{v}f")
            elif k != "inject" or v != "none":
                parts.append(f"{k}={v}")
        out.append(c.name or " ".join(parts) or "case")
    return out


def expand(doc: dict, path: Path | None = None) -> Matrix:
    """Cases from a parsed matrix document (product of axes, minus excludes, plus cases)."""
    where = str(path) if path else "matrix"
    if not isinstance(doc, dict):
        raise WanrenderError(f"{where}: a matrix is a mapping with defaults/axes/cases — see benchmarks/matrices/")
    unknown = set(doc) - {"name", "defaults", "axes", "cases", "exclude", "description"}
    if unknown:
        raise WanrenderError(
            f"{where}: unknown section {sorted(unknown)[0]!r} — use name, defaults, axes, exclude, cases"
        )
    base_dir = path.parent if path else None
    base = _apply(Case(), doc.get("defaults") or {}, f"{where} defaults")
    axes = doc.get("axes") or {}
    for k, v in axes.items():
        if not isinstance(v, list) or not v:
            raise WanrenderError(f"{where}: axis {k!r} must be a non-empty list — e.g. {k}: [a, b]")
    cases: list[Case] = []
    given: list[set[str]] = []  # the fields each case sets (a comfyui case takes the others from its workflow)
    names = list(axes)
    # A matrix of named cases must not gain an unnamed defaults-only case (a full
    # extra render); with neither axes nor cases the defaults are the one case.
    for combo in itertools.product(*(axes[k] for k in names)) if names else ([] if doc.get("cases") else [()]):
        c = _apply(base, dict(zip(names, combo)), f"{where} axes")
        if not any(_matches(c, ex, f"{where} exclude") for ex in doc.get("exclude") or []):
            cases.append(c)
            given.append(_keys_to_fields({**(doc.get("defaults") or {}), **dict.fromkeys(names)}))
    for i, extra in enumerate(doc.get("cases") or []):
        if not isinstance(extra, dict):
            raise WanrenderError(f"{where}: cases[{i}] must be a mapping of fields — e.g. {{frames: 9, inject: oom}}")
        cases.append(_apply(base, extra, f"{where} cases[{i}]"))
        given.append(_keys_to_fields({**(doc.get("defaults") or {}), **extra}))
    if not cases:
        raise WanrenderError(f"{where}: the matrix expands to no cases — check axes and exclude")
    resolved = []
    for c, label, g in zip(cases, _labels(cases), given):
        try:
            c = _resolve_paths(c, base_dir)
            resolved.append(_from_workflow(c, g) if c.engine == "comfyui" else c)
        except WanrenderError as e:
            raise WanrenderError(f"{where}: case {label!r}: {e}") from None
    cases = resolved
    for c, label in zip(cases, _labels(cases)):
        try:
            _check_comfy(c) if c.engine == "comfyui" else _check_request(c)
        except WanrenderError as e:
            raise WanrenderError(f"{where}: case {label!r}: {e}") from None
    seen: dict[str, str] = {}
    labels = _labels(cases)
    for c, label in zip(cases, labels):
        if c.case_hash in seen:
            raise WanrenderError(f"{where}: cases {seen[c.case_hash]!r} and {label!r} are the same render — drop one")
        seen[c.case_hash] = label
    # Reports, --only and compare's output name cases by label: two cases under one name cannot be told apart.
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise WanrenderError(f"{where}: two different cases are labelled {twice[0]!r} — give each its own name")
    return Matrix(str(doc.get("name") or (path.stem if path else "matrix")), path, tuple(cases), tuple(labels))


def load(path: Path) -> Matrix:
    return expand(read_yaml(path, "matrix"), Path(path))
