"""Write-then-rename helpers: an output never carries its final name half-written;
and the checks that an output name can be written at all, made before any work."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from wanrender.errors import WanrenderError, check_utf8, shown

NAME_MAX = 255  # bytes per path component on Linux filesystems (ext4, xfs, btrfs, tmpfs)


def temp_sibling(path: str | os.PathLike) -> Path:
    """The name ``atomic_path`` writes under before renaming onto ``path``."""
    final = Path(path)
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_target(out: Path, derived: Iterable[str] = ()) -> None:
    """Refuse, before any work, a file name that could not be written: not UTF-8, a
    folder, a folder that cannot be made or written, or a name (or one of the
    ``derived`` sibling names written on the way: sidecar, temporary files) longer
    than the filesystem allows. Makes the output folder."""
    check_utf8(str(out), "the output name")
    limit = NAME_MAX
    too_long = [n for n in out.parts if len(os.fsencode(n)) > limit]  # before any stat, which would fail on it
    if too_long:
        raise WanrenderError(
            f"{shown(too_long[0][:40])}…: a name of {len(os.fsencode(too_long[0]))} bytes is longer than the "
            f"filesystem allows ({limit}) — use a shorter name"
        )
    if out.is_dir():
        raise WanrenderError(f"{shown(out)}: is a folder — give a file name (e.g. video.mp4)")
    try:  # the folder is made now, so a name that cannot be written fails before the work
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WanrenderError(
            f"{shown(out.parent)}: cannot create the output folder ({e.strerror}) — choose another output"
        ) from None
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(out.parent, "PC_NAME_MAX")
    names = [out.name, *derived]
    longest = max(names, key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(longest)) > limit:
        spare = limit - (len(os.fsencode(longest)) - len(os.fsencode(out.name)))
        raise WanrenderError(
            f"{shown(out.name[:40])}…: the output name is too long for this filesystem — names written next to "
            f"it (sidecar, temporary files) add to it; use a name of at most {max(spare, 1)} bytes"
        )
    probe = temp_sibling(out)
    try:  # really writing tells more than permission bits (root, read-only mounts, ACLs)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    except OSError as e:
        raise WanrenderError(
            f"{shown(out.parent)}: not writable ({e.strerror}) — choose another output folder"
        ) from None
    probe.unlink(missing_ok=True)
