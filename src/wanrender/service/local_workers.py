"""The local workers of ``serve``: which devices they run on (``--gpus``, ``--device``,
``--workers``; ``worker --gpu``), and the supervision of those that run as child
processes (their output forwarded with a prefix, an unexpected exit reported and
restarted with a backoff, all of them stopped with serve)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass

from wanrender.errors import WanrenderError
from wanrender.service.broker import die_with_parent

MAX_CPU_WORKERS = 64  # each loads its own copy of the models: more is a typo, not a plan
PARENT_ENV = "WANRENDER_DIE_WITH"  # serve's pid, given to the child workers it starts


def follow_parent() -> None:
    """In a child worker that serve started (``PARENT_ENV`` set): ask the kernel for SIGTERM
    when serve ends, so no orphan keeps a GPU. The child asks itself, first thing, rather than
    through a ``preexec_fn``: serve has threads, and code run between fork and exec in a
    threaded process can deadlock. A serve that ended before the request is caught by the
    parent check."""
    want = os.environ.pop(PARENT_ENV, None)
    if not want:
        return
    arm = die_with_parent()
    if arm is not None:
        arm()
    if os.getppid() != int(want):
        raise WanrenderError(f"the serve process that started this worker (pid {want}) has ended — nothing to join")


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(text: str) -> tuple[int, ...] | None:
    """``all`` (None) or distinct GPU indices: ``0,1``. Syntax only: the count is checked by
    ``local_devices`` (so a malformed list is refused on any machine)."""
    if text.strip().lower() == "all":
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):  # an empty entry, a sign, a name: all malformed
        raise WanrenderError(f"--gpus {text!r} is invalid — use all, or GPU indices separated by commas, e.g. 0,1")
    indices = tuple(int(p) for p in parts)
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise WanrenderError(f"--gpus {text}: GPU {twice[0]} is listed twice — list each GPU once")
    return indices


def local_devices(gpus: str | None, device: str | None, workers: int | None, count: int) -> tuple[str, ...]:
    """The device of each local worker of ``serve`` on a machine with ``count`` CUDA GPUs.

    ``device`` is already a valid name (cpu, cuda, cuda:N; resolve_device checked it);
    ``gpus``/``workers`` are None when not given. One worker per GPU: two workers of the
    14B model on one card would not fit, so ``--workers`` beyond the GPUs is refused."""
    if workers is not None and not 0 <= workers <= MAX_CPU_WORKERS:
        raise WanrenderError(f"--workers {workers} is invalid — use 0 (the API alone) to {MAX_CPU_WORKERS}")
    listed = parse_gpus(gpus) if gpus is not None else None
    device = device.strip().lower() if device else None
    if gpus is not None:
        if device == "cpu":
            raise WanrenderError("--gpus and --device cpu disagree — drop --gpus for CPU workers, or --device cpu")
        if device not in (None, "cuda"):
            raise WanrenderError(f"--gpus and --device {device} both choose the GPUs — give only --gpus")
        if count == 0:
            raise WanrenderError(f"--gpus {gpus}: no CUDA GPU here — drop --gpus, or use --device cpu")
    if device == "cpu" or (device is None and count == 0):
        return ("cpu",) * (1 if workers is None else workers)
    if count == 0:
        raise WanrenderError(f"--device {device}: no CUDA GPU here — use --device cpu, or run on a GPU machine")
    if device is not None and device.startswith("cuda:"):
        chosen: tuple[int, ...] = (int(device.partition(":")[2]),)
    else:
        chosen = listed if listed is not None else tuple(range(count))
    outside = [i for i in chosen if i >= count]
    if outside:
        flag = f"--gpus {gpus}" if gpus is not None else f"--device {device}"
        raise WanrenderError(f"{flag}: GPU {outside[0]} does not exist, this machine has {count} CUDA GPU(s) — use "
                             f"0..{count - 1}")  # fmt: skip
    if workers is not None and workers > len(chosen):
        raise WanrenderError(f"--workers {workers}: more than the {len(chosen)} GPU(s) chosen (one worker per GPU) — "
                             f"use --workers {len(chosen)} or fewer, or choose more GPUs with --gpus")  # fmt: skip
    n = len(chosen) if workers is None else workers
    return tuple(f"cuda:{i}" for i in chosen[:n])


def worker_device(gpu: int | None, device: str | None, count: int) -> str | None:
    """``worker --gpu N``: the same as ``--device cuda:N``, refused when it cannot be."""
    if gpu is None:
        return device
    if gpu < 0:
        raise WanrenderError(f"--gpu {gpu} is invalid — use a GPU index: 0, 1, ...")
    if device is not None and device.strip().lower() not in ("cuda", f"cuda:{gpu}"):
        raise WanrenderError(f"--gpu {gpu} and --device {device} disagree — give only one")
    if count == 0:
        raise WanrenderError(f"--gpu {gpu}: no CUDA GPU here — drop --gpu, or use --device cpu")
    if gpu >= count:
        raise WanrenderError(f"--gpu {gpu}: this machine has {count} CUDA GPU(s) — use --gpu 0..{count - 1}")
    return f"cuda:{gpu}"


@dataclass(frozen=True)
class Restarts:
    """How a child that exits on its own is restarted: after ``backoff_s``, doubling up to
    ``max_backoff_s``; at most ``limit`` times in a row (a child that ran ``stable_s``
    starts the count again). Stopping: SIGTERM, then SIGKILL after ``grace_s`` (a
    worker hands its job back at the next step, which may take a while on a GPU)."""

    limit: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 120.0
    grace_s: float = 20.0


@dataclass(frozen=True)
class Child:
    label: str  # "worker 2 on cuda:1": the prefix of its output and the name in serve's reports
    argv: tuple[str, ...]


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


async def _forward(stream: asyncio.StreamReader, label: str, echo) -> None:
    """A child's output, line by line with its label; nothing is dropped (readline would
    discard a line longer than the reader's buffer: readuntil leaves it to be taken)."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:  # the end, perhaps with a last line unterminated
            if e.partial:
                echo(f"{label} | {e.partial.decode(errors='replace').rstrip()}")
            return
        except asyncio.LimitOverrunError as e:  # longer than the buffer: passed on in pieces
            line = await stream.readexactly(e.consumed)
        echo(f"{label} | {line.decode(errors='replace').rstrip()}")


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def supervise(child: Child, stop: asyncio.Event, announce, echo, policy: Restarts = Restarts(), env=None,
                    on_start=None) -> None:  # fmt: skip
    """Runs ``child`` until ``stop``, restarting it when it exits on its own; returns once it
    has stopped. Raises WanrenderError when it keeps exiting (``policy.limit`` restarts)."""
    restarts = 0
    env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}  # follow_parent reads it
    while not stop.is_set():
        began = time.monotonic()
        # Its own session: a Ctrl-C in serve's terminal reaches serve alone, which then stops
        # the children in order (SIGTERM, grace) instead of racing them.
        proc = await asyncio.create_subprocess_exec(
            *child.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, limit=1 << 20,
        )  # fmt: skip
        if on_start is not None:
            on_start(child, proc.pid)
        pump = asyncio.create_task(_forward(proc.stdout, child.label, echo))
        stopping = asyncio.create_task(stop.wait())
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait([stopping, exited], return_when=asyncio.FIRST_COMPLETED)
            if proc.returncode is None:
                await _terminate(proc, policy.grace_s)
        except BaseException:  # cancelled mid-way: the child must not outlive serve
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        finally:
            stopping.cancel()
            exited.cancel()
            with contextlib.suppress(asyncio.TimeoutError):  # its output ends with it
                await asyncio.wait_for(pump, 5.0)
        if stop.is_set():
            return
        if time.monotonic() - began >= policy.stable_s:
            restarts = 0
        what = f"{child.label} (pid {proc.pid}) exited unexpectedly ({_exit_text(proc.returncode)})"
        if restarts >= policy.limit:
            raise WanrenderError(f"{what}, {restarts + 1} times in a row — stopping serve; its output above says why")
        restarts += 1
        delay = min(policy.backoff_s * 2 ** (restarts - 1), policy.max_backoff_s)
        announce(f"{what} — restarting it in {delay:g} s (restart {restarts} of at most {policy.limit})")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
