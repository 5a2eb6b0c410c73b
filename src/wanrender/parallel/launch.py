"""Start N local processes (one per GPU, or CPU processes with gloo) and run a function
in each, or join the processes torchrun started.

``launch(fn, n, device_type)`` calls ``fn(world, *args)`` on every rank and returns the
results in rank order. The processes it starts get a free loopback port and keep
NVLink multicast off (``NVLINK_OFF``: the lent machines need it, and NCCL reads it at
its first use, so it is set in each child before the process group exists; the
parent's environment is not changed). Backend: nccl on CUDA, gloo on the CPU.

Failures end as one line: a ``WanrenderError`` raised on a rank (bad input found after
the start, mismatched GPUs) is re-raised as it is; a rank that dies (killed, a GPU
that drops out) or loses its peers becomes a ``WanrenderError`` naming the rank; the
others are stopped, never left waiting in a collective. A Python exception on a rank
is a bug: it comes back as a ``RuntimeError`` with the rank's traceback.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wanrender.errors import WanrenderError
from wanrender.parallel.ulysses import check_heads

NVLINK_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LOOPBACK = "127.0.0.1"
GRACE_S = 3.0  # after a rank fails, how long the others get to report their own reason
# This process's report channel when ``launch`` started it (see ``report``): (queue, rank).
_REPORTS: list = []


@dataclass(frozen=True)
class World:
    """This process's place: its rank, the number of ranks, its device."""

    rank: int
    size: int
    device: torch.device


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def check_world(n: int, heads: int | None, device_type: str) -> None:
    """Everything that can be checked before a process starts or a model loads
    (``heads``: the DiT's head count, which the rank count must divide)."""
    if device_type not in ("cpu", "cuda"):
        raise WanrenderError(f"device '{device_type}' cannot run several processes — use cuda (or cpu for tests)")
    if n < 1:
        raise WanrenderError(f"{n} GPUs asked — use 1 or more")
    if heads is not None:
        check_heads(n, heads)
    if under_torchrun():
        size, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if size != n:
            raise WanrenderError(f"torchrun started {size} processes but {n} GPUs were asked — make them the same")
        if local != size:
            raise WanrenderError(
                f"torchrun spans {size // max(local, 1)} hosts — sequence parallelism runs on one host"
            )
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if n > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            seen = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise WanrenderError(f"{n} GPUs asked but {count} present{seen} — ask for at most {count}")


def check_same_devices(descriptions: Sequence[str]) -> None:
    """One description per rank (name, compute capability, memory): all must match."""
    for rank, d in enumerate(descriptions):
        if d != descriptions[0]:
            raise WanrenderError(
                f"rank {rank} has a different GPU ({d}) than rank 0 ({descriptions[0]}) — sequence parallelism "
                "needs identical GPUs; choose them with CUDA_VISIBLE_DEVICES"
            )


def describe_gpu(index: int) -> str:
    p = torch.cuda.get_device_properties(index)
    return f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"


def init_group(device_type: str, rank: int, size: int, local_rank: int, timeout_s: float) -> World:
    """The default process group from MASTER_ADDR/PORT; checks that the GPUs match."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    if device_type == "cuda":
        found: list[Any] = [None] * size
        dist.all_gather_object(found, describe_gpu(local_rank))
        check_same_devices(found)
    return World(rank, size, device)


def free_port() -> int:
    # Another process may take it before the group binds it; the window is milliseconds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    n: int,
    device_type: str = "cpu",
    args: tuple = (),
    heads: int | None = None,
    timeout_s: float = 600.0,
) -> list[Any]:
    """``fn(world, *args)`` on ``n`` ranks; their results (picklable) in rank order.

    ``fn`` must be importable by name (spawned processes import it). ``heads``: the
    DiT's head count, checked before anything starts. Under torchrun this process is
    one of the ranks: it runs ``fn`` once and gathers everyone's results.
    """
    check_world(n, heads, device_type)
    if under_torchrun():
        return _join_torchrun(fn, n, device_type, args, timeout_s)
    return _spawn(fn, n, device_type, args, timeout_s)


def _join_torchrun(fn: Callable[..., Any], n: int, device_type: str, args: tuple, timeout_s: float) -> list[Any]:
    os.environ.update(NVLINK_OFF)  # before NCCL's first use; torchrun's children are ours to set up
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = init_group(device_type, rank, n, local, timeout_s)
    try:
        result = fn(world, *args)
        everyone: list[Any] = [None] * n
        dist.all_gather_object(everyone, result)
        return everyone
    finally:
        dist.destroy_process_group()


def _die_with_parent() -> None:
    """A child must not outlive a parent that was killed (it would hold the GPU)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def report(err: BaseException) -> None:
    """Tell the launcher why this rank is about to end, for a rank that ends itself
    (``os._exit``) instead of returning: its own error as the run's one line, a lost peer
    as an echo (the peer's own reason wins), anything else as a crash with its traceback."""
    if not _REPORTS:
        return
    queue, rank = _REPORTS[0]
    if isinstance(err, WanrenderError):
        queue.put(("error", rank, str(err)))
    elif _is_lost(err):
        queue.put(("lost", rank, str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__))
    else:
        queue.put(("crash", rank, "".join(traceback.format_exception(err))))


