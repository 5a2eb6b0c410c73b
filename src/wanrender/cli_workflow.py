"""``wanrender workflow show|export`` and the ``--workflow`` side of ``generate``:
ComfyUI workflow files read into render requests, and requests written as workflows.

Everything is checked before a model loads: the file, its active path, every value
the request takes, the model files and the image; each problem is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from wanrender.errors import WanrenderError, shown

console = Console(stderr=True)
workflow_app = typer.Typer(no_args_is_help=True, help="Read ComfyUI workflow files, and write requests as workflows.")

SUPPORTED = (
    "UNETLoader, CLIPLoader, VAELoader, LoraLoaderModelOnly, ModelSamplingSD3, CLIPTextEncode, LoadImage, "
    "WanImageToVideo, KSamplerAdvanced (the pair), KSampler, VAEDecode, CreateVideo, SaveVideo, SaveAnimatedWEBP, "
    "VHS_VideoCombine, RIFE VFI, FILM VFI; Reroute, PrimitiveNode/Int/Float/Boolean/String, MathExpression|pysssss, "
    "SimpleMath+, ComfySwitchNode, Switch any [Crystools], subgraphs"
)
# generate's options that set request fields (the flag's parameter -> field); --size and the
# S,S pairs are split below.
_FIELDS = ("prompt", "negative", "frames", "steps", "switch", "cfg", "sampler", "seed", "fit", "interpolate", "fps",
           "crf", "x264_preset", "save_frames", "out", "precision", "attention", "compile", "memory", "reserve_vram")  # fmt: skip
_FILES = ("high", "low", "vae", "text_encoder", "tokenizer", "lora_high", "lora_low")


def _fail(err: Exception) -> None:
    from wanrender.cli_errors import fail

    fail(err)


def _dirs(models: Optional[Path], comfy_root: Optional[Path]) -> dict[str, list[Path]]:
    from wanrender.workflow.resolve import search_dirs

    return search_dirs(models, comfy_root)


def _hint(models: Optional[Path], comfy_root: Optional[Path]) -> str:
    if models is None and comfy_root is None:
        return "pass --models DIR or --comfy-root DIR (or the file with --high/--low/--vae/--text-encoder/--lora-*)"
    return "fix the name in the workflow, or pass the file with --high/--low/--vae/--text-encoder/--lora-*"


def given_params(ctx: Optional[typer.Context]) -> set[str]:
    """The parameters typed on the command line (or set by environment), not typer's defaults."""
    if ctx is None:
        return set()
    return {k for k in ctx.params if ctx.get_parameter_source(k).name in ("COMMANDLINE", "ENVIRONMENT")}


def workflow_request(ctx: typer.Context):
    """``generate --workflow``: (request, model files), the command line over the workflow."""
    from wanrender.cli_errors import pair as _pair
    from wanrender.request import with_fields
    from wanrender.spec import parse_size
    from wanrender.workflow.build import build_files, build_request
    from wanrender.workflow.reader import read
    from wanrender.workflow.resolve import find_image

    params, typed = ctx.params, given_params(ctx)
    if "preset" in typed:
        raise WanrenderError("--preset and --workflow both set the sampling — drop --preset (flags such as --steps "
                             "override the workflow's values)")  # fmt: skip
    reading = read(params["workflow"])
    given: dict[str, Any] = {k: params[k] for k in _FIELDS if k in typed}
    if "size" in typed:
        given["width"], given["height"] = parse_size(params["size"], "--size")
    if "shift" in typed:
        given["shift_high"], given["shift_low"] = _pair(params["shift"], "--shift")
    if "lora_strength" in typed:
        given["lora_strength_high"], given["lora_strength_low"] = _pair(params["lora_strength"], "--lora-strength")
    if "boundary" in typed:
        given["switch"] = _boundary_switch(reading, given, params)
    comfy_root, models = params.get("comfy_root"), params.get("models")
    image = params.get("image")
    req = build_request(reading, image or Path(str(reading.image.value)), given)  # values first: no file is needed
    if image is None:
        input_dir = params.get("input_dir") or (comfy_root / "input" if comfy_root else Path.cwd())
        req = with_fields(req, image=find_image(reading.image, input_dir))
    hint = _hint(models, comfy_root)
    files = build_files(reading, _dirs(models, comfy_root), {k: params.get(k) for k in _FILES}, models, hint)
    from dataclasses import replace

    req = replace(req, extra={**req.extra, "workflow": {"file": str(params["workflow"]), "output": reading.output}})
    for note in reading.notes:
        console.print(f"[yellow]note:[/] {escape(shown(note))}", highlight=False, soft_wrap=True)
    return req, files


