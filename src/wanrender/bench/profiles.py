"""GPU profiles: the fastest knobs (precision, attention, compile, memory plan) per
GPU and resolution/frame bucket, with where the numbers came from.

Profiles are YAML. ``wanrender tune`` writes one for the GPU it runs on into
``$WANRENDER_HOME/profiles/``; the package ships profiles under
``wanrender/profiles/`` (measured ones, and planner-derived ones marked
``estimated: true``). ``generate --profile auto`` takes the first profile whose
``match`` strings occur in the device's name, user profiles before shipped ones,
and fills in the knobs the user did not set.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.spec import tokens as dit_tokens

log = logging.getLogger(__name__)

SCHEMA = 1
KNOBS = ("precision", "attention", "compile", "memory_plan")
REQUEST_KNOBS = ("precision", "attention", "compile")  # the ones RenderRequest carries


@dataclass(frozen=True)
class Bucket:
    name: str
    frames: int
    width: int
    height: int
    knobs: dict[str, str]
    measured: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return dit_tokens(self.frames, self.width, self.height)


@dataclass(frozen=True)
class Profile:
    path: str
    device: str
    match: tuple[str, ...]
    estimated: bool
    provenance: dict
    buckets: tuple[Bucket, ...]
    memory_gib: float | None = None

    def matches(self, device_name: str) -> bool:
        name = device_name.lower()
        return any(m.lower() in name for m in self.match)

    def bucket_for(self, frames: int, width: int, height: int) -> Bucket:
        """The bucket nearest in latent tokens (log scale: 2x more and 2x fewer are equally far)."""
        n = dit_tokens(frames, width, height)
        return min(self.buckets, key=lambda b: abs(math.log(max(b.tokens, 1) / max(n, 1))))


def _fail(path: object, what: str) -> WanrenderError:
    return WanrenderError(f"{path}: {what} — see src/wanrender/profiles/h200.yaml for the format")


def parse_profile(doc: object, path: str) -> Profile:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise _fail(path, f"not a wanrender GPU profile (schema {SCHEMA})")
    match = doc.get("match")
    if not isinstance(match, list) or not match or not all(isinstance(m, str) and m for m in match):
        raise _fail(path, "'match' must be a list of device-name substrings")
    buckets = []
    for i, b in enumerate(doc.get("buckets") or []):
        try:
            knobs = {k: str(v) for k, v in (b.get("knobs") or {}).items()}
            bad = set(knobs) - set(KNOBS)
            if bad:
                raise _fail(path, f"bucket {i}: unknown knob {sorted(bad)[0]!r} (knobs: {', '.join(KNOBS)})")
            buckets.append(Bucket(str(b.get("name") or i), int(b["frames"]), int(b["width"]), int(b["height"]),
                                  knobs, dict(b.get("measured") or {})))  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _fail(path, f"bucket {i} needs frames, width, height and knobs") from None
    if not buckets:
        raise _fail(path, "no buckets")
    return Profile(path, str(doc.get("device") or match[0]), tuple(match), bool(doc.get("estimated", False)),
                   dict(doc.get("provenance") or {}), tuple(buckets), doc.get("memory_gib"))  # fmt: skip


def load_profile(path: Path) -> Profile:
    from wanrender.bench.matrix import read_yaml

    return parse_profile(read_yaml(path, "profile"), str(path))


def user_dir() -> Path:
    from wanrender.paths import home

    return home() / "profiles"


def _shipped() -> list[tuple[str, str]]:
    from importlib import resources

    folder = resources.files("wanrender") / "profiles"
    if not folder.is_dir():
        return []
    return sorted((str(p), p.read_text(encoding="utf-8")) for p in folder.iterdir() if p.name.endswith(".yaml"))


def all_profiles() -> list[Profile]:
    """User profiles (``wanrender tune``) first, then the shipped ones; unreadable user files are skipped with a warning."""
    import yaml

    out: list[Profile] = []
    folder = user_dir()
    for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            out.append(load_profile(p))
        except WanrenderError as e:
            log.warning("skipping profile %s", e)
    for name, text in _shipped():
        out.append(parse_profile(yaml.safe_load(text), name))
    return out


def find_profile(device_name: str) -> Profile | None:
    return next((p for p in all_profiles() if p.matches(device_name)), None)


@dataclass(frozen=True)
class ProfileChoice:
    """The knobs a profile gives a request on a device: what ``generate`` applies and ``plan`` predicts with."""

    profile: Profile
    bucket: Bucket
    chosen: dict[str, str]  # the request knobs it sets (those not given explicitly)

    def record(self) -> dict:
        p = self.profile
        return {"path": p.path, "device": p.device, "bucket": self.bucket.name, "estimated": p.estimated,
                "applied": self.chosen, "memory_plan": self.bucket.knobs.get("memory_plan"),
                "source": p.provenance.get("source")}  # fmt: skip

    def line(self) -> str:
        kind = "estimated" if self.profile.estimated else "measured"
        knobs = ", ".join(f"{k} {v}" for k, v in self.chosen.items()) or "nothing (all set explicitly)"
        return f"profile {Path(self.profile.path).name} ({self.profile.device}, {kind}, bucket {self.bucket.name}): {knobs}"


def choose_profile(
    spec: str, device_name: str, frames: int, width: int, height: int, explicit: set[str]
) -> ProfileChoice | None:
    """The one rule ``generate --profile`` and ``plan`` share: ``spec`` is ``auto`` (the first
    profile matching ``device_name``), ``off``, or a profile file; the bucket nearest the
    request's size gives the knobs not in ``explicit``."""
    if spec == "off":
        return None
    prof = find_profile(device_name) if spec == "auto" else load_profile(Path(spec))
    if prof is None:
        return None
    bucket = prof.bucket_for(frames, width, height)
    chosen = {k: v for k, v in bucket.knobs.items() if k in REQUEST_KNOBS and k not in explicit}
    return ProfileChoice(prof, bucket, chosen)


