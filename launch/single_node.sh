#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo when there is no GPU).
#
#   launch/single_node.sh CONFIG [mtpeft train options, e.g. --set train.lr=1e-4]
#
# Environment: NUM_GPUS (default: every visible GPU), MASTER_PORT (default 29500), DEEPSPEED.
# No hostfile: for several nodes use multi_node_pdsh.sh, per_node_no_ssh.sh or slurm.sbatch.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
CONFIG=$1
shift
DEEPSPEED=${DEEPSPEED:-deepspeed}

ds_args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n ${NUM_GPUS:-} ]]; then
  ds_args+=(--num_gpus "$NUM_GPUS")
fi

source "$(dirname "${BASH_SOURCE[0]}")/process_group.sh"  # TERM/INT/HUP reach every process of the run
run_in_group group "$(new_preempted_marker)" "$DEEPSPEED" "${ds_args[@]}" --module mtpeft train "$CONFIG" "$@"
