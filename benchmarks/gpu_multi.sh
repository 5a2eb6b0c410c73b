#!/usr/bin/env bash
# Issue #17 on one host with several GPUs, each comparison in one run with its
# one-GPU baseline (written before any such machine was lent; not yet run on GPUs):
#  1. the Ulysses all-to-all per DiT forward, and the VAE decode split by rows against
#     rank 0 alone (benchmarks/gpu_multi_probe.py);
#  2. the bench lab on `models random --size full` files: the turbo video at 81 x
#     832x1216 on 1 GPU and on each count in GPUS, one sweep (s/step gives the DiT's
#     speed-up, wall the whole video's time);
#  3. the expert pipeline: JOBS videos with `batch --pipeline sequential` on one GPU,
#     then `--pipeline experts` on two (videos per hour, no expert swap).
# DEVICE=cpu SIZE=tiny runs the same on CPU processes over gloo with tiny models: the
# script's own check (CPU numbers mean nothing).
#   GPUS=2,4 JOBS=4 bash benchmarks/gpu_multi.sh          # from the repository root, PYTHONPATH=src
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
GPUS=${GPUS:-2,4}
JOBS=${JOBS:-4}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-full}
PARTS=${PARTS:-probe lab pipeline}
M=${MODELS:-/tmp/wr-multi-models}
export WANRENDER_HOME=${WANRENDER_HOME:-/tmp/wr-multi-home}
if [ "$SIZE" = tiny ]; then FRAMES=5; RES=80x64; PRESET=demo; else FRAMES=81; RES=832x1216; PRESET=turbo; fi
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.1f}')"; }
wr() { python3 -m wanrender.cli "$@"; }

if [[ " $PARTS " == *" probe "* ]]; then
    timeout 580 python3 benchmarks/gpu_multi_probe.py a2a decode --gpus "$GPUS" --device "$DEVICE" \
        --frames "$FRAMES" --size "$RES" 2>&1 | grep -v "Warning\|warn("
fi
if [[ " $PARTS " == *" lab "* || " $PARTS " == *" pipeline "* ]]; then
    t0=$(now)
    timeout 300 python3 -m wanrender.cli models random --dir "$M" --size "$SIZE" 2>&1 | tail -3
    echo "models random --size $SIZE: $(since "$t0") s"
fi
if [[ " $PARTS " == *" lab "* ]]; then
    {
        echo "name: multi-gpu"
        echo "defaults: {preset: $PRESET, models: $M, image: demo, prompt: 'slow dolly-in, soft light', frames: $FRAMES,"
        echo "           resolution: $RES, device: $DEVICE, repeats: 1, warmup: true, timeout_s: 560}"
        echo "cases:"
        echo "  - {name: gpus-1, gpus: 1}"
        for n in ${GPUS//,/ }; do echo "  - {name: gpus-$n, gpus: $n}"; done
    } >"$OUT/multi-gpu.yaml"
    wr bench run "$OUT/multi-gpu.yaml" --out "$OUT/lab" 2>&1 | tail -15
    python3 - "$OUT/lab/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {}
print("| case | status | s/step | DiT speed-up | VAE decode s | video wall s | speed-up |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    step, wall = (r.get("s_per_step") or {}).get("p50"), (r.get("wall") or {}).get("p50")
    decode = ((r.get("stages") or {}).get("vae_decode") or {}).get("p50")
    name = (r.get("case") or {}).get("name") or r.get("label")
    if name == "gpus-1":
        base = {"step": step, "wall": wall}
    ratio = lambda b, x: f"{b / x:.2f}x" if b and x else "-"
    print(f"| {name} | {r.get('status')} {r.get('message', '')[:60]} | {step} | {ratio(base.get('step'), step)} | "
          f"{decode} | {wall} | {ratio(base.get('wall'), wall)} |")
PY
fi
if [[ " $PARTS " == *" pipeline "* ]]; then
    python3 - "$OUT" "$JOBS" <<'PY'
import sys, PIL.Image, skimage.data
out, n = sys.argv[1], int(sys.argv[2])
PIL.Image.fromarray(skimage.data.astronaut()).save(f"{out}/input.png")
with open(f"{out}/jobs.yaml", "w") as f:
    for i in range(n):
        f.write(f"- {{image: input.png, prompt: 'an astronaut waves, take {i}', seed: {i}, out: videos/job{i}.mp4}}\n")
PY
    for mode in sequential experts; do
        visible=0; [ "$mode" = experts ] && visible=0,1
        rm -rf "$OUT/videos"
        t0=$(now)
        CUDA_VISIBLE_DEVICES=$visible timeout 580 python3 -m wanrender.cli batch "$OUT/jobs.yaml" --models "$M" \
            --preset "$PRESET" --frames "$FRAMES" --size "$RES" --device "$DEVICE" --pipeline "$mode" \
            >"$OUT/batch-$mode.log" 2>&1
        rc=$?
        s=$(since "$t0")
        tail -4 "$OUT/batch-$mode.log"
        made=$(ls "$OUT"/videos/*.mp4 2>/dev/null | wc -l)
        if [ "$rc" = 0 ] && [ "$made" = "$JOBS" ]; then
            echo "pipeline $mode: $JOBS videos in $s s = $(python3 -c "print(f'{$JOBS * 3600 / $s:.0f}')") videos/hour (models loaded once, included)"
        else
            echo "pipeline $mode: FAILED (exit $rc, $made of $JOBS videos) — see $OUT/batch-$mode.log"
        fi
    done
fi
