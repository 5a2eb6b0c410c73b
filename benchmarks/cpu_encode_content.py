"""How much the MP4 encode depends on what the frames show (issue #13: "why the MP4
encode took 5-7 s against 2.2 s before").

81 frames at 832x1216 (W x H), encoded with libx264 crf 18 as our writer does, once
from a natural image in motion (the astronaut photo, slow zoom, pan and sway) and once
from noise-like frames such as a random-weight VAE decodes (Gaussian noise, blurred by
one pixel). For each x264 preset: PSNR against the source, the file size, the time to
feed the frames and the time left after the last frame (the flush that a streamed
encode still owes once the decode has ended).

    python benchmarks/cpu_encode_content.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

H, W, N = 1216, 832, 81


def natural() -> list[np.ndarray]:
    import cv2
    import skimage.data

    base = cv2.resize(skimage.data.astronaut(), (int(W * 1.3), int(H * 1.3)), interpolation=cv2.INTER_CUBIC)
    out = []
    for i in range(N):
        m = cv2.getRotationMatrix2D((base.shape[1] / 2, base.shape[0] / 2), 2.0 * np.sin(i / 10), 1 + 0.25 * i / 80)
        f = cv2.warpAffine(base, m, (base.shape[1], base.shape[0]))
        y0, x0 = (base.shape[0] - H) // 2, (base.shape[1] - W) // 2 + i
        out.append(np.ascontiguousarray(f[y0 : y0 + H, x0 : x0 + W]))
    return out


def noise() -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(0)
    return [np.clip(cv2.GaussianBlur(rng.normal(128, 60, (H, W, 3)).astype(np.float32), (0, 0), 1.0), 0, 255)
            .astype(np.uint8) for _ in range(N)]  # fmt: skip


def encode(frames: list[np.ndarray], preset: str, path: str) -> tuple[float, float, float, float]:
    import av

    c = av.open(path, "w")
    st = c.add_stream("libx264", rate=16)
    st.width, st.height, st.pix_fmt = W, H, "yuv420p"
    st.options = {"crf": "18", "preset": preset}
    t0 = time.perf_counter()
    for f in frames:
        for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            c.mux(p)
    t1 = time.perf_counter()
    for p in st.encode():
        c.mux(p)
    c.close()
    t2 = time.perf_counter()
    dec = [fr.to_ndarray(format="rgb24") for fr in av.open(path).decode(video=0)]
    mse = float(np.mean([np.mean((a.astype(np.float64) - b) ** 2) for a, b in zip(dec, frames)]))
    return 10 * np.log10(255**2 / mse), os.path.getsize(path) / 1e6, t1 - t0, t2 - t1


def main() -> None:
    print(f"{os.cpu_count()} CPU cores; {N} frames at {W}x{H}, libx264 crf 18")
    print("| frames | preset | PSNR dB | MB | feed s | flush after the last frame s | total s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("natural (astronaut in motion)", natural), ("noise-like (random weights)", noise)):
            frames = make()
            for preset in ("medium", "veryfast"):
                q, mb, feed, flush = encode(frames, preset, os.path.join(tmp, "v.mp4"))
                print(f"| {name} | {preset} | {q:.2f} | {mb:.2f} | {feed:.2f} | {flush:.2f} | {feed + flush:.2f} |")


if __name__ == "__main__":
    main()
