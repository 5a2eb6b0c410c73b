#!/usr/bin/env bash
# The user's path, timed from the command: full-size random files in the users'
# formats (`models random --size full`), then `generate` twice in fresh processes:
# the first after "installation" (empty wanrender home: no compile cache, no checksum
# cache), then later processes. Files stay in the page cache between runs.
# RUNS lists the processes: "plain" (the defaults), "compile" (--compile default,
# which compiles even on a cold cache and records it for later processes) or "teardown"
# (the defaults, but the process ends through the interpreter's full teardown, as before
# cli_errors.skip_teardown existed: what that saves).
# BYTECODE=1 (default) first byte-compiles the installed packages as pip does at install
# time: the device image ships them without .pyc and sets PYTHONDONTWRITEBYTECODE, so
# without it every process compiles torch from source (2.3 s before the load, measured).
# The Triton cache starts empty too (TRITON_CACHE_DIR), as after an installation.
# Run from the repository root on a GPU machine with PYTHONPATH=src; results in $OUT.
#   RUNS="plain plain compile plain" bash benchmarks/gpu_user_path.sh [EXTRA GENERATE FLAGS...]
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
M=${MODELS:-/tmp/wr-models}
export WANRENDER_HOME=${WANRENDER_HOME:-/tmp/wr-home}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WANRENDER_HOME/triton}
env | grep "^PYTHON" | sort
if [ "${BYTECODE:-1}" = 1 ]; then
    t0=$(date +%s.%N)
    python3 -m compileall -q -j 0 "$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" \
        "$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")" src ${PYTHONPATH//:/ } >/dev/null 2>&1
    echo "byte-compiled the packages (once, as pip install does): $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
fi
IMG=$OUT/input.png
wr() { python3 -m wanrender.cli "$@"; }
now() { date +%s.%N; }
python3 -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.astronaut()).save('$IMG')"
t0=$(now)
timeout 300 python3 -m wanrender.cli models random --dir "$M" --size full 2>&1 | tail -12
echo "models random --size full: $(python3 -c "print(f'{$(now) - $t0:.1f}')") s"
run=0
for kind in ${RUNS:-plain plain}; do
    run=$((run + 1))
    extra=(); [ "$kind" = compile ] && extra=(--compile default)
    echo "== process $run ($kind)"
    t0=$(now)
    cmd=(python3 -m wanrender.cli)
    [ "$kind" = teardown ] && cmd=(python3 -c "import sys, wanrender.cli_errors as e; e.skip_teardown = lambda: None; sys.argv[0] = 'wanrender'; from wanrender.cli import main; main()")
    timeout 250 "${cmd[@]}" generate "$IMG" --prompt "an astronaut waves at the camera, slow dolly-in" \
        --models "$M" --frames 81 --size 832x1216 --seed 42 -o "/tmp/wr-out/run$run.mp4" "${extra[@]}" "$@" 2>&1 | grep -v "Warning\|warn(" | tail -22
    echo "process $run, command to MP4: $(python3 -c "print(f'{$(now) - $t0:.1f}')") s"
    cp "/tmp/wr-out/run$run.json" "$OUT/" 2>/dev/null; python3 - "$OUT/run$run.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no sidecar:", e); raise SystemExit
print("  load_models_s", d.get("load_models_s"), "parts", d.get("load_parts_s"), "process_s", d.get("process_s"), "tail_s", d.get("tail_s"))
print("  timings", {k: round(v, 2) for k, v in d["timings_s"].items()}, "steps", d.get("step_s"))
print("  plan", d["plan"]["runtime"] and {k: d["plan"]["runtime"].get(k) for k in ("precision", "attention", "compile")})
PY
done
