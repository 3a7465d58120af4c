#!/usr/bin/env bash
# Dataset OT for a flow map (issue 14), one run per teacher, the demo's quality protocol: 736 samples against the
# 736 val photos at 64 px, seed 0, floors from the train split at the same n; flow-map sampling at 1 and 2 NFE,
# guidance 1 and 4.
# A flow map (configs/flowers64_meanflow.yaml with the data's own velocity x1 - x0, no guidance baked in, (t, r)
# uniform; 1,000 steps) is fine-tuned from each teacher with that teacher's pairing:
#   dataset  = dataset OT over the whole cache (class-aware potential POTENTIAL of CACHE, default `demo`: the one
#              `latentflow demo` fits), from a dataset-OT teacher
#   otcfm    = exact minibatch OT (objective.flow_map_pairing: ot), from a minibatch OT-CFM teacher
#   indep    = independent pairs (the paper's), from the minibatch OT-CFM teacher
# The teachers are run folders of the shipped demo recipe, e.g. from `RECIPE=guide RUNS="otcfm dataset" SEED=N bash
# benchmarks/flowers_dataset_ot.sh` (benchmarks/results/cpu2_flowers_dataset_ot_flowmap_pairs_s22.txt: seeds 0-3).
# GUIDANCES="4": sample with the teachers' guidance only.
# EXTRA="--set optim.lr=2.5e-4": more settings for every flow map (session 24: half the learning rate).
# Usage: [RUNS="dataset otcfm indep"] [TAG=s0] [EXTRA=...] bash benchmarks/flowers_flow_map_pairs.sh DATASET_RUN OTCFM_RUN CACHE [OUT]
#   (about 10 minutes per run on 2 quiet cores)
set -euo pipefail
DATASET_RUN=$1
OTCFM_RUN=$2
CACHE=$3
OUT=${4:-runs/flow_map_pairs}
POTENTIAL=${POTENTIAL:-demo}
TAG=${TAG:-s0}
LF=.venv/bin/latentflow
FLOWERS=../shared/data/tf_flowers/images_128
read -r -a RUNS <<< "${RUNS:-dataset otcfm}"
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT"
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

[ -f "$OUT/ref/val64.npz" ] || $LF fid-stats "$FLOWERS/val" --resolution 64 --out "$OUT/ref/val64.npz"
for run in "${RUNS[@]}"; do
    case $run in
        dataset) init=$DATASET_RUN; pairing=(--set objective.ot_scope=dataset --set objective.ot_potential="$POTENTIAL"
                                             --set objective.class_aware=true) ;;
        otcfm) init=$OTCFM_RUN; pairing=(--set objective.flow_map_pairing=ot) ;;
        indep) init=$OTCFM_RUN; pairing=() ;;
        *) echo "RUNS take dataset, otcfm or indep, got $run" >&2; exit 2 ;;
    esac
    name=${run}_$TAG
    stamp "$name: flow map on its own pairs from $init"
    start=$(date +%s)
    $LF train --config configs/flowers64_meanflow.yaml --init "$init" --set data.cache="$CACHE" \
        --set output_dir="$OUT/$name" --set log.progress_bar=false --set objective.flow_map_velocity=data \
        --set objective.time_sampler=uniform --set objective.flow_map_guidance=1.0 "${pairing[@]}" "${EXTRA[@]}"
    echo "$name training seconds: $(( $(date +%s) - start ))"
    $LF export "$OUT/$name" --out "$OUT/${name}_pipe"
    for guidance in ${GUIDANCES:-1 4}; do  # the flow maps carry no guidance: sampled without, and with the teachers' 4
        $LF evaluate "$OUT/${name}_pipe" --ref "$OUT/ref/val64.npz" --n 736 --seed 0 --floors "$FLOWERS/train" \
            --guidance-scale $guidance --sweep flowmap:1,2 --out "$OUT/eval_${name}_g$guidance"
        cat "$OUT/eval_${name}_g$guidance/evaluation.csv"
    done
done
stamp done
