#!/usr/bin/env bash
# tf_flowers at 64 px through TAEF2: the flowers DiT trained with otcfm and with rf for the same steps,
# FID against NFE on the val split. Usage: bash scripts/flowers_otcfm_vs_rf.sh [OBJECTIVE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/flowers_compare}
CACHE=${CACHE:-$OUT/cache}
N=${N:-256}
lf=.venv/bin/latentflow
$lf encode --vae "$SHARED/weights/taef2" --data "$SHARED/data/tf_flowers/images_128/train" --resolution 64 --out "$CACHE"
[ -f "$OUT/flowers_val64.npz" ] || $lf fid-stats "$SHARED/data/tf_flowers/images_128/val" --resolution 64 --out "$OUT/flowers_val64.npz"
for objective in "${@:-otcfm rf}"; do
  for name in $objective; do
    $lf train --config configs/flowers64_dit_s2_otcfm.yaml --set "data.cache=$CACHE" --set "output_dir=$OUT/$name" \
        --set "objective.name=$name"
    $lf export "$OUT/$name" --out "$OUT/$name-pipeline"
    $lf sample "$OUT/$name-pipeline" --n 64 --steps 8 --solver euler --seed 0 --grid "$OUT/$name-samples.png"
    $lf evaluate "$OUT/$name-pipeline" --ref "$OUT/flowers_val64.npz" --n "$N" --sweep euler:1,2,4,8 midpoint:4 \
        --kid-subset-size "$N" --out "$OUT/$name-evaluation"
  done
done
