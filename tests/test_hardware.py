"""The device name GPU profiles are matched against (runtime.hardware.device_name).
CPU-only: NVML's list and CUDA's name are stood in for by monkeypatching, since this
machine has neither; the logic under test is which of the two is asked."""

from __future__ import annotations

import torch

from wanrender.runtime import hardware


def _box(monkeypatch, names: list[str], cuda: dict[int, str]) -> None:
    monkeypatch.setattr(hardware, "nvml_gpus", lambda: ([{"name": n} for n in names], "driver"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: cuda[i])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def test_a_mixed_box_asks_cuda_unless_it_counts_in_pci_order(monkeypatch) -> None:
    # PCI order (NVML): an RTX 4090 first, the H100 second; CUDA puts the faster H100 first.
    _box(monkeypatch, ["NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3"],
         {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA GeForce RTX 4090"})  # fmt: skip
    assert hardware.device_name("cuda:0") == "NVIDIA H100 80GB HBM3"
    assert hardware.device_name("cuda:1") == "NVIDIA GeForce RTX 4090"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # now CUDA's numbers are NVML's
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "must not be asked")
    assert hardware.device_name("cuda:0") == "NVIDIA GeForce RTX 4090"


def test_a_box_of_one_kind_is_named_by_nvml_alone(monkeypatch) -> None:
    _box(monkeypatch, ["NVIDIA H200"] * 4, {})  # CUDA is never asked (it would raise here)
    assert hardware.device_name("cuda:3") == "NVIDIA H200"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200 (from CUDA)")
    assert hardware.device_name("cuda:0") == "NVIDIA H200 (from CUDA)"
