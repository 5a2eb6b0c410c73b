"""What this machine is called: the GPUs NVML lists, the CPU's model, and the device
name GPU profiles are matched against. Shared by the bench lab's environment snapshot
and by everything that applies a profile (generate, plan, the service's workers).

GPUs are listed through NVML when it is available, because asking torch would
create a CUDA context in the calling process — hundreds of MiB of VRAM that a
benchmark sweep's parent would otherwise hold while its children measure.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {"model": model, "logical_cores": os.cpu_count(), "usable_cores": usable, "arch": platform.machine()}


def nvml_gpus() -> tuple[list[dict], str | None] | None:
    """(GPUs, driver) from NVML, or None when NVML is not installed or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            g = {"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)), "memory_gib": round(mem.total / 2**30, 1)}
            try:
                g["capability"] = "%d.%d" % pynvml.nvmlDeviceGetCudaComputeCapability(h)
                g["power_limit_w"] = round(pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000, 1)
                g["max_sm_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
            except pynvml.NVMLError:  # older GPUs lack some queries
                pass
            gpus.append(g)
        return gpus, _text(driver)
    finally:
        pynvml.nvmlShutdown()


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def device_name(device: str) -> str:
    """The name profiles are matched against: the GPU's marketing name, or 'cpu <model>'."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        found = nvml_gpus()
        idx = dev.index or 0
        names = [g["name"] for g in found[0]] if found is not None else []
        # NVML numbers every GPU of the host in PCI order; CUDA counts the fastest first unless
        # CUDA_DEVICE_ORDER=PCI_BUS_ID, and CUDA_VISIBLE_DEVICES renumbers. Only where every
        # GPU has one name does NVML's list answer without asking CUDA.
        if names and len(set(names)) == 1 and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            return names[0]
        pci_order = os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        if pci_order and idx < len(names) and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            return names[idx]
        return torch.cuda.get_device_name(idx)
    return f"cpu {cpu_info()['model']}"
