#!/usr/bin/env bash
# The GPU measurements, as steps that each fit one 10-minute device call.
# Run from the repository root on the GPU machine, with diffusers and PyAV importable
# (carry them as wheels where the machine lacks them) and PYTHONPATH=src.
#   bash benchmarks/gpu_session.sh STEP
# Results land in $OUT (or ./bench_out).
#   kernels  attention kernel variants, a whole DiT forward with the 8-bit kernel
#            (peer in the same run), the tiny fp8-vs-bf16 turbo run, GPU tests
#   sweep    the random-weight matrix (benchmarks/matrices/gpu-random.yaml); ONLY=
#            selects cases by label; earlier rows in $PRIOR (a results.jsonl) are
#            resumed from
#   parity   the full-size turbo pipeline, bf16 eager vs the fast path
#   shapes   the peer vs the fp8 path (sage8, compile) at 480x832 and 720x1280
#   forward  one Q/K/V GEMM vs three (gpu_qkv_fusion.py), then the peer vs the fp8
#            path (sage8, compile) at all three shapes
#   checks   the GPU tests, then the full-size turbo parity (bf16 eager vs fast path)
#   lifecycle  one process, several renders (benchmarks/second_render.py): the demo with
#            compile, then full-size random weights on the fast path; then one capped
#            random-weight sweep case through the bench child (ONLY= picks it)
#   merge    the fused fp8 LoRA merge (kernels/fp8_merge.py): its GPU tests, then the plain
#            and the fused merge of a rank-64 LoRA into a full-size expert, timed, bytes compared
#   eager    the eager path's fused kernels (quant_rows, qk_norm, ln_mod, vae_norm): their GPU
#            tests, one eager fp8 forward fused against PyTorch's ops, the VAE decode with and
#            without its fused norm, and how far eager ops, fused and compiled forwards land apart
#   tune     a measured GPU profile from random full-size weights (e.g. on an H100);
#            BUCKETS, ATTN, PREC, COMP narrow the search (comma lists)
#   real     with real checkpoints under models/: the full matrix
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
wr() { python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" "$@"; }
T0=$(date +%s)
left() { local s=$(( ${BUDGET:-570} - ($(date +%s) - T0) )); echo $(( s > 1 ? s : 1 )); }  # timeout 0 = no limit

case "${1:-}" in
  kernels)
      timeout 150 python3 benchmarks/gpu_attention.py --sweep --shapes prod --rep-ms 400 2>&1 | tail -40 | tee "$OUT/attention.txt"
      # the fastest accurate variant goes into the whole forward
      OPTS=$(python3 - "$OUT/gpu_attention.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["sweep"]
except Exception:
    rows = []
ok = [r for r in rows if "ms" in r and r["config"].get("pv_mode", 0) != 2 and r["acc_mean_v"] < 0.01]
print(json.dumps(min(ok, key=lambda r: r["ms"])["config"] if ok else {}))
EOF
)
      echo "sage8 options for the whole forward: $OPTS"
      timeout 270 python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" \
          bench dit --shapes 832x1216 --attention sage8 --no-bf16 --sage8-options "$OPTS" --json "$OUT/bench_dit_sage8.json" \
          2>&1 | tail -30 | tee "$OUT/bench_dit_sage8.txt"
      timeout 60 python3 benchmarks/gpu_pipeline_parity.py --tiny --attention sage8 2>&1 | tail -4
      timeout "$(left)" python3 -m pytest -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 ;;
  sweep)
      mkdir -p "$OUT/sweep"
      [ -n "${PRIOR:-}" ] && cp "$PRIOR" "$OUT/sweep/results.jsonl"
      timeout "$(left)" python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" \
          bench run benchmarks/matrices/gpu-random.yaml --out "$OUT/sweep" --resume --retry-failed ${ONLY:+--only "$ONLY"} 2>&1 | tail -40
      ;;
  parity)
      timeout "$(left)" python3 benchmarks/gpu_pipeline_parity.py --attention "${ATTN:-sage8}" --compile default 2>&1 | tail -8 ;;
  shapes)
      timeout "$(left)" python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" \
          bench dit --shapes 480x832,720x1280 --no-bf16 --json "$OUT/bench_dit_shapes.json" 2>&1 | tail -25 ;;
  forward)
      timeout 120 python3 benchmarks/gpu_qkv_fusion.py 2>&1 | tail -6
      timeout "$(left)" python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" \
          bench dit --shapes 832x1216,480x832,720x1280 --attention sage8 --no-bf16 --json "$OUT/bench_dit_forward.json" \
          2>&1 | tail -40 ;;
  checks)
      timeout 240 python3 -m pytest -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
      timeout 60 python3 benchmarks/gpu_pipeline_parity.py --tiny --attention sage8 2>&1 | tail -4
      timeout "$(left)" python3 benchmarks/gpu_pipeline_parity.py --attention sage8 --compile default 2>&1 | tail -10 ;;
  lifecycle)
      timeout 120 python3 benchmarks/second_render.py --models demo --device cuda --compile default --renders 3 2>&1 | tail -8
      timeout 330 python3 benchmarks/second_render.py --models random --device cuda --precision fp8 \
          --attention "${ATTN:-sage8}" --compile default --renders 2 2>&1 | tail -8
      mkdir -p "$OUT/sweep"
      timeout "$(left)" python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" \
          bench run benchmarks/matrices/gpu-random.yaml --out "$OUT/sweep" --only "${ONLY:-33f-rtx4090}" 2>&1 | tail -12 ;;
  merge)
      timeout 200 python3 -m pytest -m gpu tests/test_fp8_merge.py -p no:cacheprovider 2>&1 | tail -6
      timeout "$(left)" python3 benchmarks/gpu_cold_probe.py merge 2>&1 | tail -8 ;;
  eager)
      timeout 200 python3 -m pytest -m gpu tests/test_eager_kernels.py -p no:cacheprovider 2>&1 | tail -8
      timeout 130 python3 benchmarks/gpu_cold_probe.py eager 2>&1 | grep "^| \|Error" | tail -6
      timeout 100 python3 benchmarks/gpu_cold_probe.py vae2 2>&1 | grep "^| \|Error" | tail -4
      timeout "$(left)" python3 benchmarks/gpu_cold_probe.py drift 2>&1 | grep "^| \|Error" | tail -4 ;;
  tune)
      timeout "$(left)" python3 -c "from wanrender.cli import main; import sys; sys.argv=['wanrender']+sys.argv[1:]; main()" \
          tune --models random --budget "${TUNE_BUDGET:-8m}" --repeats 1 --out "$OUT/profile.yaml" --work "$OUT/tune" \
          ${BUCKETS:+--buckets "$BUCKETS"} ${ATTN:+--attention "$ATTN"} ${PREC:+--precision "$PREC"} \
          ${COMP:+--compile "$COMP"} 2>&1 | tail -25 ;;
  real)
      wr bench run benchmarks/matrices/gpu-h200.yaml --out "$OUT/sweep"
      wr bench report "$OUT/sweep/results.jsonl" -o "$OUT/report.html" ;;
  *)  echo "usage: bash benchmarks/gpu_session.sh kernels|sweep|parity|shapes|forward|checks|lifecycle|merge|eager|tune|real"; exit 2 ;;
esac