def _is_lost(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or "Connection closed by peer" in str(err)


def _child(rank: int, n: int, device_type: str, port: int, queue: Any, fn: Callable, args: tuple, timeout: float):
    _die_with_parent()
    _REPORTS.append((queue, rank))
    os.environ.update(NVLINK_OFF)
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))  # fmt: skip
    if device_type == "cpu":  # n processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    try:
        world = init_group(device_type, rank, n, rank, timeout)
        result = fn(world, *args)
        dist.destroy_process_group()
    except WanrenderError as err:
        queue.put(("error", rank, str(err)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        lost = _is_lost(err)
        queue.put(
            ("lost", rank, str(err).strip().splitlines()[-1][:300]) if lost else ("crash", rank, traceback.format_exc())
        )
        sys.exit(3 if lost else 1)
    queue.put(("ok", rank, pickle.dumps(result)))


def _spawn(fn: Callable[..., Any], n: int, device_type: str, args: tuple, timeout_s: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, n, device_type, port, queue, fn, args, timeout_s)) for r in range(n)]
    reports: dict[int, tuple[str, Any]] = {}
    stopped: set[int] = set()

    def drain() -> None:
        while not queue.empty():
            kind, rank, payload = queue.get()
            reports[rank] = (kind, payload)

    try:
        for p in procs:
            p.start()
        failed_at = None
        while any(p.is_alive() for p in procs):
            connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.2)
            drain()  # children block on a full pipe until it is read
            failing = any(p.exitcode not in (None, 0) for p in procs) or any(k != "ok" for k, _ in reports.values())
            if failing and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                break
    finally:
        started = [p for p in procs if p.pid is not None]  # a failed start leaves the rest unstarted
        for r, p in enumerate(procs):
            if p.pid is not None and p.is_alive():
                stopped.add(r)
                p.terminate()
        for p in started:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        drain()
    return _results(procs, reports, stopped, n, device_type)


def _results(procs: list, reports: dict[int, tuple[str, Any]], stopped: set[int], n: int, device_type: str) -> list:
    """The results in rank order, or the one reason the run failed (the first cause, not its echoes)."""
    by_kind: dict[str, list[int]] = {}
    for r in sorted(reports):
        by_kind.setdefault(reports[r][0], []).append(r)
    if "error" in by_kind:
        raise WanrenderError(reports[by_kind["error"][0]][1])
    unit = "GPU" if device_type == "cuda" else "process"
    died = [r for r, p in enumerate(procs) if r not in reports and r not in stopped and p.exitcode != 0]
    if died:
        r, code = died[0], procs[died[0]].exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise WanrenderError(
            f"rank {r} of {n} ({unit} {r}) stopped ({how}); the other ranks were stopped too — "
            "check that device (memory, nvidia-smi) and run again, or use fewer GPUs"
        )
    if "crash" in by_kind:
        r = by_kind["crash"][0]
        raise RuntimeError(f"rank {r} of {n} failed:\n{reports[r][1]}")
    if "lost" in by_kind:
        r = by_kind["lost"][0]
        raise WanrenderError(
            f"rank {r} of {n} lost contact with the others ({reports[r][1]}) — check the devices and run again"
        )
    if len(by_kind.get("ok", ())) != n:
        raise WanrenderError(f"{n - len(by_kind.get('ok', ()))} of {n} ranks stopped without a result — run again")
    return [pickle.loads(reports[r][1]) for r in range(n)]
