"""How a service process shares the machine's CPU cores with its neighbours."""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


def share_cores() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless
    the environment already chose a policy. Call it before torch is imported: the OpenMP
    runtime reads the variable once, when it loads.

    Why: torch runs CPU ops on an OpenMP pool as wide as the machine, and by default its
    threads spin for a while after each parallel op, waiting for the next. A service
    process is never alone on its cores (the API, nats-server, other workers on the same
    host), and the spinning threads of one process take the cores the others need: on 2
    cores, two CPU workers rendered a 1-frame 64x64 demo job in 1.7 s each instead of 0.1 s,
    and the 200-job load test took 151 s instead of 17-22 s (tests/test_service_load.py).
    On a GPU worker the CPU pool is nearly idle, so the setting costs nothing there."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
