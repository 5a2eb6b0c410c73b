"""Carrying out a ``MemoryPlan`` for an ``Engine``: which model sits on the GPU when.

The engine calls four hooks: ``stage(name)`` around text encode, VAE encode,
sampling and VAE decode; ``after_step`` after each sampling step; ``switch`` between
the two passes. Resident plans change nothing but the optional sequence chunking.
Swap and stream plans keep the experts on the host (mmap views of the files, LoRAs
unmerged) and install the active one — all of it (swap) or its first N blocks plus
two streaming slots (stream) — at the start of each pass; before the VAE decode the
active expert is dropped (its host copy stays, nothing is copied back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from wanrender.runtime.planner import MemoryPlan
from wanrender.runtime.streaming import BlockStreamer, Placement
from wanrender.spec import Stage

log = logging.getLogger(__name__)


def load_devices(plan: MemoryPlan | None, device: torch.device) -> tuple[torch.device, torch.device, str]:
    """(where the experts load, where the text encoder loads, LoRA mode) for a plan."""
    if plan is None:
        return device, device, "merge"
    experts = device if plan.experts == "resident" else torch.device("cpu")
    te = device if plan.text_encoder == "resident" else torch.device("cpu")
    # A merged LoRA would turn the experts' file-backed pages into anonymous host
    # memory (and merging 14 B weights on the CPU is slow): keep it unmerged there.
    return experts, te, "merge" if plan.experts == "resident" else "unmerged"


class MemoryRuntime:
    def __init__(self, high, low, text_encoder, device: torch.device, plan: MemoryPlan) -> None:
        self.high, self.low, self.text_encoder = high, low, text_encoder
        self.device, self.plan = torch.device(device), plan
        self.active: tuple[str, BlockStreamer] | None = None
        self.installs = 0
        self.copies = 0
        self.pinned_peak = 0
        self.prefetched = False
        self._thread: threading.Thread | None = None
        self._ready: BlockStreamer | None = None
        self._error: BaseException | None = None
        self._chunkers: list[BlockStreamer] = []
        if plan.experts == "resident" and plan.chunks > 1:
            self._chunkers = [BlockStreamer(m, self.device, len(m.blocks), chunks=plan.chunks) for m in (high, low)]

    # --- placing experts
    def _install(self, name: str) -> BlockStreamer:
        model = self.high if name == "high" else self.low
        n = len(model.blocks) if self.plan.experts == "swap" else (self.plan.resident_blocks or 0)
        streamer = BlockStreamer(model, self.device, n, chunks=self.plan.chunks)
        self.installs += 1
        self.pinned_peak = max(self.pinned_peak, streamer.pinned_bytes)
        return streamer

    def _drop(self) -> None:
        if self.active is not None:
            self.copies += self.active[1].copies
            self.active[1].uninstall()
            self.active = None

    def _activate(self, name: str) -> None:
        if self.active is not None and self.active[0] == name:
            return
        self._drop()
        self.active = (name, self._install(name))

    # --- hooks
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.plan.experts == "resident" and self.plan.text_encoder != "release":
            yield
            return
        if name == Stage.TEXT_ENCODE and self.plan.text_encoder == "release":
            placed = Placement(self.text_encoder, self.device)
            try:
                yield
            finally:
                placed.restore()
            return
        if name == Stage.VAE_DECODE:
            self._join_prefetch()
            self._drop()  # the decode gets the experts' memory; host copies stay
        yield

    def after_step(self, stage: str, i: int, n: int) -> None:
        """Prefetch the low expert when the last high step starts (plans that allow it;
        with a single high step there is nothing to overlap)."""
        if stage == Stage.PASS1_HIGH and self.plan.prefetch and i + 2 == n:
            self._start_prefetch()

    def begin_sampling(self) -> float:
        """Install the high expert (swap/stream); returns the seconds it took."""
        t0 = time.perf_counter()
        if self.plan.experts != "resident":
            self._activate("high")
            self._sync()
        return time.perf_counter() - t0

    def switch(self) -> float:
        """High expert out, low expert in (prefetched when the plan allows); seconds taken."""
        t0 = time.perf_counter()
        if self.plan.experts != "resident":
            self._join_prefetch()
            if self._ready is not None:
                self._drop()
                self.active, self._ready = ("low", self._ready), None
                self.prefetched = True
            else:
                self._activate("low")
            self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start_prefetch(self) -> None:
        if self._thread is not None or self.device.type != "cuda":
            return
        side = torch.cuda.Stream(self.device)

        def run() -> None:
            try:
                with torch.cuda.stream(side):
                    self._ready = self._install("low")
                side.synchronize()
            except BaseException as e:  # re-raised on the main thread at the switch
                self._error = e

        self._thread = threading.Thread(target=run, name="wanrender-prefetch", daemon=True)
        self._thread.start()

    def _join_prefetch(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def release(self) -> None:
        """Drop everything this runtime put on the device (before a step-down)."""
        try:
            self._join_prefetch()
        finally:
            if self._ready is not None:
                self._ready.uninstall()
                self._ready = None
            self._drop()
            for c in self._chunkers:
                c.uninstall()
            self._chunkers = []

    def report(self) -> dict:
        live = self.active[1].copies if self.active is not None else 0
        return {
            "plan": self.plan.to_json(), "describe": self.plan.describe(), "expert_installs": self.installs,
            "streamed_block_copies": self.copies + live, "pinned_bytes": self.pinned_peak,
            "prefetched_low_expert": self.prefetched,
        }  # fmt: skip
