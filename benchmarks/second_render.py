"""What a long-lived engine saves: the same request rendered several times in one
process through one ``Runner`` (the path of ``wanrender generate`` and of a service
worker), on the demo models (any machine) or full-size random weights (a GPU).

For each render it prints the wall time, the seconds spent loading models, and how
many graphs Dynamo compiled during it: the first render pays loading (and compiling,
with ``--compile``), later ones at the same shape should pay neither.

Usage: PYTHONPATH=src python benchmarks/second_render.py [--models demo|random] [--device cpu|cuda]
       [--compile off|default] [--renders 3] [--frames N --size WxH]
Writes $OUT/second_render.json (or ./bench_out) when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    import torch
    from torch._dynamo.utils import counters

    from wanrender.bench.env import snapshot
    from wanrender.demo import demo_image, ensure_demo_models
    from wanrender.request import from_preset
    from wanrender.runner import Runner
    from wanrender.spec import parse_size

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", choices=("demo", "random"), default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", default="off")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--renders", type=int, default=3)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--size", default=None)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = parse_size(args.size) if args.size else (None, None)
    t_start = time.perf_counter()
    if args.models == "demo":
        files, runner, preset, lora = ensure_demo_models(), Runner(args.device), "demo", None
    else:
        from wanrender.bench.synthetic import random_engine
        from wanrender.runtime.memory import Weights

        files, preset, lora = None, "turbo", 0.0
        runner = Runner(args.device, engine=random_engine(args.device), weights=Weights.standard(lora=False))
    build_s = time.perf_counter() - t_start
    rows = []
    for i in range(args.renders):
        req = from_preset(preset, demo_image(), "slow dolly-in, gentle camera motion", seed=i, frames=args.frames,
                          width=width, height=height, compile=args.compile, precision=args.precision,
                          attention=args.attention, lora_strength_high=lora, lora_strength_low=lora,
                          out=out_dir / f"second_render_{i}.mp4")  # fmt: skip
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        result = runner.render(req, files)
        wall = time.perf_counter() - t0
        row = {"render": i + 1, "wall_s": round(wall, 3), "load_s": round(result.meta["load"].get("load_models", 0.0), 3),
               "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
               "sampling_s": round(result.timings["sampling"], 3)}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
        for p in (result.video, result.sidecar):
            p.unlink(missing_ok=True)
    first, later = rows[0]["wall_s"], [r["wall_s"] for r in rows[1:]]
    print("\n| render | wall s | loading s | graphs compiled | sampling s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['render']} | {r['wall_s']:.2f} | {r['load_s']:.2f} | {r['graphs_compiled']} | {r['sampling_s']:.2f} |"
        )
    if later:
        print(f"second render / first render: {later[0] / first:.3f}")
    (out_dir / "second_render.json").write_text(
        json.dumps({"env": snapshot(), "args": vars(args), "build_s": build_s, "rows": rows}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
