#!/bin/bash
# Train on N nodes x G GPUs under SLURM: one `accelerate launch` per node (srun), which starts G processes there.
#
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_train.sh --config configs/imagenet256_dit_xl2_otcfm.yaml \
#       --set data.cache=/shared/caches/imagenet256 --set output_dir=/shared/runs/xl2 [--resume latest]
#
# Arguments go to scripts/train.py unchanged. Environment (all optional):
#   ENCODE_ARGS         encode first with scripts/encode_latents.py on all nodes, e.g.
#                       "--vae stabilityai/sd-vae-ft-ema --data /shared/imagenet --out /shared/caches/imagenet256"
#                       (a finished cache is a no-op, an unfinished one resumes)
#   GPUS_PER_NODE       G (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT         rendezvous port on the first node (default: from the job id)
#   ACCELERATE_CONFIG   default configs/accelerate/multinode.yaml
# output_dir and the cache must be at the same path on every node: see README, "Several machines".
#SBATCH --job-name=latentflow
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"   # sbatch runs a copy of this file: the repository is where it was submitted
export NNODES="${SLURM_NNODES:?run under sbatch or salloc (SLURM_NNODES is not set)}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/multinode.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
echo "slurm_train: $NNODES node(s) x $GPUS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"

# launch PORT TARGET ARGS...: srun starts one task per node; each is machine SLURM_NODEID of NNODES
launch() {
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    port="$1"; shift
    exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
      --num_machines "$NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$((NNODES * GPUS_PER_NODE))" \
      --main_process_ip "$MASTER_ADDR" --main_process_port "$port" "$@"' launch "$@"
}

if [ -n "${ENCODE_ARGS:-}" ]; then
  # shellcheck disable=SC2086  # ENCODE_ARGS is a list of options
  launch "$((MASTER_PORT + 1))" scripts/encode_latents.py $ENCODE_ARGS --no-progress
fi
launch "$MASTER_PORT" scripts/train.py "$@"
