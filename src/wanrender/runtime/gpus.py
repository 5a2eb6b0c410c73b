"""What the planner knows about a GPU and the host: named specs, live probing, RSS.

A ``GPUSpec`` carries memory, compute capability and the throughput figures the
time model scales by. Figures are of three kinds, and each spec says which:

- **measured**: the H200 figures of docs/benchmarks.md (SDPA-cuDNN attention at
  Wan's shape, bf16/fp8 GEMM ceilings, pinned host-to-device copy);
- **datasheet**: the vendor's dense (no sparsity) tensor TFLOP/s and memory
  bandwidth; usable VRAM is what ``torch.cuda.get_device_properties`` typically
  reports for the card;
- **estimate**: effective attention throughput and host-link bandwidth on GPUs we
  have not measured (public FlashAttention-2 numbers, PCIe generation), and the
  RTX 5090's attention rate, chosen to agree with the seed user's ComfyUI timing
  (17.4 s/step at 61 frames 832x1216, no offloading).

``probe`` reads a live GPU (total and free memory, capability, a measured pinned
copy); its throughput figures come from the named spec whose name it matches.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from wanrender.errors import WanrenderError

GIB = 1 << 30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    total_gib: float  # usable device memory
    capability: tuple[int, int]
    bf16_tflops: float  # dense tensor TFLOP/s, datasheet
    fp8_tflops: float | None  # dense, datasheet; None: no fp8 matmul
    attention_tflops: float  # effective SDPA/flash rate at Wan's shapes
    mem_bw_gbs: float  # device memory bandwidth, datasheet
    h2d_gbs: float  # pinned host -> device copy
    link: str  # host link, for the report
    free_gib: float | None = None  # live probe only: free now (other processes and our context excluded)
    measured: tuple[str, ...] = ()  # which fields were measured (the rest: datasheet or estimate)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def fp8_matmul(self) -> bool:
        return self.fp8_tflops is not None and self.capability >= (8, 9)

    def label(self) -> str:
        free = f", {self.free_gib:.1f} GiB free" if self.free_gib is not None else ""
        return f"{self.name} ({self.total_gib:.1f} GiB{free}, {self.link})"

    def with_vram(self, gib: float) -> GPUSpec:
        return replace(self, name=f"{self.name} @ {gib:g} GiB", total_gib=gib, free_gib=None)


# Dense tensor TFLOP/s and bandwidth are datasheet figures; attention_tflops and
# h2d_gbs are estimates except on the H200, where docs/benchmarks.md measured them
# (attention 574 TFLOP/s = 4*L^2*5120 / 245.9 ms at L = 82,992; pinned copy 55 GB/s).
NAMED: dict[str, GPUSpec] = {
    "rtx4090": GPUSpec("RTX 4090", 23.6, (8, 9), 165.2, 330.3, 150.0, 1008.0, 25.0, "PCIe 4.0 x16"),
    "rtx5090": GPUSpec("RTX 5090", 31.4, (12, 0), 419.0, 838.0, 300.0, 1792.0, 50.0, "PCIe 5.0 x16"),
    "a100-40g": GPUSpec("A100 40GB", 39.4, (8, 0), 312.0, None, 200.0, 1555.0, 25.0, "PCIe 4.0 x16"),
    "a100-80g": GPUSpec("A100 80GB", 79.1, (8, 0), 312.0, None, 200.0, 2039.0, 25.0, "PCIe 4.0 x16"),
    "h100": GPUSpec("H100 80GB", 79.1, (9, 0), 989.0, 1979.0, 560.0, 3350.0, 50.0, "PCIe 5.0 x16"),
    "h200": GPUSpec("H200", 139.8, (9, 0), 989.0, 1979.0, 574.0, 4800.0, 55.0, "PCIe 5.0 x16",
                    measured=("attention_tflops", "h2d_gbs")),
}  # fmt: skip

# How a device name reported by the driver maps onto a named spec.
_NAME_PATTERNS = (
    (r"4090", "rtx4090"),
    (r"5090", "rtx5090"),
    (r"a100.*80", "a100-80g"),
    (r"a100", "a100-40g"),
    (r"h100", "h100"),
    (r"h200", "h200"),
    (r"gh200", "h200"),
)


def named(name: str) -> GPUSpec:
    key = name.strip().lower().replace("_", "-").replace(" ", "")
    key = {"4090": "rtx4090", "5090": "rtx5090", "a100": "a100-80g", "a10080g": "a100-80g", "a10040g": "a100-40g"}.get(
        key, key
    )
    if key not in NAMED:
        raise WanrenderError(
            f"unknown GPU {name!r} — choose one of {', '.join(NAMED)} or give --vram, e.g. --vram 24GiB"
        )
    return NAMED[key]


def match_name(device_name: str) -> str | None:
    low = device_name.lower()
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, low):
            return key
    return None


def probe(device: str = "cuda", measure_copy: bool = True) -> GPUSpec:
    """The live GPU: memory now, capability, measured pinned copy; throughput from
    the matching named spec (or an estimate from the capability when unknown)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise WanrenderError(f"no CUDA GPU at {device} — plan for a named GPU with --gpu NAME or --vram SIZE")
    props = torch.cuda.get_device_properties(dev)
    free, total = torch.cuda.mem_get_info(dev)
    key = match_name(props.name)
    notes: list[str] = []
    if key is None:
        # Unknown card: borrow the figures of the same generation; memory is still read live.
        base = (
            NAMED["h100"]
            if props.major >= 9
            else NAMED["rtx4090"]
            if (props.major, props.minor) >= (8, 9)
            else NAMED["a100-40g"]
        )
        notes.append(f"{props.name} is not in the table: throughput borrowed from {base.name} (estimate)")
    else:
        base = NAMED[key]
    measured = list(base.measured)
    h2d = base.h2d_gbs
    if measure_copy:
        h2d = measure_h2d(dev)
        measured.append("h2d_gbs")
    return replace(
        base, name=props.name, total_gib=total / GIB, free_gib=free / GIB, capability=(props.major, props.minor),
        h2d_gbs=h2d, measured=tuple(dict.fromkeys(measured)), notes=tuple(notes),
    )  # fmt: skip


def measure_h2d(device, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Pinned host -> device copy rate in GB/s (best of ``repeats``; ~20 ms in all)."""
    import time

    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy pays for lazy initialisation
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def host_ram_gib() -> tuple[float, float | None]:
    """(total, available) host RAM in GiB; available is None where it cannot be read."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return total, None


def process_seconds() -> float | None:
    """Seconds since this process started (Linux, from /proc, 10 ms steps), or None
    where that cannot be read: a one-video process's time before its load and after
    its render, which no stage timer sees (interpreter start, imports, CUDA's context)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (file-backed mmap pages included)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
