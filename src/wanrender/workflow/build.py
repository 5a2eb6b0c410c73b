"""A ``Reading`` turned into a validated ``RenderRequest`` and the ``ModelFiles`` it
loads, with the command line's values over the workflow's.

A value the request cannot take (a sampler wanrender does not implement, 80 frames)
is refused with ``request.validate``'s own message, prefixed with the node it came
from; the same value given on the command line keeps the command line's wording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wanrender.errors import WanrenderError
from wanrender.models.inventory import ModelFiles, scan
from wanrender.request import validate, with_fields
from wanrender.spec import RENDER_FPS, RenderRequest, RenderSpec, SpecError
from wanrender.workflow.mapping import Reading
from wanrender.workflow.resolve import ROLE_TEXT, find_model

PRESET = "workflow"  # the request's preset name: the workflow file, not a built-in preset, set the sampling
CLI = "command line"


def merged_fields(reading: Reading, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The workflow's fields with ``given`` (request fields from the command line) over them."""
    fields, sources = dict(reading.fields), dict(reading.sources)
    given = {k: v for k, v in given.items() if v is not None}
    if "steps" in given and "switch" not in given and fields.get("steps"):
        given["switch"] = max(
            0, round(given["steps"] * fields["switch"] / fields["steps"])
        )  # keep the workflow's ratio
    if "interpolate" in given and "fps" not in given:
        was = fields.get("interpolate", "off")
        if given["interpolate"] == "off" and was != "off":
            given["fps"] = RENDER_FPS
        elif given["interpolate"] != "off" and was == "off":
            given["fps"] = 2 * RENDER_FPS
    fields.update(given)
    sources.update({k: CLI for k in given})
    return fields, sources


def build_request(reading: Reading, image: Path, given: dict[str, Any]) -> RenderRequest:
    fields, sources = merged_fields(reading, given)
    prompt = fields.pop("prompt")
    req = with_fields(RenderRequest(RenderSpec(image, prompt), preset=PRESET), **fields)
    try:
        return validate(req)
    except SpecError as e:
        src = sources.get(e.field)
        if src is None or src == CLI:
            raise
        raise WanrenderError(f"{src}: {e} (or override it on the command line)") from None


def build_files(reading: Reading, dirs: dict[str, list[Path]], explicit: dict[str, Path | None],
                models_dir: Path | None, hint: str) -> ModelFiles:  # fmt: skip
    """The workflow's files, found in ``dirs``; ``explicit`` (--high, --vae, ...) wins.
    An expert the workflow does not run still has to be loaded: --high/--low or --models."""
    chosen: dict[str, Path | None] = {}
    for role in ROLE_TEXT:
        if explicit.get(role) is not None:
            chosen[role] = explicit[role]
        elif role in reading.files:
            chosen[role] = find_model(role, reading.files[role], dirs, hint)
    for side in ("high", "low"):
        if chosen.get(side) is None and models_dir is not None:
            chosen[side] = getattr(scan(models_dir), side)
        if chosen.get(side) is None:
            raise WanrenderError(f"the workflow runs only one expert; wanrender still loads the {ROLE_TEXT[side]} "
                                 f"— pass --{side} FILE or --models DIR")  # fmt: skip
    return ModelFiles(
        high=chosen["high"], low=chosen["low"], vae=chosen["vae"], text_encoder=chosen["text_encoder"],
        tokenizer=explicit.get("tokenizer") or chosen["text_encoder"],
        lora_high=chosen.get("lora_high"), lora_low=chosen.get("lora_low"),
    )  # fmt: skip
