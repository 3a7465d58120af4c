#!/usr/bin/env bash
# Guidance with a weaker model's unconditional branch (train.guide_step / export --guide), the demo's quality protocol:
# 736 samples against the 736 val photos at 64 px, seed 0, midpoint 4 (8 NFE). For a finished run, one row with the
# model's own null class (plain classifier-free guidance) and one row for each guide: a checkpoint of a finished run
# (RUN/checkpoints/step-N: its EMA weights), another run or a pipeline on the same latents. Floors (real vs real,
# VAE round trip) come with the first row.
# Usage: [SCALES="3 4 5"] bash benchmarks/flowers_guide.sh RUN_DIR OUT GUIDE [GUIDE...]
# e.g.   bash benchmarks/flowers_guide.sh runs/hour/run runs/guide runs/hour/run/checkpoints/step-00001000
# (train with --set checkpoint.keep=20 to keep the early checkpoints; about 2 minutes a row on 2 cores)
set -euo pipefail
RUN=$1
OUT=$2
shift 2
read -r -a SCALES <<< "${SCALES:-4}"
LF=.venv/bin/latentflow
FLOWERS=../shared/data/tf_flowers/images_128
mkdir -p "$OUT"
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

[ -f "$OUT/val64.npz" ] || $LF fid-stats "$FLOWERS/val" --resolution 64 --out "$OUT/val64.npz"
evaluate() {  # evaluate PIPE NAME SCALE [extra options]
    local pipe=$1 name=$2 scale=$3
    shift 3
    stamp "$name, guidance $scale"
    $LF evaluate "$pipe" --ref "$OUT/val64.npz" --n 736 --sweep midpoint:4 --guidance-scale "$scale" \
        --out "$OUT/eval_${name}_g${scale}" "$@" 2>&1 | grep -E "FID" | sed 's/.*\(midpoint\|floor\)/\1/'
}

$LF export "$RUN" --out "$OUT/pipe_own" --no-guide --grid-images 0 > /dev/null
first=(--floors "$FLOWERS/train")
for scale in "${SCALES[@]}"; do
    evaluate "$OUT/pipe_own" own "$scale" "${first[@]}"
    first=()
done
for guide in "$@"; do
    name=guide_$(basename "$guide")
    $LF export "$RUN" --out "$OUT/pipe_$name" --guide "$guide" --grid-images 0 > /dev/null
    for scale in "${SCALES[@]}"; do
        evaluate "$OUT/pipe_$name" "$name" "$scale"
    done
done