def apply_profile(req, spec: str, device: str | None, explicit: set[str]) -> tuple[object, str | None]:
    """``req`` with the profile's knobs for the knobs not in ``explicit``, and a line saying what happened.

    ``spec``: ``auto`` (match this device), ``off``, or a profile file. A profile's
    knobs that cannot run here are dropped under ``auto`` (the render falls back to
    its own defaults) and refused for an explicit file.
    """
    import torch

    from wanrender.bench.env import device_name as name_of

    if spec == "off":
        return req, None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = req.render
    choice = choose_profile(spec, name_of(dev), r.frames, r.width, r.height, explicit)
    if choice is None:
        return req, None
    prof, chosen = choice.profile, choice.chosen
    if chosen:
        from wanrender.runtime.plan import make_plan

        trial = {k: chosen.get(k, getattr(req.knobs, k)) for k in REQUEST_KNOBS}
        try:
            make_plan(dev, trial["precision"], trial["attention"], trial["compile"])
        except WanrenderError as e:
            if spec != "auto":
                raise WanrenderError(f"profile {prof.path} does not fit this device: {e}") from None
            log.warning("profile %s not applied: %s", prof.path, e)
            return req, f"profile {Path(prof.path).name} not applied ({e})"
    req = replace(req, knobs=replace(req.knobs, **chosen), extra={**req.extra, "profile": choice.record()})
    return req, choice.line()


def write_profile(path: Path, doc: dict, header: str) -> Path:
    import json

    import yaml

    from wanrender.media.atomic import atomic_write_text

    doc = json.loads(json.dumps(doc, default=str))  # plain types only (torch's version is a str subclass)
    parse_profile(doc, str(path))  # never write a profile this module could not read back
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(doc, sort_keys=False, width=110)
    atomic_write_text(path, text)
    return path
