#!/usr/bin/env bash
# Single node: N GPUs, or N CPU processes (gloo) on a machine without one.
#
#   launch/torchrun.sh                                   # one process per visible GPU (CPU: 2)
#   NPROC=4 launch/torchrun.sh model=llama_small optim=snoo_adamw optim.k=20
#
# Every argument is a Hydra override. All ranks share one run directory (rank 0 picks it).
#
# Preemption: SIGTERM or SIGUSR1 sent to this script is passed to the training processes
# (not to torchrun, which would kill them 30 s later): each finishes its step, the run saves a
# checkpoint, and this script exits with status 75, the "requeue me" status launch/slurm.sbatch
# acts on. Any other exit status is torchrun's own.
set -uo pipefail

REQUEUE_EXIT_CODE=75  # snoo_train.preemption.REQUEUE_EXIT_CODE

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=2
fi

# Without a GPU each rank should use its share of the cores, not all of them.
if ! nvidia-smi -L >/dev/null 2>&1; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi

# torchrun reports a failed worker as status 1 whatever the worker's own status was; rank 0
# writes the requeue status here instead (snoo_train.preemption.report_requeue_status).
export SNOO_EXIT_STATUS_FILE
SNOO_EXIT_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/snoo-exit.XXXXXX")
trap 'rm -f "${SNOO_EXIT_STATUS_FILE}"' EXIT

# TORCHRUN_ARGS (launch/slurm.sbatch sets it): a multi-node rendezvous instead of --standalone.
# shellcheck disable=SC2086
torchrun ${TORCHRUN_ARGS:---standalone} --nproc_per_node="${NPROC}" -m snoo_train.train "$@" &
TORCHRUN_PID=$!

forward() {  # $1: signal name; the workers are torchrun's direct children
  pkill -"$1" -P "${TORCHRUN_PID}" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives: wait again until torchrun is gone.
while true; do
  wait "${TORCHRUN_PID}"
  status=$?
  kill -0 "${TORCHRUN_PID}" 2>/dev/null || break
done

if [[ "$(cat "${SNOO_EXIT_STATUS_FILE}" 2>/dev/null)" == "${REQUEUE_EXIT_CODE}" ]]; then
  exit "${REQUEUE_EXIT_CODE}"
fi
exit "${status}"