def _boundary_switch(reading, given: dict, params: dict) -> int:
    from wanrender.pipeline.schedules import boundary_switch_step, simple_sigmas

    if "switch" in given:
        raise WanrenderError("--switch and --boundary both set the expert switch — give only one")
    b = float(params["boundary"])
    if not 0.0 < b < 1.0:
        raise WanrenderError(f"--boundary {b} is invalid — use a value in (0, 1); Wan 2.2 I2V uses 0.9")
    steps = int(given.get("steps", reading.fields["steps"]))
    shift = float(given.get("shift_high", reading.fields["shift_high"]))
    return boundary_switch_step(simple_sigmas(max(1, steps), shift), b)


@workflow_app.command("show")
def show(
    file: Path = typer.Argument(..., help="A ComfyUI workflow .json (editor or API format)."),
    models: Optional[Path] = typer.Option(None, "--models", help="Also find the model files in this folder."),
    comfy_root: Optional[Path] = typer.Option(
        None, "--comfy-root", help="Also find the model files in this ComfyUI (models/, extra_model_paths.yaml)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Print the render request a workflow's active path specifies, where each value came from, and what was
    ignored and why."""
    from wanrender.workflow.build import build_request
    from wanrender.workflow.reader import read
    from wanrender.workflow.resolve import find_model

    try:
        reading = read(file)
        build_request(reading, Path(str(reading.image.value)), {})  # what generate would refuse, show refuses
        paths: dict[str, str] = {}
        if models is not None or comfy_root is not None:
            dirs = _dirs(models, comfy_root)
            paths = {
                role: str(find_model(role, v, dirs, _hint(models, comfy_root))) for role, v in reading.files.items()
            }
    except WanrenderError as e:
        _fail(e)
        return
    data = {
        "file": str(file), "format": reading.format, "output": reading.output,
        "request": reading.fields, "sources": reading.sources,
        "files": {role: {"name": v.value, "source": v.src, **({"path": paths[role]} if role in paths else {})}
                  for role, v in reading.files.items()},
        "image": {"name": reading.image.value, "source": reading.image.src} if reading.image else None,
        "notes": reading.notes,
        "ignored": [{"id": i, "type": t, "why": w} for i, t, w in reading.ignored],
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps(data, indent=1, ensure_ascii=False))
        return
    _print(data)


show.__doc__ = (show.__doc__ or "") + "\n\n    Supported nodes: " + SUPPORTED + "."


_ORDER = ("prompt", "negative", "frames", "width", "height", "seed", "steps", "switch", "cfg", "sampler", "shift_high",
          "shift_low", "lora_strength_high", "lora_strength_low", "fps", "interpolate", "crf")  # fmt: skip


def _print(data: dict) -> None:
    """Plain lines (value, then its source), so that long sources neither wrap nor get cut."""
    out = Console(soft_wrap=True, highlight=False)
    fmt = "editor (UI)" if data["format"] == "ui" else "API"
    out.print(f"{escape(data['file'])}: {fmt} format, rendered to {escape(data['output'])}")
    out.print("request:")
    req = data["request"]
    for k in sorted(req, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER)):
        v = req[k]
        text = shown(v if not isinstance(v, str) or len(v) <= 60 else v[:57] + "...")
        out.print(f"  {k:<19} {escape(repr(text) if isinstance(v, str) else text):<24} <- {escape(data['sources'][k])}")
    out.print("files:")
    for role, v in data["files"].items():
        where = f" = {escape(v['path'])}" if "path" in v else ""
        out.print(f"  {role:<19} {escape(shown(v['name']))}{where} <- {escape(v['source'])}")
    if data["image"]:
        out.print(f"  {'image':<19} {escape(shown(data['image']['name']))} <- {escape(data['image']['source'])}")
    for note in data["notes"]:
        out.print(f"note: {escape(shown(note))}")
    if data["ignored"]:
        out.print("ignored:")
        for i in data["ignored"]:
            out.print(f"  #{escape(i['id'])} {escape(i['type'])}: {escape(i['why'])}")


@workflow_app.command("export")
def export(
    image: Path = typer.Argument(..., help="Start image (its name goes into LoadImage; copy it to ComfyUI's input/)."),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    out: Path = typer.Option(..., "--out", "-o", help="The workflow .json to write."),
    fmt: str = typer.Option("ui", "--format", help="ui (Workflow > Open) or api (POST /prompt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    negative: Optional[str] = typer.Option(None, "--negative"),
    preset: str = typer.Option("turbo", "--preset", help="turbo, quality or demo."),
    frames: Optional[int] = typer.Option(None, "--frames"),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT."),
    steps: Optional[int] = typer.Option(None, "--steps"),
    switch: Optional[int] = typer.Option(None, "--switch"),
    boundary: Optional[float] = typer.Option(None, "--boundary"),
    cfg: Optional[float] = typer.Option(None, "--cfg"),
    shift: Optional[str] = typer.Option(None, "--shift", help="S or S_HIGH,S_LOW."),
    sampler: Optional[str] = typer.Option(None, "--sampler"),
    seed: int = typer.Option(0, "--seed"),
    interpolate: str = typer.Option("off", "--interpolate", help="off or rife (RIFE VFI)."),
    fps: Optional[int] = typer.Option(None, "--fps"),
    lora_strength: Optional[str] = typer.Option(None, "--lora-strength", help="S or S_HIGH,S_LOW."),
    models: Optional[Path] = typer.Option(
        None, "--models", help="Name the files found here (default: the names of ComfyUI's repackaged files)."
    ),  # fmt: skip
    high: Optional[Path] = typer.Option(None, "--high"),
    low: Optional[Path] = typer.Option(None, "--low"),
    vae: Optional[Path] = typer.Option(None, "--vae"),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder"),
    lora_high: Optional[Path] = typer.Option(None, "--lora-high"),
    lora_low: Optional[Path] = typer.Option(None, "--lora-low"),
) -> None:
    """Write the ComfyUI workflow equivalent to a render request (the Wan 2.2 14B i2v template's shape).

    'wanrender workflow show' on the result gives back the same request. An existing --out is replaced only
    with --overwrite, and is written whole or not at all."""
    from wanrender.cli_errors import pair as _pair
    from wanrender.media.atomic import atomic_write_text, check_target
    from wanrender.request import from_preset
    from wanrender.spec import parse_size
    from wanrender.workflow.export import to_api, to_ui

    try:
        if fmt not in ("ui", "api"):
            raise WanrenderError(f"--format {fmt!r} is invalid — choose ui or api")
        width, height = parse_size(size, "--size") if size else (None, None)
        sh, sl = _pair(shift, "--shift")
        lh, ll = _pair(lora_strength, "--lora-strength")
        req = from_preset(preset, image, prompt, negative=negative, frames=frames, width=width, height=height,
                          steps=steps, switch=switch, boundary=boundary, cfg=cfg, shift_high=sh, shift_low=sl,
                          sampler=sampler, seed=seed, interpolate=interpolate, fps=fps, lora_strength_high=lh,
                          lora_strength_low=ll)  # fmt: skip
        files: dict[str, Any] = {}
        if models is not None:
            from wanrender.models.inventory import scan

            found = scan(models)
            files = {k: getattr(found, k) for k in ("high", "low", "vae", "text_encoder", "lora_high", "lora_low")}
        explicit = {"high": high, "low": low, "vae": vae, "text_encoder": text_encoder, "lora_high": lora_high,
                    "lora_low": lora_low}  # fmt: skip
        files.update({k: v for k, v in explicit.items() if v is not None})
        data = (to_api if fmt == "api" else to_ui)(req, files)
        if out.is_dir():
            raise WanrenderError(f"{shown(out)} is a folder — pass a file name, e.g. wf.json")
        if out.exists() and not overwrite:
            raise WanrenderError(f"{shown(out)} exists — pass --overwrite to replace it, or choose another --out")
        check_target(out)
        atomic_write_text(out, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    except WanrenderError as e:
        _fail(e)
        return
    Console().print(f"wrote {escape(shown(out))} ({fmt} format)", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(workflow_app, name="workflow")
