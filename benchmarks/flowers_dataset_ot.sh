#!/usr/bin/env bash
# Dataset-scale OT on the flowers (issue 14), one run, the demo's quality protocol: 736 samples against the 736 val
# photos at 64 px, seed 0, floors from the train split at the same n, guidance 4, euler at 1, 2, 4 and 8 NFE and
# midpoint 4 (8 NFE; benchmarks/results/cpu2_flowers_dataset_ot.txt ran the midpoint setting by hand after the rest).
#   otcfm      = minibatch OT-CFM: configs/flowers64_otcfm_2k.yaml (the demo's recipe until session 8, 2,000
#                steps) on the demo's cache
#   rf         = the same config with objective rf (independent pairs)
#   dataset    = configs/flowers64_dataset_ot.yaml: class-aware dataset OT (potential fitted by ot-fit)
#   dataset-blind = the same with a class-blind potential (labels follow the paired latent)
#   dataset-null = dataset, with the rows whose label is dropped (CFG's null class) paired through the class-blind
#                potential (objective.ot_null_potential; cpu2_flowers_dataset_ot_null_s26.txt); not in the default RUNS
# Straightness: each run's last preview (25 fixed-noise samples, euler 16, guidance 4; log.csv).
# RECIPE=demo: the same four runs with the demo's recipe instead (configs/flowers64_demo.yaml as measured in session
# 10: 4,000 steps, no guide; the
# dataset runs set objective.ot_scope=dataset on it; about twice as long); RUNS="otcfm dataset" trains and evaluates
# only those. RECIPE=guide: the shipped demo recipe (configs/flowers64_demo.yaml: 2,000 steps, guided at sampling
# by the run's own EMA at step 500; the dataset run's guide is its own step-500 EMA).
# OT_FIT_ARGS="--steps 300": options passed to every ot-fit (a shorter fit; cpu2_flowers_dataset_ot_fit300.txt).
# STEPS=8000: every run trains that many steps instead of its recipe's (cpu2_flowers_dataset_ot_8k_s17.txt; 16000:
# cpu2_flowers_dataset_ot_16k_s18.txt).
# SHIFTS="1 2": evaluate also with those time shifts (each repeats the euler settings).
# SEED=1: every run trains with that train.seed instead of 0 (cpu2_flowers_dataset_ot_seeds_s19.txt: seeds 1-5).
# Usage: [RECIPE=2k|demo|guide] [RUNS=...] [OT_FIT_ARGS=...] [STEPS=N] [SEED=N] [SHIFTS=...] bash benchmarks/flowers_dataset_ot.sh [DEMO_DIR] [OUT]   (about 1.2 hours on 2
# quiet cores; DEMO_DIR is a finished `latentflow demo` folder: only its cache is used)
set -euo pipefail
DEMO=${1:-runs/flowers64_demo}
OUT=${2:-runs/dataset_ot}
case ${RECIPE:-2k} in
    2k) MINIBATCH=(configs/flowers64_otcfm_2k.yaml); DATASET=(configs/flowers64_dataset_ot.yaml) ;;
    # the demo's config pairs over the whole cache since session 14: its minibatch form sets ot_scope back to local
    demo) MINIBATCH=(configs/flowers64_demo.yaml --set train.max_steps=4000 --set train.guide_step=null
                     --set objective.ot_scope=local --set objective.class_aware=false)
          DATASET=("${MINIBATCH[@]}" --set objective.ot_scope=dataset --set objective.class_aware=true) ;;
    guide) MINIBATCH=(configs/flowers64_demo.yaml --set objective.ot_scope=local --set objective.class_aware=false)
           DATASET=("${MINIBATCH[@]}" --set objective.ot_scope=dataset --set objective.class_aware=true) ;;
    *) echo "RECIPE must be 2k, demo or guide, got ${RECIPE}" >&2; exit 2 ;;
esac
read -r -a RUNS <<< "${RUNS:-rf otcfm dataset dataset-blind}"
read -r -a OT_FIT_ARGS <<< "${OT_FIT_ARGS:-}"
read -r -a SHIFTS <<< "${SHIFTS:-1}"
TRAIN_SET=()
[ -z "${STEPS:-}" ] || TRAIN_SET=(--set train.max_steps="$STEPS")
[ -z "${SEED:-}" ] || TRAIN_SET+=(--set train.seed="$SEED")
wanted() { [[ " ${RUNS[*]} " == *" $1 "* ]]; }
LF=.venv/bin/latentflow
FLOWERS=../shared/data/tf_flowers/images_128
mkdir -p "$OUT"
seconds() { date +%s; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp "reference statistics of the val photos at 64 px"
[ -f "$OUT/ref/val64.npz" ] || $LF fid-stats "$FLOWERS/val" --resolution 64 --out "$OUT/ref/val64.npz"

for kind in aware blind; do
    if [ $kind = aware ]; then wanted dataset || wanted dataset-null || continue
    else wanted dataset-blind || wanted dataset-null || continue; fi
    stamp "ot-fit $kind"
    start=$(seconds)
    $LF ot-fit "$DEMO/cache" --name "$kind" $([ $kind = aware ] && echo --class-aware) --no-progress "${OT_FIT_ARGS[@]}"
    echo "ot-fit $kind seconds: $(( $(seconds) - start ))"
done

# train NAME CONFIG [--set ...]: train on the demo's cache, export to NAME_pipe, print the training seconds
train() {
    local name=$1 config=$2 start
    shift 2
    stamp "$name: train $config $*"
    start=$(seconds)
    $LF train --config "$config" --set data.cache="$DEMO/cache" --set output_dir="$OUT/$name" \
        --set log.progress_bar=false "${TRAIN_SET[@]}" "$@"
    echo "$name training seconds: $(( $(seconds) - start ))"
    $LF export "$OUT/$name" --out "$OUT/${name}_pipe"
}
evaluate() {
    stamp "evaluate $1"
    $LF evaluate "$2" --ref "$OUT/ref/val64.npz" --n 736 --seed 0 --floors "$FLOWERS/train" --guidance-scale 4 \
        --sweep euler:1,2,4,8 midpoint:4 --time-shift "${SHIFTS[@]}" --out "$OUT/eval_$1"
}

! wanted otcfm || train otcfm "${MINIBATCH[@]}"
! wanted rf || train rf "${MINIBATCH[@]}" --set objective.name=rf
! wanted dataset || train dataset "${DATASET[@]}" --set objective.ot_potential=aware
! wanted dataset-blind || train dataset-blind "${DATASET[@]}" --set objective.ot_potential=blind \
    --set objective.class_aware=false
! wanted dataset-null || train dataset-null "${DATASET[@]}" --set objective.ot_potential=aware \
    --set objective.ot_null_potential=blind

for name in "${RUNS[@]}"; do evaluate $name "$OUT/${name}_pipe"; done

stamp "summary"
$LF plot-eval "${RUNS[@]/#/$OUT/eval_}" --labels "${RUNS[@]}" --out "$OUT/fid_vs_nfe.png" || true
for run in "${RUNS[@]}"; do
    log="$OUT/$run/log.csv"
    echo "-- $run (straightness of the last preview: $(.venv/bin/python -c "
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get('straightness')]
print(rows[-1]['straightness'] if rows else 'n/a')" "$log"))"
    cat "$OUT/eval_$run/evaluation.csv"
done
