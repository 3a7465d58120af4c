#!/usr/bin/env bash
# Few-step generation on the flowers (issue 13), one run, the demo's quality protocol: 736 samples against the
# 736 val photos at 64 px, seed 0, floors from the train split at the same n.
#   teacher  = a finished `latentflow demo --config configs/flowers64_otcfm_2k.yaml` run (DiT, 2,000 steps, the
#              demo's recipe until session 8; default runs/flowers64_demo)
#   meanflow = configs/flowers64_meanflow.yaml fine-tuned from it (1,000 steps), flowmap 1 and 2 steps
#   2-RF     = configs/flowers64_reflow.yaml on 4,000 teacher couplings (rk4 8 steps, guidance 4), euler 1, 2, 4
#   meanflow on the couplings, from the teacher (400 steps) and from the 2-RF (300 steps), flowmap 1 and 2
#   meanflow on 4,000 midpoint-4 couplings (the teacher's own 8-NFE samples), from the teacher, 1,000 steps, with
#   configs/flowers64_meanflow_reflow.yaml as shipped (uniform (t, r)), and with the default (t, r) (null:
#   the paper's logit-normal)
#   teacher itself at midpoint 4 (8 NFE), dopri5, euler 1 and 2, guidance 4
# (benchmarks/results/cpu2_few_step.txt was made by the first version of this script, which stopped after 2-RF,
# and the same commands for the rest run by hand right after it; cpu2_few_step_mid4.txt by the same commands as
# the last stage, run by hand)
# Usage: bash benchmarks/flowers_few_step.sh [DEMO_DIR] [OUT]   (about 1.5 hours on 2 quiet cores)
# This script keeps issue 13's comparison as it was measured (the older teacher, midpoint-4 couplings). The
# recipe shipped since (euler-8 couplings from the demo's own model, r - t at scale 1: 106.8 / 116.6 at 2 / 1 NFE)
# runs as `latentflow demo ... --few-step`, stages 7-11 (benchmarks/results/cpu2_demo_s23_fresh.txt).
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

# train NAME CONFIG INIT CACHE [--set ...]: fine-tune from INIT, export to NAME_pipe, print the training seconds
train() {
    local name=$1 config=$2 init=$3 cache=$4 start
    shift 4
    stamp "$name: train $config from $init"
    start=$(seconds)
    $LF train --config "$config" --init "$init" --set data.cache="$cache" --set output_dir="$OUT/$name" \
        --set log.progress_bar=false "$@"
    echo "$name training seconds: $(( $(seconds) - start ))"
    $LF export "$OUT/$name" --out "$OUT/${name}_pipe"
}
# evaluate NAME PIPE GUIDANCE SWEEP...: the protocol above into OUT/eval_NAME
evaluate() {
    local name=$1 pipe=$2 guidance=$3
    shift 3
    $LF evaluate "$pipe" --ref "$OUT/ref/val64.npz" "${EVAL[@]}" --guidance-scale "$guidance" --sweep "$@" \
        --out "$OUT/eval_$name"
}

stamp "teacher: midpoint 4 (8 NFE), dopri5, euler 1 and 2, guidance 4"
evaluate teacher "$DEMO/pipeline" 4 midpoint:4 dopri5 euler:1,2

train meanflow configs/flowers64_meanflow.yaml "$DEMO/run" "$DEMO/cache"
evaluate meanflow "$OUT/meanflow_pipe" 1 flowmap:1,2

# couplings N SOLVER STEPS FOLDER: N teacher endpoints with guidance 4, timed
couplings() {
    local start
    stamp "reflow couplings: $1 teacher endpoints, $2 $3 steps, guidance 4"
    start=$(seconds)
    $LF reflow "$DEMO/run" --n "$1" --solver "$2" --steps "$3" --guidance-scale 4 --batch-size 64 --no-progress \
        --out "$4"
    echo "reflow seconds: $(( $(seconds) - start ))"
}

couplings 4000 rk4 8 "$OUT/couplings"
train reflow configs/flowers64_reflow.yaml "$DEMO/run" "$OUT/couplings"
evaluate reflow "$OUT/reflow_pipe" 1 euler:1,2,4

train meanflow_reflow configs/flowers64_meanflow_reflow.yaml "$DEMO/run" "$OUT/couplings" --set train.max_steps=400 \
    --set objective.time_sampler=null
evaluate meanflow_reflow "$OUT/meanflow_reflow_pipe" 1 flowmap:1,2
train meanflow_on_2rf configs/flowers64_meanflow_reflow.yaml "$OUT/reflow" "$OUT/couplings" \
    --set train.max_steps=300 --set optim.warmup_steps=20 --set objective.time_sampler=null
evaluate meanflow_on_2rf "$OUT/meanflow_on_2rf_pipe" 1 flowmap:1,2

couplings 4000 midpoint 4 "$OUT/couplings_mid4"
train meanflow_mid4 configs/flowers64_meanflow_reflow.yaml "$DEMO/run" "$OUT/couplings_mid4"
evaluate meanflow_mid4 "$OUT/meanflow_mid4_pipe" 1 flowmap:1,2
train meanflow_mid4_logitnormal configs/flowers64_meanflow_reflow.yaml "$DEMO/run" "$OUT/couplings_mid4" \
    --set objective.time_sampler=null
evaluate meanflow_mid4_logitnormal "$OUT/meanflow_mid4_logitnormal_pipe" 1 flowmap:1,2
couplings 2000 midpoint 4 "$OUT/couplings_mid4_2k"   # sized to under half the teacher's compute, with 370 steps
train meanflow_mid4_370 configs/flowers64_meanflow_reflow.yaml "$DEMO/run" "$OUT/couplings_mid4_2k" \
    --set train.max_steps=370 --set checkpoint.every=370 --set sample.every=370
evaluate meanflow_mid4_370 "$OUT/meanflow_mid4_370_pipe" 1 flowmap:1,2

stamp "summary"
RUNS=(teacher meanflow meanflow_reflow meanflow_on_2rf reflow meanflow_mid4 meanflow_mid4_logitnormal meanflow_mid4_370)
$LF plot-eval "${RUNS[@]/#/$OUT/eval_}" --labels "${RUNS[@]}" --out "$OUT/fid_vs_nfe.png" || true
for run in "${RUNS[@]}"; do echo "-- $run"; cat "$OUT/eval_$run/evaluation.csv"; done
