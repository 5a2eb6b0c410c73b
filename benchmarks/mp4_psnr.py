"""PSNR between two videos' decoded frames (all frames, and the first alone).

    python benchmarks/mp4_psnr.py A.mp4 B.mp4

Both are read with OpenCV (8-bit BGR); frames are paired in order up to the shorter
video, and a size mismatch is an error. Used to put a number on two MP4s of the same
request (for example ComfyUI's and ours); on random weights this mostly measures the
two encoders (docs/pitfalls.md, "Parity with ComfyUI"), so lossless tensors remain the
parity evidence.
"""

from __future__ import annotations

import sys

import numpy as np


def frames(path: str) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(path)
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    if not out:
        raise SystemExit(f"{path}: no frames could be read")
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: mp4_psnr.py A.mp4 B.mp4")
    a, b = frames(sys.argv[1]), frames(sys.argv[2])
    if a.shape[1:] != b.shape[1:]:
        raise SystemExit(f"frame sizes differ: {a.shape[1:]} against {b.shape[1:]}")
    n = min(len(a), len(b))
    print(
        f"frames {len(a)} / {len(b)}, compared {n}: PSNR {psnr(a[:n], b[:n]):.2f} dB, first frame {psnr(a[0], b[0]):.2f} dB"
    )


if __name__ == "__main__":
    main()
