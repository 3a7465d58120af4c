#!/usr/bin/env bash
# Create .venv on a fresh machine and install latentflow with its test and eval extras.
# torch is pinned first to the CPU build that this project's machines carry on disk; on a
# GPU machine install the torch build you want before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${LATENTFLOW_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test,eval]"
# torchvision (pulled in by some optional tools) breaks `import diffusers` beside the CPU torch.
.venv/bin/python -m pip uninstall -q -y torchvision 2>/dev/null || true
