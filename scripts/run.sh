#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine, then runs a job.
#   bash scripts/run.sh demo   # render the embedded demo (tiny random-weight model)
#   bash scripts/run.sh test   # run the test suite
#   bash scripts/run.sh shell  # print how to activate the environment
# The virtual environment lives in .venv (override with WANRENDER_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WANRENDER_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.wanrender-setup"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        # Without an NVIDIA driver, take the CPU build of torch (a plain 'torch'
        # requirement would pull a multi-GB CUDA build). WANRENDER_TORCH overrides.
        if command -v nvidia-smi >/dev/null 2>&1; then
            "$VENV/bin/python" -m pip install -q "${WANRENDER_TORCH:-torch}"
        else
            "$VENV/bin/python" -m pip install -q "${WANRENDER_TORCH:-torch==2.13.0}"
        fi
    fi
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
}

cmd=${1:-demo}
shift || true
setup
case "$cmd" in
    demo) exec "$VENV/bin/wanrender" demo "$@" ;;
    test)
        # Format and lint first (seconds): a failure names the file and the fix.
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/ruff" check .
        "$VENV/bin/python" -m pytest "$@"
        ;;
    shell) echo "source $VENV/bin/activate" ;;
    *) exec "$VENV/bin/wanrender" "$cmd" "$@" ;;
esac
