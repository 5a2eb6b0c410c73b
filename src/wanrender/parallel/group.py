"""A long-lived group of ranks that renders job after job together: the service's
``wanrender worker --parallel N`` (one worker, N GPUs per video).

``launch`` starts N processes. Rank 0 is the worker itself (NATS, leases, storage,
publishing: the service code, started by the CLI) with a :class:`GroupRunner` in place
of its ``Runner``; ranks 1..N-1 run :func:`follow`. Every rank keeps a ``Runner`` with
``Ranks`` (models loaded once, sequence-parallel DiT, split decode) for the group's
lifetime.

- **Commands** go from rank 0 to the others through a queue each (``multiprocessing``), not
  through a collective: an idle worker may wait hours for its next job, longer than a
  process group's timeout allows a collective to wait.
- **A job** is checked by rank 0 first (``Runner.prepare``: the job's own errors fail the
  job and never reach the others); then every rank renders it; only rank 0 encodes and
  hands the result to the worker. Every rank plans the job against the GPU as rank 0
  sees it (sent with the job; ``--vram``'s emulated card where given): ranks that
  measured their own free memory could choose different plans, or one could refuse.
- **Stopping a render** (cancel, a newer attempt, shutdown) is decided on rank 0 by the
  worker's progress callback. Raised there alone, it would leave the others waiting in
  the next collective, so the request is kept (``Gate.pending``) and every rank reads
  it before each DiT forward (``Gate``, a one-element broadcast): all leave together
  with :class:`GroupStopped`, and rank 0 raises the worker's own exception. A request
  made after the last forward drops the finished result.
- **A failure** after the ranks were told (an error on any rank, a rank that dies)
  means the ranks may no longer be in step: the rank reports its reason to the
  launcher (``launch.report``) and exits, ``launch`` stops the others, and the worker
  process ends with that one line, exit 2 (a supervisor such as systemd or Docker's
  restart policy starts it again; the job's lease lapses and another attempt renders
  it). serve does not start such workers itself.
"""

from __future__ import annotations

import logging
import os
import queue
from typing import Any

import torch
import torch.distributed as dist

from wanrender.parallel.launch import World, report
from wanrender.parallel.render import Ranks

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often an idle follower checks that its group still exists
BROKEN_EXIT = 3


class GroupStopped(BaseException):
    """Every rank leaves the render at the same DiT forward (a BaseException, like the
    worker's own stop, so that no ``except Exception`` on the way swallows it)."""


class Gate:
    """Read by every rank before each forward: rank 0's ``pending`` stop, broadcast."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: BaseException | None = None

    def __call__(self) -> None:
        flag = torch.tensor([0 if self.pending is None else 1], dtype=torch.int32, device=self.device)
        dist.broadcast(flag, src=0)
        if flag.item():
            raise GroupStopped


def group_ranks(world: World) -> tuple[Ranks, Gate]:
    gate = Gate(world.device)
    return Ranks(world, gate=gate), gate


class GroupRunner:
    """Rank 0's ``Runner`` as the worker uses it: ``render`` tells the other ranks, then
    renders as rank 0; everything else is the rank's own ``Runner``."""

    def __init__(self, world: World, commands: list, gpu=None) -> None:
        """``gpu``: the card to plan for (``runtime.gpus.GPUSpec``: ``--vram``'s emulated
        one), None: this GPU as each job finds it."""
        from wanrender.runner import Runner

        self.world = world
        self.commands = commands  # one queue per other rank, in rank order
        self.ranks, self.gate = group_ranks(world)
        self.emulated = gpu
        self.runner = Runner(world.device, step_down=False, parallel=self.ranks)

    def __getattr__(self, name: str) -> Any:  # engine, prepare, _hashes, ...: the rank's own Runner
        return getattr(self.runner, name)

    def render(self, req, files=None, progress=None, write: bool = True, swap_experts: bool = False,
               encode: bool = False):  # fmt: skip
        # The plan's card for every rank: rank 0's view of its GPU now (or the emulated one).
        self.runner.gpu = self.emulated if self.emulated is not None else self.runner._live_gpu()
        self.runner.prepare(req, files)  # the job's own errors: raised here, before anyone else is told
        self.gate.pending = None
        for q in self.commands:
            q.put(("render", req, files, swap_experts, self.runner.gpu))

        def relay(stage: str, step: int | None, total: int | None, detail: str) -> None:
            if progress is None or self.gate.pending is not None:
                return
            try:
                progress(stage, step, total, detail)
            except BaseException as e:  # noqa: BLE001 - kept, and raised by every rank at the next forward
                self.gate.pending = e

        try:
            result = self.runner.render(req, files, relay, write, swap_experts, encode)
        except GroupStopped:
            raise self.gate.pending from None
        except BaseException as e:  # noqa: BLE001 - the ranks may be out of step: the group ends
            broken(self.world, e)
        if self.gate.pending is not None:  # asked to stop after the last forward
            encoder = getattr(result, "encoder", None)
            if encoder is not None:
                encoder.abort()
            raise self.gate.pending
        return result

    def stop_group(self) -> None:
        """The other ranks end (the worker stopped)."""
        for q in self.commands:
            q.put(("stop",))


def broken(world: World, err: BaseException) -> None:
    """A rank failed after the group was told to render: end this process, so that
    ``launch`` stops the others (they may be waiting in a collective for it)."""
    what = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    log.error("rank %d of %d: %s: %s — the GPU group stops (the worker ends; its job goes to another attempt)",
              world.rank, world.size, type(err).__name__, what)  # fmt: skip
    report(err)
    logging.shutdown()
    os._exit(BROKEN_EXIT)


def follow(world: World, commands, launcher: int) -> None:
    """Ranks 1..N-1: render what rank 0 says, until it says stop (or ``launcher``, the
    worker's process, is gone)."""
    import signal

    from wanrender.runner import Runner

    # Stopping is rank 0's to decide (a signal here would leave it alone in a collective);
    # launch kills a follower that outlives a failed rank 0, and so does the kernel when
    # the launcher dies.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_launcher()
    ranks, _ = group_ranks(world)
    runner = Runner(world.device, step_down=False, parallel=ranks)
    while True:
        try:
            command = commands.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != launcher:  # the worker process is gone: nobody will say stop
                return
            continue
        if command[0] == "stop":
            return
        _, req, files, swap_experts, runner.gpu = command
        try:
            runner.render(req, files, None, write=False, swap_experts=swap_experts)
        except GroupStopped:
            continue
        except BaseException as e:  # noqa: BLE001 - rank 0 waits for this rank in a collective
            broken(world, e)


def _die_with_launcher() -> None:
    """SIGKILL, not the SIGTERM that launch asks for: a follower ignores SIGTERM."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
