"""GPU profiles: the fastest knobs (precision, attention, compile, memory plan) per
GPU and resolution/frame bucket, with where the numbers came from.

Profiles are YAML. ``wanrender tune`` writes one for the GPU it runs on into
``$WANRENDER_HOME/profiles/``; the package ships profiles under
``wanrender/profiles/`` (measured ones, and planner-derived ones marked
``estimated: true``). ``generate --profile auto`` takes the first profile whose
``match`` strings occur in the device's name, user profiles before shipped ones,
and fills in the knobs the user did not set. A service worker (``serve``, ``worker``)
resolves its profile once at start (``resolve_profile``) and applies it to each
job (``apply_resolved``), bucketed by the job's size like ``generate``.

It sits in ``runtime/`` (not the bench lab) because the generate path, ``plan`` and
the service all read profiles; ``bench tune`` writes them (``bench.tune.write_profile``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.spec import RuntimeKnobs
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

    def describe(self) -> str:
        """``h200.yaml (NVIDIA H200, measured)``: what a worker logs and advertises."""
        return f"{Path(self.path).name} ({self.device}, {'estimated' if self.estimated else 'measured'})"

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


def read_yaml(path: Path, what: str) -> object:
    """A YAML document (a profile, a bench matrix), with one-line errors that name the file."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise WanrenderError(f"{path}: cannot read the {what} ({e.strerror}) — check the path") from None
    except UnicodeDecodeError:
        raise WanrenderError(f"{path}: not a text file (invalid UTF-8) — pass the {what} YAML file") from None
    except yaml.YAMLError as e:
        raise WanrenderError(f"{path}: not valid YAML ({str(e).splitlines()[0]}) — fix the file") from None


def load_profile(path: Path) -> Profile:
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


def profile_spec(spec: str) -> str:
    """``--profile`` as given, with the keywords in any case (``AUTO``, `` off``); anything
    else is a file name, kept as it is."""
    word = spec.strip().lower()
    return word if word in ("auto", "off") else spec


def resolve_profile(spec: str, device_name: str) -> Profile | None:
    """The profile ``spec`` names for a device called ``device_name``: ``auto`` (the first
    profile matching it, user profiles first), ``off`` (none), or a profile file (an
    unreadable or malformed file is a one-line ``WanrenderError``)."""
    spec = profile_spec(spec)
    if spec == "off":
        return None
    return find_profile(device_name) if spec == "auto" else load_profile(Path(spec))


def choose_profile(
    spec: str, device_name: str, frames: int, width: int, height: int, explicit: set[str]
) -> ProfileChoice | None:
    """The one rule ``generate --profile``, ``plan`` and the service's workers share: the
    profile ``spec`` resolves to; the bucket nearest the request's size gives the knobs
    not in ``explicit``."""
    prof = resolve_profile(spec, device_name)
    return None if prof is None else choice_for(prof, frames, width, height, explicit)


def choice_for(prof: Profile, frames: int, width: int, height: int, explicit: set[str]) -> ProfileChoice:
    bucket = prof.bucket_for(frames, width, height)
    chosen = {k: v for k, v in bucket.knobs.items() if k in REQUEST_KNOBS and k not in explicit}
    return ProfileChoice(prof, bucket, chosen)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def apply_profile(req, spec: str, device: str | None, explicit: set[str]) -> tuple[object, str | None]:
    """``req`` with the profile's knobs for the knobs not in ``explicit``, and a line saying what happened.

    ``spec``: ``auto`` (match this device), ``off``, or a profile file. A profile's
    knobs that cannot run here are dropped under ``auto`` (the render falls back to
    its own defaults) and refused for an explicit file.
    """
    from wanrender.runtime.hardware import device_name

    spec = profile_spec(spec)
    if spec == "off":
        return req, None
    dev = device or default_device()
    prof = resolve_profile(spec, device_name(dev))
    if prof is None:
        return req, None
    return apply_resolved(req, prof, dev, explicit, strict=spec != "auto")


def apply_resolved(req, prof: Profile, device: str, explicit: set[str], strict: bool) -> tuple[object, str | None]:
    """``apply_profile`` with the profile already found (a worker resolves it once, at start).
    ``strict``: knobs that cannot run on ``device`` are an error (a file the user named)
    instead of a warning and the request as it was (a profile matched by name)."""
    r = req.render
    choice = choice_for(prof, r.frames, r.width, r.height, explicit)
    chosen = choice.chosen
    if chosen:
        trial = {k: chosen.get(k, getattr(req.knobs, k)) for k in REQUEST_KNOBS}
        try:
            _check_knobs(device, trial)
        except WanrenderError as e:
            if strict:
                raise WanrenderError(f"profile {prof.path} does not fit this device: {e}") from None
            log.warning("profile %s not applied: %s", prof.path, e)
            return req, f"profile {Path(prof.path).name} not applied ({e})"
    req = replace(req, knobs=replace(req.knobs, **chosen), extra={**req.extra, "profile": choice.record()})
    return req, choice.line()


def check_profile_fits(prof: Profile, device: str) -> None:
    """Every bucket's knobs can run on ``device``; a worker checks a profile file it was
    given once at start, so a job never fails on the profile alone."""
    defaults = RuntimeKnobs()  # a job sets none of these knobs: the profile fills them or the defaults stay
    for b in prof.buckets:
        knobs = {k: b.knobs.get(k, getattr(defaults, k)) for k in REQUEST_KNOBS}
        try:
            _check_knobs(device, knobs)
        except WanrenderError as e:
            raise WanrenderError(f"profile {prof.path} does not fit this device: {e}") from None


def _check_knobs(device: str, knobs: dict[str, str]) -> None:
    from wanrender.runtime.plan import make_plan

    make_plan(device, knobs["precision"], knobs["attention"], knobs["compile"])
