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

say() { echo "[setup] $*" >&2; }

TORCH_PIN=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

install_torch() {
    local pip=("$VENV/bin/python" -m pip install -q)
    if [ -n "${WANRENDER_TORCH:-}" ]; then
        say "installing ${WANRENDER_TORCH} (WANRENDER_TORCH) ..."
        "${pip[@]}" "$WANRENDER_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        say "installing torch (CUDA build: an NVIDIA driver is present; a few GB) ..."
        "${pip[@]}" torch
    else
        # No NVIDIA driver: the CPU build (~200 MB) from PyTorch's CPU index; a plain
        # pin would resolve to the multi-GB CUDA build on PyPI. When that index cannot
        # be reached (an offline mirror, a firewall), fall back to the plain pin,
        # which is what pip's configured indexes offer.
        say "installing torch (CPU build, no NVIDIA driver found) ..."
        if ! "${pip[@]}" --index-url "$CPU_INDEX" --timeout 10 --retries 0 "$TORCH_PIN" 2>/dev/null; then
            say "$CPU_INDEX not reachable: installing $TORCH_PIN from the configured package index instead"
            "${pip[@]}" "$TORCH_PIN"
        fi
    fi
}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment $VENV ..."
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.wanrender-setup"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    say "upgrading pip ..."
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        install_torch
    fi
    say "installing wanrender and its test dependencies ..."
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
    say "done: $VENV is ready"
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
