#!/usr/bin/env bash
# Issue #14 item 7 on a GPU: a real ComfyUI server beside wanrender on the same full-size
# random files, in one sweep of the bench lab (a wanrender case and a comfyui case whose
# workflow the lab exports from the case's own request), then `bench report`.
# ComfyUI is never part of this repository: COMFY is a ComfyUI tree (e.g. the stored one,
# extracted), and its server dependencies (aiohttp, yarl, sqlalchemy, alembic,
# pydantic-settings, torchsde, einops, sentencepiece, av, ...) must be importable.
# Run from the repository root with PYTHONPATH=src (and the deps); results in $OUT.
#   COMFY=/tmp/c/comfy OUT=out bash benchmarks/gpu_comfy_sweep.sh
# The tree must hold what main.py imports: app/, api_server/, middleware/, utils/, comfy*/,
# alembic_db/ and the top-level modules (a tree without api_server/ fails at "import server").
# The parity of the frames is measured on lossless tensors by benchmarks/gpu_comfy_parity.py:
# MP4s of random-weight renders measure the codec (docs/pitfalls.md).
set -uo pipefail
OUT=${OUT:-bench_out}
M=${MODELS:-/tmp/wr-models}
BASE=${BASE:-/tmp/comfy-base}
PORT=${PORT:-8188}
: "${COMFY:?set COMFY to a ComfyUI tree}"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
mkdir -p "$OUT" "$BASE"/custom_nodes "$BASE"/input "$BASE"/output /tmp/emptyfe \
    "$BASE"/models/diffusion_models "$BASE"/models/loras "$BASE"/models/text_encoders "$BASE"/models/vae
export PYTHONUNBUFFERED=1
python3 -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.astronaut()).save('$OUT/input.png')"
timeout 300 python3 -m wanrender.cli models random --dir "$M" --size full 2>&1 | tail -1
ln -sf "$M"/wan2.2_i2v_*_noise_14B_fp8_scaled.safetensors "$BASE/models/diffusion_models/"
ln -sf "$M"/wan2.2_i2v_lightx2v_4steps_lora_v1_*.safetensors "$BASE/models/loras/"
ln -sf "$M"/umt5_xxl_fp8_e4m3fn_scaled.safetensors "$BASE/models/text_encoders/"
ln -sf "$M"/wan_2.1_vae.safetensors "$BASE/models/vae/"
STUB=""
if ! python3 -c "import torchvision" 2>/dev/null; then  # imported at load time by model families we never run
    STUB=/tmp/tv-stub; mkdir -p $STUB/torchvision/transforms
    echo "from . import transforms" > $STUB/torchvision/__init__.py; : > $STUB/torchvision/transforms/__init__.py
fi
(cd "$COMFY" && PYTHONPATH="${PYTHONPATH:-}${STUB:+:$STUB}" python3 main.py --listen 127.0.0.1 --port "$PORT" \
    --base-directory "$BASE" --front-end-root /tmp/emptyfe --disable-api-nodes > "$OUT/comfyui.log" 2>&1 &)
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/system_stats" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/system_stats" >/dev/null || { echo "ComfyUI did not start:"; tail -20 "$OUT/comfyui.log"; exit 1; }
cat > "$OUT/matrix.yaml" <<YAML
name: comfyui-vs-wanrender
defaults: {image: input.png, models: $M, preset: turbo, frames: 81, resolution: 832x1216, seed: 42,
           repeats: ${REPEATS:-1}, timeout_s: 400}
cases:
  # The H200 profile's knobs, as `generate` applies them: a lab case takes its knobs literally,
  # and its defaults (compile off, precision auto) resolve to bf16 + sdpa-cudnn.
  - {name: wanrender, precision: fp8, attention: sage8}
  - {name: comfyui, engine: comfyui, server: "http://127.0.0.1:$PORT"}
YAML
timeout "${SWEEP_S:-480}" python3 -m wanrender.cli bench run "$OUT/matrix.yaml" --out "$OUT/sweep" 2>&1 | tail -12
python3 -m wanrender.cli bench report "$OUT/sweep" 2>&1 | tail -2
grep -i "tiled\|out of memory\|error" "$OUT/comfyui.log" | head -5
# The same request through `wanrender generate` (a later process), and the MP4s' PSNR.
if [ -n "${GENERATE-1}" ]; then  # GENERATE= (empty) skips it
    t0=$(date +%s.%N)
    timeout "${GENERATE_S:-200}" python3 -m wanrender.cli generate "$OUT/input.png" \
        --prompt "slow dolly-in, gentle camera motion, soft light" --models "$M" --frames 81 --size 832x1216 \
        --seed 42 -o "$OUT/ours.mp4" 2>&1 | grep -v "Warning\|warn(" | tail -4
    echo "generate, command to MP4: $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
    theirs=$(ls "$OUT"/sweep/outputs/* 2>/dev/null | grep -i "mp4$" | head -1)
    [ -n "$theirs" ] && [ -f "$OUT/ours.mp4" ] && python3 benchmarks/mp4_psnr.py "$OUT/ours.mp4" "$theirs"
fi
pkill -f "main.py --listen 127.0.0.1 --port $PORT" || true
[ -n "${KEEP_VIDEOS:-}" ] || find "$OUT" -name "*.mp4" -delete  # 35 MB each; the numbers are in the logs and rows
