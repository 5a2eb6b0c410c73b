"""From an evaluated output to a render request: the Wan 2.2 two-expert shape checked,
every value with its source.

The KSamplerAdvanced pair maps as in ComfyUI's Wan 2.2 14B i2v template: the first
sampler (noise added, steps 0 -> S, leftover noise returned) is the high-noise expert,
the second (no noise added, S -> the end) the low-noise one; S is the switch step, an
end step past the step count means "to the end". A single KSampler (or one
KSamplerAdvanced over every step) runs one expert over the whole schedule: the
high-noise expert maps to switch = steps, the low-noise one to switch = 0 (which
expert it is comes from its file name); the other expert's file is still needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from wanrender.errors import WanrenderError, shown
from wanrender.spec import RENDER_FPS
from wanrender.workflow.evaluate import Cond, Frames, I2VOut, Image, Model, Output, Sampled, Val

SCHEDULERS = ("simple",)
COMFY_WAN_SHIFT = 8.0  # ComfyUI's sampling shift for Wan models when no ModelSamplingSD3 sets one


@dataclass
class Reading:
    """What a workflow asks for: request fields and model file names, each with its source."""

    fields: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    files: dict[str, Val] = field(default_factory=dict)  # role -> file name as the workflow writes it
    image: Val | None = None
    notes: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str, str]] = field(default_factory=list)  # (id, type, why)
    output: str = ""
    format: str = ""

    def set(self, name: str, value: Any, src: str) -> None:
        self.fields[name] = value
        self.sources[name] = src


def read_output(out: Output) -> Reading:
    r = Reading(output=out.node)
    frames = out.frames
    if not isinstance(frames, Frames):
        raise WanrenderError(f"{out.node}: its images do not come from a VAEDecode — connect it as in ComfyUI's "
                             "Wan 2.2 14B i2v template")  # fmt: skip
    _fps(r, out, frames)
    if out.node.endswith("SaveAnimatedWEBP") or "webp" in str(out.format.value if out.format else "").lower():
        r.notes.append(f"{out.node}: wanrender writes MP4 (H.264), not WebP")
    if out.crf is not None:
        r.set("crf", out.crf.value, out.crf.src)
    chain = []
    latent = frames.samples
    while isinstance(latent, Sampled):
        chain.append(latent)
        latent = latent.latent
    chain.reverse()
    if not chain:
        raise WanrenderError(f"{out.node}: the decoded latent does not come from a sampler — the workflow samples "
                             "nothing wanrender can reproduce")  # fmt: skip
    if not (isinstance(latent, I2VOut) and latent.slot == 2):
        raise WanrenderError(f"{chain[0].node}: its latent_image does not come from WanImageToVideo's latent — "
                             "wanrender renders Wan 2.2 14B image-to-video")  # fmt: skip
    i2v = latent.i2v
    if len(chain) > 2:
        raise WanrenderError(f"{len(chain)} samplers in a row ({', '.join(s.node for s in chain)}) — wanrender runs "
                             "the two-expert pair (high, then low); bypass the extra ones")  # fmt: skip
    models = _samplers(r, chain)
    for s in chain:
        for name, want in (("positive", 0), ("negative", 1)):
            got = getattr(s, name)
            if not (isinstance(got, I2VOut) and got.i2v is i2v and got.slot == want):
                raise WanrenderError(f"{s.node}: its {name} input does not come from {i2v.node}'s {name} output — "
                                     "connect it there")  # fmt: skip
    _texts(r, i2v)
    if i2v.vae.file.value != frames.vae.file.value:
        raise WanrenderError(f"{frames.vae.file.src} and {i2v.vae.file.src} name different VAEs "
                             f"({shown(frames.vae.file.value)} vs {shown(i2v.vae.file.value)}) — use one")  # fmt: skip
    r.files["vae"] = i2v.vae.file
    if not isinstance(i2v.image, Image):
        raise WanrenderError(f"{i2v.node}: start_image must come from a LoadImage node")
    r.image = i2v.image.file
    for name, v in (("width", i2v.width), ("height", i2v.height), ("frames", i2v.length)):
        r.set(name, v.value, v.src)
    if i2v.batch.value != 1:
        raise WanrenderError(f"{i2v.batch.src}: batch {i2v.batch.value} — wanrender renders one video per request; "
                             "set batch_size to 1")  # fmt: skip
    for side, model in models.items():
        _expert(r, side, model)
    return r


def _fps(r: Reading, out: Output, frames: Frames) -> None:
    mult, kinds = 1, []
    for node, kind, m in frames.interps:
        if m.value < 2:
            r.notes.append(f"{node}: multiplier {m.value} changes nothing")
            continue
        mult *= m.value
        kinds.append(kind)
        if kind == "FILM VFI":
            r.notes.append(f"{node}: FILM is rendered with RIFE, wanrender's learned interpolator")
    fps = out.fps.value
    if mult > 1:
        if len(kinds) > 1:
            raise WanrenderError(f"{len(kinds)} interpolation nodes in a row — use one with the total multiplier")
        if not math.isclose(fps, RENDER_FPS * mult):
            raise WanrenderError(
                f"{out.fps.src}: {fps:g} fps after x{mult} interpolation plays the video at another speed; "
                f"wanrender writes {RENDER_FPS} x N fps — set it to {RENDER_FPS * mult}"
            )
        r.set("interpolate", "rife", f"{frames.interps[-1][0]} (x{mult})")
    elif float(fps) != int(fps):
        raise WanrenderError(f"{out.fps.src}: {fps:g} fps — wanrender writes whole frame rates; use {round(fps)}")
    r.set("fps", int(fps), out.fps.src)


def _check(cond: bool, src: str, problem: str, fix: str) -> None:
    if not cond:
        raise WanrenderError(f"{src}: {problem} — {fix}")


def _samplers(r: Reading, chain: list[Sampled]) -> dict[str, Model]:
    first = chain[0]
    v = first.vals
    seed = v.get("noise_seed") or v.get("seed")
    r.set("seed", seed.value, seed.src)
    if seed.control and seed.control != "fixed":
        r.notes.append(f"seed {seed.value}: its control is '{seed.control}' — the stored value is used "
                       "(ComfyUI would change it after each run)")  # fmt: skip
    for s in chain:
        _check(s.vals["scheduler"].value in SCHEDULERS, s.vals["scheduler"].src,
               f"scheduler {shown(s.vals['scheduler'].value)!r} is not implemented", "set it to simple")  # fmt: skip
        if "denoise" in s.vals:
            _check(s.vals["denoise"].value == 1.0, s.vals["denoise"].src, f"denoise {s.vals['denoise'].value} is "
                   "image-to-image on a latent", "set it to 1.0 (Wan 2.2 I2V conditions on the image instead)")  # fmt: skip
    steps = v["steps"]
    r.set("steps", steps.value, steps.src)
    r.set("cfg", v["cfg"].value, v["cfg"].src)
    r.set("sampler", v["sampler_name"].value, v["sampler_name"].src)
    for s in chain[1:]:
        for name in ("steps", "cfg", "sampler_name", "scheduler"):
            _check(s.vals[name].value == v[name].value, s.vals[name].src,
                   f"{name} {s.vals[name].value} differs from {v[name].src}'s {v[name].value}",
                   "wanrender's two passes share it; set both the same")  # fmt: skip
    models = [_want_model(s) for s in chain]
    n = steps.value
    if len(chain) == 1:
        start, end = v.get("start_at_step"), v.get("end_at_step")
        if start is not None:
            _check(start.value == 0 and end.value >= n, start.src, f"one sampler runs steps {start.value}..{end.value}"
                   f" of {n}", "run all steps (0 to the end), or use the KSamplerAdvanced pair")  # fmt: skip
            _check(v["add_noise"].value == "enable", v["add_noise"].src, "add_noise is off", "enable it")
        side = _expert_of(models[0])
        if side is None:
            raise WanrenderError(f"{first.node} runs one model ({shown(models[0].file.value)}): wanrender cannot tell "
                                 "which Wan 2.2 expert it is — name the file *high_noise* or *low_noise*, or use the "
                                 "KSamplerAdvanced pair of the Wan 2.2 14B i2v template")  # fmt: skip
        r.set("switch", n if side == "high" else 0, f"{first.node}: one sampler, the {side}-noise expert throughout")
        return {side: models[0]}
    a, b = chain
    sw = min(a.vals["end_at_step"].value, n)
    _check(a.vals["start_at_step"].value == 0, a.vals["start_at_step"].src, "the first pass does not start at 0",
           "set start_at_step to 0")  # fmt: skip
    _check(b.vals["start_at_step"].value == sw, b.vals["start_at_step"].src,
           f"the second pass starts at {b.vals['start_at_step'].value}, not where the first ends ({sw})",
           f"set it to {sw}")  # fmt: skip
    _check(
        b.vals["end_at_step"].value >= n,
        b.vals["end_at_step"].src,
        f"the second pass stops at {b.vals['end_at_step'].value} of {n} steps",
        "let it run to the end (10000)",
    )
    noisy = a if sw > 0 else b
    _check(noisy.vals["add_noise"].value == "enable", noisy.vals["add_noise"].src, "add_noise is off on the pass "
           "that starts from noise", "enable it")  # fmt: skip
    if 0 < sw:
        _check(b.vals["add_noise"].value == "disable", b.vals["add_noise"].src, "the second pass adds new noise",
               "disable add_noise on it (it continues the first pass)")  # fmt: skip
    if sw < n:
        _check(
            a.vals["return_with_leftover_noise"].value == "enable",
            a.vals["return_with_leftover_noise"].src,
            "the first pass denoises fully before the second",
            "enable return_with_leftover_noise on it",
        )
    _check(
        b.vals["return_with_leftover_noise"].value == "disable",
        b.vals["return_with_leftover_noise"].src,
        "the last pass returns leftover noise (a noisy video)",
        "disable return_with_leftover_noise",
    )
    r.set("switch", sw, f"{a.vals['end_at_step'].src} / {b.vals['start_at_step'].src}")
    if b.vals["noise_seed"].value != seed.value:
        r.notes.append(f"{b.vals['noise_seed'].src}: not used (that pass adds no noise)")
    for side, m in (("high", models[0]), ("low", models[1])):
        other = _expert_of(m)
        if other is not None and other != side:
            raise WanrenderError(
                f"{m.file.src}: the {'first' if side == 'high' else 'second'} pass runs "
                f"{shown(m.file.value)}, a {other}-noise expert — the high-noise expert goes first"
            )
    return {"high": models[0], "low": models[1]}


def _want_model(s: Sampled) -> Model:
    if not isinstance(s.model, Model):
        raise WanrenderError(f"{s.node}: its model does not come from a UNETLoader (through LoRA loaders and "
                             "ModelSamplingSD3) — connect it as in the Wan 2.2 14B i2v template")  # fmt: skip
    return s.model


def _expert_of(m: Model) -> str | None:
    name = str(m.file.value).lower()
    has_high, has_low = "high_noise" in name or "high-noise" in name, "low_noise" in name or "low-noise" in name
    return "high" if has_high and not has_low else "low" if has_low and not has_high else None


def _expert(r: Reading, side: str, m: Model) -> None:
    r.files[side] = m.file
    if m.shift is None:
        r.set(f"shift_{side}", COMFY_WAN_SHIFT, f"no ModelSamplingSD3 on the {side}-noise model: ComfyUI's Wan "
              f"default {COMFY_WAN_SHIFT:g}")  # fmt: skip
    else:
        r.set(f"shift_{side}", m.shift.value, m.shift.src)
    active = []
    for name, strength, node in m.loras:
        if strength.value == 0:
            r.notes.append(f"{node}: strength 0, so {shown(name.value)} changes nothing and is not loaded")
        else:
            active.append((name, strength, node))
    if len(active) > 1:
        raise WanrenderError(
            f"{len(active)} LoRAs on the {side}-noise expert ({', '.join(a[2] for a in active)}) — "
            "wanrender applies one LoRA per expert; set the others' strength to 0 or bypass them"
        )
    if active:
        name, strength, _ = active[0]
        r.files[f"lora_{side}"] = name
        r.set(f"lora_strength_{side}", strength.value, strength.src)
    else:
        r.set(f"lora_strength_{side}", 0.0, f"no LoRA loader on the {side}-noise model")


def _texts(r: Reading, i2v) -> None:
    for name, field_name in (("positive", "prompt"), ("negative", "negative")):
        cond = getattr(i2v, name)
        if not isinstance(cond, Cond):
            raise WanrenderError(f"{i2v.node}: its {name} input does not come from a CLIPTextEncode — connect one")
        r.set(field_name, cond.text.value, cond.text.src)
        clip = cond.clip
        _check(clip.type.value == "wan", clip.type.src, f"CLIPLoader type {shown(clip.type.value)!r} is not the "
               "Wan text encoder", "set type to wan")  # fmt: skip
        if "text_encoder" in r.files and r.files["text_encoder"].value != clip.file.value:
            raise WanrenderError(f"{clip.file.src}: the two prompts use different text encoders — use one CLIPLoader")
        r.files["text_encoder"] = clip.file
