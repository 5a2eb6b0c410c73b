#!/usr/bin/env bash
# The GPU measurements still owed, as steps that each fit one 10-minute device call.
# Run from the repository root on the GPU machine, with diffusers and PyAV importable
# (carry them as wheels where the machine lacks them) and PYTHONPATH=src.
#   bash benchmarks/gpu_session.sh STEP      # STEP = 1..6
# Results land in $OUT (or ./bench_out).
set -euo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
wr() { python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" "$@"; }

case "${1:-}" in
  1)  # GPU-only tests (kernels vs references, streaming, interpolation half precision)
      python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30 ;;
  2)  # fast path at the production shape, the 8-bit attention inside a whole forward
      wr bench dit --shapes 832x1216 --attention sage8 --json "$OUT/bench_dit_sage8.json" | tee "$OUT/bench_dit_sage8.txt" ;;
  3)  # the other two shapes (peer, bf16 eager, fp8 + compile with cuDNN attention)
      wr bench dit --shapes 480x832,720x1280 --json "$OUT/bench_dit_shapes.json" | tee "$OUT/bench_dit_shapes.txt" ;;
  4)  # the whole turbo pipeline on the fast path, compile outside the timed render
      python3 benchmarks/gpu_turbo.py --pipeline-only --precision fp8 --attention auto --compile default \
          | tee "$OUT/pipeline_fast.txt" ;;
  5)  # a 12-case sweep on full-size random weights (attention x precision x compile)
      wr bench run benchmarks/matrices/gpu-random.yaml --out "$OUT/sweep-random" | tee "$OUT/sweep-random.txt"
      wr bench report "$OUT/sweep-random/results.jsonl" -o "$OUT/report-random.html" ;;
  6)  # with real checkpoints under models/: the full matrix, emulated 32 GB card included
      wr bench run benchmarks/matrices/gpu-h200.yaml --out "$OUT/sweep" | tee "$OUT/sweep.txt"
      wr bench report "$OUT/sweep/results.jsonl" -o "$OUT/report.html" ;;
  *)  echo "usage: bash benchmarks/gpu_session.sh 1..6"; exit 2 ;;
esac
