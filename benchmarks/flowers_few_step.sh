#!/usr/bin/env bash
# Few-step generation on the flowers (issue 13), one run, the demo's quality protocol: 736 samples against the
# 736 val photos at 64 px, seed 0, floors from the train split at the same n.
#   teacher  = a finished `latentflow demo` run (DiT, 2,000 steps; default runs/flowers64_demo)
#   meanflow = configs/flowers64_meanflow.yaml fine-tuned from it (1,000 steps), flowmap 1 and 2 steps
#   2-RF     = configs/flowers64_reflow.yaml on 4,000 teacher couplings (rk4 8 steps, guidance 4), euler 1, 2, 4
#   teacher itself at midpoint 4 (8 NFE) and dopri5, guidance 4
# Usage: bash benchmarks/flowers_few_step.sh [DEMO_DIR] [OUT]   (about an hour on 2 cores)
set -euo pipefail
DEMO=${1:-runs/flowers64_demo}
OUT=${2:-runs/few_step}
LF=.venv/bin/latentflow
FLOWERS=../shared/data/tf_flowers/images_128
mkdir -p "$OUT"
seconds() { date +%s; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
EVAL=(--n 736 --seed 0 --floors "$FLOWERS/train")

stamp "reference statistics of the val photos at 64 px"
[ -f "$OUT/ref/val64.npz" ] || $LF fid-stats "$FLOWERS/val" --resolution 64 --out "$OUT/ref/val64.npz"

stamp "teacher: midpoint 4 (8 NFE) and dopri5, guidance 4"
$LF evaluate "$DEMO/pipeline" --ref "$OUT/ref/val64.npz" "${EVAL[@]}" --guidance-scale 4 \
    --sweep midpoint:4 dopri5 --out "$OUT/eval_teacher"

stamp "meanflow fine-tune of the teacher"
start=$(seconds)
$LF train --config configs/flowers64_meanflow.yaml --init "$DEMO/run" --set data.cache="$DEMO/cache" \
    --set output_dir="$OUT/meanflow" --set log.progress_bar=false
echo "meanflow training seconds: $(( $(seconds) - start ))"
$LF export "$OUT/meanflow" --out "$OUT/meanflow_pipe"
$LF evaluate "$OUT/meanflow_pipe" --ref "$OUT/ref/val64.npz" "${EVAL[@]}" --guidance-scale 1 \
    --sweep flowmap:1,2 --out "$OUT/eval_meanflow"

stamp "reflow couplings: 4,000 teacher endpoints, rk4 8 steps, guidance 4"
start=$(seconds)
$LF reflow "$DEMO/run" --n 4000 --solver rk4 --steps 8 --guidance-scale 4 --batch-size 64 --no-progress \
    --out "$OUT/couplings"
echo "reflow seconds: $(( $(seconds) - start ))"
stamp "2-rectified flow on the couplings"
start=$(seconds)
$LF train --config configs/flowers64_reflow.yaml --init "$DEMO/run" --set data.cache="$OUT/couplings" \
    --set output_dir="$OUT/reflow" --set log.progress_bar=false
echo "2-RF training seconds: $(( $(seconds) - start ))"
$LF export "$OUT/reflow" --out "$OUT/reflow_pipe"
$LF evaluate "$OUT/reflow_pipe" --ref "$OUT/ref/val64.npz" "${EVAL[@]}" --guidance-scale 1 \
    --sweep euler:1,2,4 --out "$OUT/eval_reflow"

stamp "summary"
$LF plot-eval "$OUT/eval_teacher" "$OUT/eval_meanflow" "$OUT/eval_reflow" --out "$OUT/fid_vs_nfe.png" || true
for run in teacher meanflow reflow; do echo "-- $run"; cat "$OUT/eval_$run/evaluation.csv"; done
