#!/usr/bin/env bash
# Install the peers that benchmarks compare against into .venv (after scripts/setup_env.sh).
# torchcfm's library modules need only torch, numpy, scipy and POT; its declared extras
# (torchdyn, ...) drag in torchvision, which breaks `import diffusers` beside the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q --no-deps "torchcfm==1.0.7"
.venv/bin/python -m pip uninstall -q -y torchvision 2>/dev/null || true
.venv/bin/python -c "import torchcfm.conditional_flow_matching, diffusers; print('torchcfm ready')"
