#!/usr/bin/env bash
# One-command setup: `bash setup.sh`
# 1. torch: keep an installed one; else the pinned CPU wheel (2.13.0) where there is no NVIDIA GPU, so pip
#    never pulls the multi-GB CUDA build onto a CPU machine; on a GPU machine, the default (CUDA) build.
# 2. embedlab itself, editable, with the test/reference extras (pytest, pytrec-eval, sentence-transformers).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.5"
  else
    "$PY" -m pip install "torch==2.13.0"
  fi
fi
"$PY" -m pip install -e ".[dev,faiss]"
"$PY" -c "import embedlab, torch; print('embedlab', embedlab.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
