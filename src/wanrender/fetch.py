"""``wanrender models fetch``: download the standard file set, only when asked.

Order of work, so that nothing is downloaded twice and nothing fails late:

1. the folder must be writable (checked by writing to it, before any network use);
2. the hub's size and SHA-256 (its LFS etag) of every file are read;
3. a file already in the folder is skipped when the manifest (``.wanrender-fetch.json``,
   next to the files) records that exact size and modification time with the hub's
   hash: it was verified by an earlier run and has not changed since, so 37 GB are
   not hashed again. A file without a record (copied in by hand, fetched by an old
   version) is hashed once and recorded when it matches;
4. the free space must hold what is left to download;
5. each download goes into ``DIR/.download/NAME.HASH.part`` (kept after a failure or
   Ctrl-C; the next run asks for the rest with an HTTP range request), its SHA-256
   is checked, and only then is it renamed to its final name and recorded.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.paths import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str  # path inside the repository
    dest: str  # name under the target folder
    approx_gb: float
    role: str


COMFY_22 = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
COMFY_21 = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"

STANDARD_SET: tuple[RemoteFile, ...] = (
    RemoteFile(COMFY_22, "split_files/diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
               "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", 14.3, "high-noise expert"),
    RemoteFile(COMFY_22, "split_files/diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
               "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", 14.3, "low-noise expert"),
    RemoteFile(COMFY_22, "split_files/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
               "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors", 0.6, "4-step LoRA (high)"),
    RemoteFile(COMFY_22, "split_files/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
               "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", 0.6, "4-step LoRA (low)"),
    RemoteFile(COMFY_21, "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
               "umt5_xxl_fp8_e4m3fn_scaled.safetensors", 6.7, "text encoder"),
    RemoteFile(COMFY_21, "split_files/vae/wan_2.1_vae.safetensors", "wan_2.1_vae.safetensors", 0.25, "VAE"),
    RemoteFile("google/umt5-xxl", "spiece.model", "umt5-xxl-tokenizer/spiece.model", 0.005, "tokenizer"),
)  # fmt: skip

MANIFEST = ".wanrender-fetch.json"
CACHE = ".download"
_NETWORK = "check the network and retry; finished files are kept and partial ones resume"


@dataclass(frozen=True)
class Remote:
    """What the hub says about one file (None: not published)."""

    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class Hub:
    """Where files come from. The default is huggingface_hub, which honours ``HF_ENDPOINT``
    (the tests point it at a local HTTP server that speaks the hub's resolve protocol)."""

    meta: Callable[[RemoteFile], Remote]
    download: Callable[[RemoteFile, Path, Remote], Path]  # (file, cache folder, its metadata) -> the downloaded path


def _hf_meta(f: RemoteFile) -> Remote:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        meta = get_hf_file_metadata(hf_hub_url(f.repo, f.path))
    except Exception as e:  # network, auth, missing file: one line for the user
        raise WanrenderError(f"cannot reach {f.repo}/{f.path} ({_one_line(e)}) — {_NETWORK}") from None
    etag = (meta.etag or "").strip('"')
    return Remote(meta.size, etag if len(etag) == 64 else None)


def _hf_download(f: RemoteFile, cache: Path, remote: Remote) -> Path:
    """Append to ``cache/DEST.part`` from where an earlier run stopped (an HTTP range request).

    Not ``hf_hub_download``: it deletes its partial file when a download fails, so a
    dropped connection would start a 14 GB expert over. Its ``http_get`` does the
    ranged GET, the retries within one run and the size check."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    # Named by the expected hash: a partial file of an older version is never continued.
    part = cache / f"{f.dest}.{(remote.sha256 or 'unverified')[:16]}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    if remote.size is not None and part.is_file() and part.stat().st_size > remote.size:
        part.unlink()  # longer than the file: not a prefix of it
    try:
        with open(part, "ab") as fh:
            done = fh.tell()
            if done:
                log.info("%s: resuming after %d bytes", f.dest, done)
            http_get(hf_hub_url(f.repo, f.path), fh, resume_size=done, headers=build_hf_headers(),
                     expected_size=remote.size, displayed_filename=f.dest)  # fmt: skip
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise  # the disk, not the network: fetch() says so
        raise WanrenderError(f"download of {f.repo}/{f.path} failed ({_one_line(e)}) — {_NETWORK}") from None
    except Exception as e:
        raise WanrenderError(f"download of {f.repo}/{f.path} failed ({_one_line(e)}) — {_NETWORK}") from None
    return part


def _one_line(e: BaseException) -> str:
    """The hub's errors run over several lines (request ids, hints): the first 200 characters, flattened."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}"


def huggingface() -> Hub:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise WanrenderError("downloading needs huggingface_hub — run: pip install huggingface_hub") from None
    return Hub(_hf_meta, _hf_download)


def check_writable(dest: Path, fix: str = "choose a writable --dir") -> None:
    """Create ``dest`` and write a scratch file in it; say so in one line if either fails
    (a test write, not ``os.access``: root passes that check on a read-only mount)."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wanrender-write-test-", dir=dest)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = (e.strerror or type(e).__name__).lower()
        raise WanrenderError(f"cannot write to {dest}: {why} — {fix}") from None


def _read_manifest(dest: Path) -> dict[str, dict]:
    try:
        doc = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
        files = doc["files"]
        return {k: v for k, v in files.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}  # our own record, not the user's data: unreadable means hash again


def _write_manifest(dest: Path, records: dict[str, dict]) -> None:
    from wanrender.media.atomic import atomic_write_text

    atomic_write_text(dest / MANIFEST, json.dumps({"version": 1, "files": records}, indent=1, sort_keys=True))


def _record(path: Path, sha256: str, f: RemoteFile) -> dict:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "source": f"{f.repo}/{f.path}"}


def _unchanged(path: Path, rec: dict | None) -> bool:
    """The file is as an earlier run verified it (same size and modification time)."""
    if rec is None or not path.is_file():
        return False
    st = path.stat()
    return rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns


def _matches(rec: dict, remote: Remote) -> bool:
    return (remote.sha256 is None or rec.get("sha256") == remote.sha256) and (
        remote.size is None or rec.get("size") == remote.size
    )


def fetch(
    dest: Path,
    files: tuple[RemoteFile, ...] = STANDARD_SET,
    hub: Hub | None = None,
    progress: Callable[[RemoteFile, str], None] | None = None,
) -> list[Path]:
    """Download ``files`` into ``dest``; complete, verified files are skipped, partial ones resume."""
    say = progress or (lambda f, state: None)
    check_writable(dest)
    hub = hub or huggingface()
    records = _read_manifest(dest)
    todo: list[tuple[RemoteFile, Remote]] = []
    for f in files:
        final, rec = dest / f.dest, records.get(f.dest)
        try:
            remote = hub.meta(f)
        except WanrenderError:
            if _unchanged(final, rec):  # offline, but verified earlier and untouched since
                say(f, "already complete, skipped (not re-checked: the hub is unreachable)")
                continue
            raise
        if _unchanged(final, rec) and _matches(rec, remote):
            say(f, "already complete, skipped")
            continue
        if final.is_file() and remote.sha256 and final.stat().st_size == remote.size:
            say(f, "checking the file already there (once) ...")
            rec = _record(final, sha256_file(final), f)
            if _matches(rec, remote):
                records[f.dest] = rec
                _write_manifest(dest, records)
                say(f, "already complete (checksum matches), skipped")
                continue
        todo.append((f, remote))
    need = sum(r.size if r.size is not None else int(f.approx_gb * 1e9) for f, r in todo)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise WanrenderError(
            f"{dest}: {len(todo)} file(s) to download need {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free — "
            "free space or choose another --dir"
        )
    cache = dest / CACHE
    for f, remote in todo:
        say(f, f"downloading ({(remote.size or f.approx_gb * 1e9) / 1e9:.2f} GB) ...")
        try:
            _download_one(dest, cache, f, remote, hub, records)
        except OSError as e:  # the disk filled up or the folder changed under us (a download error is already one line)
            why = (e.strerror or type(e).__name__).lower()
            raise WanrenderError(
                f"{dest}: {why} while saving {f.dest} — free space or fix the folder and run again; "
                "finished files are kept and the partial one resumes"
            ) from None
        say(f, "verified" if remote.sha256 else "done (no checksum published)")
    shutil.rmtree(cache, ignore_errors=True)
    return [dest / f.dest for f in files]


def _download_one(dest: Path, cache: Path, f: RemoteFile, remote: Remote, hub: Hub, records: dict[str, dict]) -> None:
    """Download, verify, then rename into place and record: the final name only ever holds a verified file."""
    local = hub.download(f, cache, remote)
    got = sha256_file(local)
    if (remote.sha256 and got != remote.sha256) or (remote.size is not None and local.stat().st_size != remote.size):
        local.unlink(missing_ok=True)
        want = (remote.sha256 or "?")[:12]
        raise WanrenderError(
            f"{f.dest}: checksum mismatch (got {got[:12]}…, expected {want}…) — the download was damaged; "
            "run the command again"
        )
    final = dest / f.dest
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, final)
    records[f.dest] = _record(final, got, f)
    _write_manifest(dest, records)  # after each file: an interrupted run keeps what it verified
