"""DIS optical-flow interpolation speed on the CPU: 832x480, x2, a 33-frame pan.

Usage: python benchmarks/cpu_dis_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_interp import pan_clip  # noqa: E402

from wanrender.interp.flow import DisInterpolator, interpolate_frames  # noqa: E402


def main() -> None:
    clip = pan_clip(33, 832, 480)
    interp = DisInterpolator()
    list(interpolate_frames(iter(clip[:3]), interp, 2))  # warm-up
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = list(interpolate_frames(iter(clip), interp, 2))
        rates.append((len(clip) - 1) / (time.perf_counter() - t0))
    print(f"DIS 832x480 x2: {len(clip)} -> {len(out)} frames; new frames/s {[round(r, 1) for r in rates]}")


if __name__ == "__main__":
    main()
