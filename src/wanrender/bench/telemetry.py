"""Telemetry while a case runs: a sampler thread in the sweep's parent process.

It samples the child from outside (``/proc/PID``) and the GPU through NVML, so
a case that crashes, hangs or is killed still leaves its timeline, and the
child's own timings are not disturbed by a Python thread competing for its GIL.
NVML (``pynvml``) is optional: without it, or without a GPU, only host CPU and
memory are recorded.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

HOST_FIELDS = ("t", "cpu_pct", "rss_mib")
GPU_FIELDS = ("gpu_util", "mem_util", "gpu_mem_mib", "temp_c", "power_w", "sm_mhz", "mem_mhz", "throttle", "energy_mj")
# NVML clock-event ("throttle") reason bits, from nvml.h.
THROTTLE_BITS = {
    0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks",
}  # fmt: skip
MAX_POINTS = 600  # a row keeps at most this many samples (peaks are taken before thinning)


def throttle_names(mask: int | None) -> list[str]:
    if not mask:
        return []
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def _proc_sample(pid: int) -> tuple[float | None, float | None, float | None]:
    """(cpu seconds, RSS bytes, peak RSS bytes) of ``pid``, Nones when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().rsplit(b")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / _clock_ticks()  # utime + stime
        rss = hwm = None
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        return cpu, rss, hwm
    except (OSError, ValueError, IndexError):
        return None, None, None


class _Nvml:
    """One GPU through NVML; every query may fail on its own (older GPUs, permissions)."""

    def __init__(self, index: int) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.h = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.total = pynvml.nvmlDeviceGetMemoryInfo(self.h).total

    def _q(self, fn, *args):
        try:
            return fn(self.h, *args)
        except self.nv.NVMLError:
            return None

    def sample(self) -> list:
        nv = self.nv
        util = self._q(nv.nvmlDeviceGetUtilizationRates)
        mem = self._q(nv.nvmlDeviceGetMemoryInfo)
        power = self._q(nv.nvmlDeviceGetPowerUsage)
        reasons_fn = (
            getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        return [
            util.gpu if util else None, util.memory if util else None,
            round(mem.used / 2**20, 1) if mem else None,
            self._q(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
            round(power / 1000, 2) if power is not None else None,
            self._q(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM), self._q(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM),
            self._q(reasons_fn), self._q(nv.nvmlDeviceGetTotalEnergyConsumption),
        ]  # fmt: skip

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass


def open_nvml(index: int) -> tuple[_Nvml | None, str | None]:
    """The GPU's NVML handle, or None and why not."""
    import importlib.util

    if importlib.util.find_spec("pynvml") is None:
        return None, "pynvml (nvidia-ml-py) not installed: no GPU telemetry"
    try:
        return _Nvml(index), None
    except Exception as e:  # NVMLError subclasses vary by driver; any failure means no NVML
        return None, f"NVML unavailable ({type(e).__name__}): no GPU telemetry"


@dataclass
class Sampler:
    """Samples ``pid`` (and GPU ``gpu_index`` when NVML works) every ``interval`` seconds."""

    pid: int
    gpu_index: int | None = None
    interval: float = 0.2
    t0: float = field(default_factory=time.time)
    samples: list[list] = field(default_factory=list)
    note: str | None = None
    peak_rss: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _nvml: _Nvml | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return HOST_FIELDS + (GPU_FIELDS if self._nvml is not None else ())

    @property
    def gpu_total_bytes(self) -> int | None:
        return self._nvml.total if self._nvml is not None else None

    def start(self) -> Sampler:
        if self.gpu_index is not None:
            self._nvml, self.note = open_nvml(self.gpu_index)
        self._thread = threading.Thread(target=self._run, name="wanrender-telemetry", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last_cpu, last_t = None, None
        while True:
            now = time.time()
            cpu, rss, hwm = _proc_sample(self.pid)
            pct = None
            if cpu is not None and last_cpu is not None and now > last_t:
                pct = round(100.0 * (cpu - last_cpu) / (now - last_t), 1)
            if cpu is not None:
                last_cpu, last_t = cpu, now
            if hwm is not None:
                self.peak_rss = max(self.peak_rss or 0, hwm)
            row = [round(now - self.t0, 3), pct, round(rss / 2**20, 1) if rss else None]
            if self._nvml is not None:
                row += self._nvml.sample()
            self.samples.append(row)
            if self._stop.wait(self.interval):
                break

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            self._nvml.close()

    def column(self, name: str) -> list:
        i = self.fields.index(name)
        return [s[i] for s in self.samples]

    def summary(self, windows: list[tuple[float, float]]) -> dict:
        """Peaks over the case and over the timed windows (the case's peaks include model
        loading, which for random weights builds bf16 first); energy (J) per timed window
        (absolute times)."""
        out: dict = {"fields": list(self.fields), "interval_s": self.interval, "note": self.note,
                     "samples_taken": len(self.samples)}  # fmt: skip
        if not self.samples:
            return out
        ts = self.column("t")
        in_window = [any(a - self.t0 <= t <= b - self.t0 for a, b in windows) for t in ts]
        out["rss_timed_peak_bytes"] = peak_mib(self.column("rss_mib"), in_window)
        if self._nvml is None:
            return out
        used = self.column("gpu_mem_mib")
        out["nvml_used_peak_bytes"] = peak_mib(used, [True] * len(used))
        out["nvml_used_timed_peak_bytes"] = peak_mib(used, in_window)
        reasons: set[str] = set()
        for m, inside in zip(self.column("throttle"), in_window):
            if inside:
                reasons |= set(throttle_names(m)) - {"gpu_idle"}
        out["throttle_reasons"] = sorted(reasons)
        temps = [v for v, inside in zip(self.column("temp_c"), in_window) if inside and v is not None]
        out["temp_max_c"] = max(temps) if temps else None
        out["energy_j"] = [energy(ts, self.column("power_w"), self.column("energy_mj"), a - self.t0, b - self.t0)
                           for a, b in windows]  # fmt: skip
        return out

    def thinned(self) -> list[list]:
        step = max(1, -(-len(self.samples) // MAX_POINTS))
        return self.samples[::step]


def peak_mib(values: list, keep: list[bool]) -> int | None:
    """The largest of the kept MiB readings, in bytes (None: no reading kept)."""
    vals = [v for v, k in zip(values, keep) if k and v is not None]
    return int(max(vals) * 2**20) if vals else None


def _interp(ts: list[float], ys: list, t: float) -> float | None:
    pts = [(a, b) for a, b in zip(ts, ys) if b is not None]
    if not pts:
        return None
    if t <= pts[0][0]:
        return pts[0][1]
    for (t0, y0), (t1, y1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return y0 + (y1 - y0) * (t - t0) / (t1 - t0) if t1 > t0 else y1
    return pts[-1][1]


def energy(ts: list[float], power_w: list, energy_mj: list, a: float, b: float) -> float | None:
    """Joules between times a and b: the GPU's energy counter when it has one (Volta+),
    else the trapezoid integral of sampled power."""
    if b <= a:
        return None
    if any(v is not None for v in energy_mj):
        ea, eb = _interp(ts, energy_mj, a), _interp(ts, energy_mj, b)
        if ea is not None and eb is not None and eb >= ea:
            return round((eb - ea) / 1000.0, 2)
    pts = [(a, _interp(ts, power_w, a))] + [(t, p) for t, p in zip(ts, power_w) if a < t < b and p is not None]
    pts.append((b, _interp(ts, power_w, b)))
    if any(p is None for _, p in pts):
        return None
    return round(sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:])), 2)
