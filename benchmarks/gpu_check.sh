#!/usr/bin/env bash
# One command for a lent GPU (at most about 9.5 minutes; usually less).
#   bash benchmarks/gpu_check.sh                       # model throughput only
#   FLOWERS=DIR TAEF2=DIR bash benchmarks/gpu_check.sh # also the real Trainer, reader and CLI on the GPU
#   PROFILE=1 bash benchmarks/gpu_check.sh             # only the DiT-XL/2 profile, all its variants (~9 minutes)
#   FLOWERS128=DIR TAEF2=DIR bash benchmarks/gpu_check.sh  # only the flowers at 128 px, FID with floors (part 4)
#
# 1. DiT-B/2 and DiT-XL/2 training images/s and peak memory on 4x32x32 latents in bf16, batch 128, with and
#    without torch.compile (the step of `Trainer`: AdamW, grad clip, EMA), plus exact OT pairing times, and
#    dataset OT's assignment (float32 and bf16-screened) against each precision's matmul peak.
#    Anchor: fast-DiT reports DiT-XL/2 at 0.84 steps/s with batch 128 (about 107 images/s) on one A100.
# 2. With FLOWERS (a labelled image folder) and TAEF2 (the TAEF2 weights folder): encode it on the GPU at
#    64 and 256 px; the real `Trainer` fed by the cache reader vs from memory, for the shipped flowers
#    config (DiT-S/2) and for DiT-XL/2 in bf16 on the 256 px cache; then `latentflow train`, `export`
#    and `sample` on the GPU, the sample grid written to OUT (default gpu_check_out/).
# 3. benchmarks/dit_profile.py: DiT-XL/2 step variants (batch, compile mode, fused adaLN modulation) with counted
#    TFLOP/s against the matmul limit, peak memory, the SDPA backends and the top CUDA kernels by group, and with
#    2+ GPUs the memory per GPU under FSDP2. Its budget is PROFILE_BUDGET seconds: 520 with PROFILE=1 (then
#    nothing else runs), 180 after the model parts without FLOWERS (the first variants only); not run with
#    FLOWERS unless PROFILE=1, since those parts fill the 10 minutes.
# 4. With FLOWERS128 (a folder with train/ and val/ class folders, e.g. ../shared/data/tf_flowers/images_128) and
#    TAEF2, alone: issue 12's flowers at 128 px. Encode train/ at 128 px (32x16x16 latents), train
#    configs/flowers128_demo.yaml (the hour config's recipe, 64 tokens) for FLOWERS128_STEPS steps (default 6,000;
#    guided by its EMA at a sixth of them, as the hour config at step 1,000 of 6,000),
#    export, a sample grid and `latentflow evaluate` on the GPU: midpoint 4 and euler 8 with guidance 4, as many
#    samples as val/ holds, against val/ at 128 px, with the real-vs-real and VAE floors at that n. Results and the
#    train log go to OUT; the time limits assume an H100-class GPU (not yet run on one). DEVICE=cpu with a small
#    folder and FLOWERS128_STEPS=20 checks the path on a CPU.
# Each part has its own time limit, so one failing part does not hide the others.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=${OUT:-gpu_check_out}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

