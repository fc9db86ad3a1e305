#!/usr/bin/env bash
# Create the TRL NashMD peer venv (separate from nlhf's) with the CPU torch wheel.
#
#   benchmarks/peers/trl_nashmd/setup.sh [VENV_DIR]     (default: benchmarks/peers/trl_nashmd/.venv)
#
# Env: PYTHON (interpreter, default python3.11 or python3). torch==2.13.0 is pinned in the same pip
# call as everything else, so pip never swaps in a CUDA build. Where no CPU wheel is on a local
# find-links, point pip at PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu benchmarks/peers/trl_nashmd/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
import torch, transformers, trl
from trl.experimental.nash_md import NashMDTrainer  # noqa: F401  (fails early if the release lacks it)
assert torch.version.cuda is None, f"expected the CPU torch build, got CUDA {torch.version.cuda}"
print(f"ok: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
      f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
PY
