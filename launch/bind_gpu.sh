#!/usr/bin/env bash
# Per-rank wrapper: gives each rank on a node its own GPU, then runs the command.
#
#   mpirun ... launch/bind_gpu.sh build/trainer/dmc-train --flagfile=...
#
# Why: NCCL wants exactly one rank per GPU, and with CUDA_VISIBLE_DEVICES narrowed to that GPU the
# engine always uses device 0 and never needs to know its node-local rank. The local rank comes
# from the launcher: OMPI_COMM_WORLD_LOCAL_RANK (Open MPI's mpirun), SLURM_LOCALID (srun),
# MPI_LOCALRANKID (MPICH/Hydra). The node's GPUs are those already visible (a scheduler may have
# narrowed them), else every GPU that nvidia-smi lists; a node without GPUs runs unchanged.
set -euo pipefail
local_rank="${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-${MPI_LOCALRANKID:-0}}}"

gpus=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=',' read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
fi

if ((${#gpus[@]} > 1)); then
  if ((local_rank >= ${#gpus[@]})); then
    # Fail this rank at once: mpirun/srun then end the whole job (no rank waits for it).
    echo "bind_gpu: local rank $local_rank on $(hostname) but only ${#gpus[@]} GPUs" \
         "(${gpus[*]}): start at most one rank per GPU" >&2
    exit 1
  fi
  export CUDA_VISIBLE_DEVICES="${gpus[$local_rank]// /}"
fi
# One GPU visible (e.g. srun --gpus-per-task=1 already bound it) or none: keep it as it is.
exec "$@"