part() {  # part SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo "== $title"
    local start=$SECONDS
    timeout "$limit" "$@" || { echo "!! $title failed (exit $?)"; status=1; }
    echo "   ($title: $((SECONDS - start)) s)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

profile() {  # profile BUDGET: benchmarks/dit_profile.py within BUDGET seconds (its part capped 30 s later)
    part $(($1 + 30)) "DiT-XL/2 profile (budget $1 s)" "$PYTHON" benchmarks/dit_profile.py --budget "$1"
}
if [ "${PROFILE:-0}" = 1 ]; then
    profile "${PROFILE_BUDGET:-520}"
    exit $status
fi
if [ -n "${FLOWERS128:-}" ]; then
    [ -n "${TAEF2:-}" ] && [ -d "$FLOWERS128/train" ] && [ -d "$FLOWERS128/val" ] || {
        echo "FLOWERS128 needs train/ and val/ under $FLOWERS128 and TAEF2=the TAEF2 weights folder"; exit 2; }
    CLI=("$PYTHON" -m latentflow.cli)
    N_VAL=$(find -L "$FLOWERS128/val" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | wc -l)
    part 90 "encode train/ at 128 px on the GPU" "${CLI[@]}" encode --data "$FLOWERS128/train" --vae "$TAEF2" \
        --resolution 128 --out "$WORK/c128" --batch-size 128 --num-workers 4 --labels --no-progress
    part 330 "train configs/flowers128_demo.yaml on the GPU" "${CLI[@]}" train --config configs/flowers128_demo.yaml \
        --set data.cache="$WORK/c128" --set output_dir="$WORK/run128" \
        --set train.max_steps="${FLOWERS128_STEPS:-6000}" --set train.guide_step=$(( ${FLOWERS128_STEPS:-6000} / 6 )) \
        --set sample.every=0 --set checkpoint.every=2000 \
        --set log.progress_bar=false --set data.num_workers=4
    cp "$WORK/run128/log.csv" "$OUT/flowers128_train_log.csv" 2>/dev/null || true
    part 20 "export" "${CLI[@]}" export "$WORK/run128" --out "$WORK/pipe128"
    part 25 "sample on the GPU" "${CLI[@]}" sample "$WORK/pipe128" --n 64 --steps 8 --guidance-scale 4 \
        --device "${DEVICE:-cuda}" --grid "$OUT/flowers128_samples.png"
    part 150 "FID at 128 px with floors ($N_VAL samples)" "${CLI[@]}" evaluate "$WORK/pipe128" \
        --ref "$FLOWERS128/val" --n "$N_VAL" --sweep midpoint:4 euler:8 --guidance-scale 4 --device "${DEVICE:-cuda}" \
        --floors "$FLOWERS128/train" --out "$OUT/flowers128_eval"
    exit $status
fi
part 270 "model throughput" "$PYTHON" benchmarks/train_throughput.py --skip-reader --ot-sizes 256,1024 \
    --ot-repeats 3 --synthetic DiT-B/2,DiT-XL/2 --synthetic-batch 128 --precision bf16 --compile both \
    --steps 15 --warmup 4
part 90 "dataset OT's assignment at ImageNet scale (1.28M latents), float32 and screened bf16" "$PYTHON" \
    benchmarks/train_throughput.py --skip-reader --ot-sizes "" --ot-scale --ot-scale-points 1281167
part 40 "meanflow step against an FM step (demo DiT, batch 256)" "$PYTHON" benchmarks/meanflow_step.py \
    --device cuda --batch 256 --repeats 20
if [ -z "${FLOWERS:-}" ]; then
    profile "${PROFILE_BUDGET:-180}"
else
    echo "== DiT-XL/2 profile: not run with FLOWERS (PROFILE=1 bash benchmarks/gpu_check.sh runs it alone)"
fi

if [ -n "${FLOWERS:-}" ] && [ -n "${TAEF2:-}" ]; then
    CLI=("$PYTHON" -m latentflow.cli)
    part 40 "encode 64 px on the GPU" "${CLI[@]}" encode --data "$FLOWERS" --vae "$TAEF2" --resolution 64 \
        --out "$WORK/c64" --batch-size 128 --num-workers 4 --labels --no-progress
    part 40 "encode 256 px on the GPU" "${CLI[@]}" encode --data "$FLOWERS" --vae "$TAEF2" --resolution 256 \
        --out "$WORK/c256" --batch-size 64 --num-workers 4 --labels --no-progress
    part 50 "Trainer, flowers config (DiT-S/2)" "$PYTHON" benchmarks/train_throughput.py --cache "$WORK/c64" \
        --batch 64 --workers 4 --steps 30 --warmup 5 --repeats 2 --ot-sizes ""
    part 90 "Trainer, DiT-XL/2 bf16 on 32x32x32 latents" "$PYTHON" benchmarks/train_throughput.py \
        --cache "$WORK/c256" --batch 128 --workers 6 --steps 8 --warmup 3 --repeats 2 --ot-sizes "" \
        --set model.name=DiT-XL/2 --set "model.settings={}" --set train.mixed_precision=bf16
    part 50 "latentflow train on the GPU" "${CLI[@]}" train --config configs/flowers64_dit_s2_otcfm.yaml \
        --set data.cache="$WORK/c64" --set output_dir="$WORK/run" --set train.max_steps=1500 \
        --set sample.every=750 --set checkpoint.every=750 --set log.progress_bar=false --set data.num_workers=4
    part 20 "export" "${CLI[@]}" export "$WORK/run" --out "$WORK/pipe"
    part 25 "sample on the GPU" "${CLI[@]}" sample "$WORK/pipe" --n 64 --steps 8 --device cuda \
        --grid "$OUT/gpu_samples.png"
    cp "$WORK/run/log.csv" "$OUT/gpu_train_log.csv" 2>/dev/null || true
    # FSDP2 through accelerate's own GPU path (the CPU test has to switch it on): needs 2+ GPUs, since one
    # process is not sharded and NCCL refuses two ranks on one GPU. Train 20 steps, resume to 40, export.
    NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
    if [ "$NGPU" -ge 2 ]; then
        FSDP=("$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp_8gpu.yaml
              --num_processes "$NGPU" scripts/train.py --config configs/flowers64_dit_s2_otcfm.yaml
              --set data.cache="$WORK/c64" --set output_dir="$WORK/fsdp" --set train.mixed_precision=bf16
              --set data.batch_size=$((64 * NGPU)) --set checkpoint.every=20 --set sample.every=0
              --set log.progress_bar=false)
        part 60 "FSDP2 on $NGPU GPUs: train 20 steps" "${FSDP[@]}" --set train.max_steps=20
        part 60 "FSDP2: resume to 40 steps and export" "${FSDP[@]}" --set train.max_steps=40 --resume latest
        ls "$WORK/fsdp/checkpoints/step-00000040/pytorch_model_fsdp_0" "$WORK/fsdp/model" || status=1
    else
        echo "== FSDP2: skipped ($NGPU GPU; needs 2 or more)"
    fi
fi
exit $status
