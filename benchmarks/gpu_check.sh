#!/usr/bin/env bash
# One command for a lent GPU (at most ~8 minutes): DiT-B/2 and DiT-XL/2 training images/s and peak
# memory on 4x32x32 latents in bf16, batch 128, with and without torch.compile, plus OT pairing times.
#   bash benchmarks/gpu_check.sh
# Anchor: fast-DiT reports DiT-XL/2 at 0.84 steps/s with batch 128 (about 107 images/s) on one A100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 "$PYTHON" benchmarks/train_throughput.py --skip-reader --ot-sizes 256,1024 --ot-repeats 3 \
    --synthetic DiT-B/2,DiT-XL/2 --synthetic-batch 128 --precision bf16 --compile both --steps 20 --warmup 5
