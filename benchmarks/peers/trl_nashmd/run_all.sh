#!/usr/bin/env bash
# Both TRL NashMD measurements, one after the other, from the repository root:
#   benchmarks/peers/trl_nashmd/run_all.sh
# writes $OUT_DIR/$PREFIX.json (gradient checkpointing off) and $OUT_DIR/$PREFIX-gc.json (on).
# Env: MODEL (HF folder, default nlhf's cache), STEPS (per run, warm-up included; default 4),
#      OUT_DIR (default docs/bench), PREFIX (default trl_nashmd), VENV (default the setup.sh venv).
# Needs a quiet machine: timings under CPU contention mean nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../../.."
model="${MODEL:-$PWD/.cache/nlhf/models/smollm2-135m-instruct-bfloat16}"
steps="${STEPS:-4}"
out_dir="${OUT_DIR:-docs/bench}"
prefix="${PREFIX:-trl_nashmd}"
python="${VENV:-$here/.venv}/bin/python"
"$python" "$here/bench_trl_nashmd.py" --model "$model" --steps "$steps" --out "$out_dir/$prefix.json"
"$python" "$here/bench_trl_nashmd.py" --model "$model" --steps "$steps" --gradient-checkpointing \
    --out "$out_dir/$prefix-gc.json"
