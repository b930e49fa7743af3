#!/usr/bin/env bash
# Single node: N GPUs, or N CPU processes (gloo) on a machine without one.
#
#   launch/torchrun.sh                                   # one process per visible GPU (CPU: 2)
#   NPROC=4 launch/torchrun.sh model=llama_small optim=snoo_adamw optim.k=20
#
# Every argument is a Hydra override. All ranks share one run directory (rank 0 picks it).
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=2
fi

# Without a GPU each rank should use its share of the cores, not all of them.
if ! nvidia-smi -L >/dev/null 2>&1; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi

exec torchrun --standalone --nproc_per_node="${NPROC}" -m snoo_train.train "$@"
