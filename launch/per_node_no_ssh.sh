#!/usr/bin/env bash
# One launcher per node, no ssh between nodes (clusters that start a command on every node
# themselves: SLURM srun, Kubernetes, a batch system, or you in N terminals). Every node runs the
# same command with its own --node_rank; all read the same hostfile (world layout and slots).
#
#   launch/per_node_no_ssh.sh --node_rank R [--master_addr A] [--master_port P] [--num_gpus G] \
#       HOSTFILE CONFIG [mtpeft train options]
#
# Defaults: --master_addr is the hostfile's first host, --master_port 29500, --num_nodes is the
# number of hosts in the hostfile, --num_gpus the host's slots. Node R runs the ranks of line R.
set -euo pipefail

PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}
node_rank=${NODE_RANK:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
num_gpus=${NUM_GPUS:-}
num_nodes=
while [[ $# -gt 0 && $1 == --* ]]; do
  [[ $1 == -h || $1 == --help ]] && { sed -n '2,12p' "$0" >&2; exit 2; }
  [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
  case $1 in
    --node_rank) node_rank=$2 ;;
    --master_addr) master_addr=$2 ;;
    --master_port) master_port=$2 ;;
    --num_gpus) num_gpus=$2 ;;
    --num_nodes) num_nodes=$2 ;;
    *) echo "error: unknown launcher option $1 (put mtpeft train options after HOSTFILE CONFIG)" >&2; exit 2 ;;
  esac
  shift 2
done
if [[ $# -lt 2 ]]; then
  echo "error: usage: launch/per_node_no_ssh.sh --node_rank R [--master_addr A] HOSTFILE CONFIG [mtpeft train options]" >&2
  exit 2
fi
HOSTFILE=$1
CONFIG=$2
shift 2

"$PYTHON" -m mtpeft.launch.hostfile check "$HOSTFILE" >/dev/null
hosts=$("$PYTHON" -m mtpeft.launch.hostfile nodes "$HOSTFILE")
num_nodes=${num_nodes:-$hosts}
if ! [[ $node_rank =~ ^[0-9]+$ ]] || (( node_rank >= num_nodes )); then
  echo "error: --node_rank must be an integer in [0, $num_nodes) for $HOSTFILE, got '${node_rank}'" >&2
  exit 2
fi
if ! [[ $num_nodes =~ ^[0-9]+$ ]] || (( num_nodes < 1 || num_nodes > hosts )); then
  echo "error: --num_nodes must be in [1, $hosts] (hosts in $HOSTFILE), got '$num_nodes'" >&2
  exit 2
fi
master_addr=${master_addr:-$("$PYTHON" -m mtpeft.launch.hostfile master "$HOSTFILE")}

ds_args=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$node_rank" --num_nodes "$num_nodes"
         --master_addr "$master_addr" --master_port "$master_port")
if [[ -n $num_gpus ]]; then
  ds_args+=(--num_gpus "$num_gpus")
fi

source "$(dirname "${BASH_SOURCE[0]}")/process_group.sh"  # TERM/INT/HUP reach every process of the run
run_in_group group "$(new_preempted_marker)" "$DEEPSPEED" "${ds_args[@]}" --module mtpeft train "$CONFIG" "$@"
