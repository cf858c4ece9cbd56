#!/usr/bin/env bash
# Many nodes from one command: the deepspeed launcher reaches every host of HOSTFILE (pdsh over
# passwordless ssh by default; --launcher openmpi|mvapich|slurm|mpich|impi hands that job to mpirun,
# mpirun_rsh or srun instead).
#
#   launch/multi_node_pdsh.sh [launcher options] HOSTFILE CONFIG [mtpeft train options]
#
# Launcher options (passed to deepspeed): --launcher NAME, --launcher_args "ARGS", --master_addr A
# (default: the first host), --master_port P (default 29500), --num_nodes M, --num_gpus G,
# --include SPEC, --exclude SPEC, --ssh_port P.
# Environment for the remote ranks: variables named in ./.deepspeed_env or ~/.deepspeed_env
# (KEY=VALUE lines), plus NCCL_*, PYTHON*, MV2_*, UCX_* which deepspeed forwards by itself.
set -euo pipefail

PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}
launcher=pdsh
ds_args=()
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --launcher) launcher=$2; shift 2 ;;
    --launcher_args|--master_addr|--master_port|--num_nodes|--num_gpus|--include|--exclude|--ssh_port)
      [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
      ds_args+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" >&2; exit 2 ;;
    *) echo "error: unknown launcher option $1 (put mtpeft train options after HOSTFILE CONFIG)" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "error: usage: launch/multi_node_pdsh.sh [launcher options] HOSTFILE CONFIG [mtpeft train options]" >&2
  exit 2
fi
HOSTFILE=$1
CONFIG=$2
shift 2

"$PYTHON" -m mtpeft.launch.hostfile check "$HOSTFILE" >/dev/null
case ${launcher,,} in
  pdsh) command -v pdsh >/dev/null || { echo "error: pdsh not found on PATH; install pdsh or pass --launcher openmpi|slurm|mvapich" >&2; exit 2; } ;;
  openmpi|mvapich|slurm|mpich|impi) ;;
  *) echo "error: --launcher $launcher: expected pdsh, openmpi, mvapich, slurm, mpich or impi" >&2; exit 2 ;;
esac
if [[ " ${ds_args[*]} " != *" --master_addr "* ]]; then
  ds_args+=(--master_addr "$("$PYTHON" -m mtpeft.launch.hostfile master "$HOSTFILE")")
fi
if [[ " ${ds_args[*]} " != *" --master_port "* ]]; then
  ds_args+=(--master_port "${MASTER_PORT:-29500}")
fi

source "$(dirname "${BASH_SOURCE[0]}")/process_group.sh"  # TERM/INT/HUP reach every process of the run
# the pdsh runner signals every host itself (pkill over pdsh); MPI and srun forward what their group gets
target=group
[[ ${launcher,,} == pdsh ]] && target=leader
# Where the ranks report a saved checkpoint after a signal: the working directory, which every
# launcher enters on every host (the pdsh runner cds into it), so a shared one brings the report
# back here; these launchers forward no such variable, hence --preempted-file.
marker=$(new_preempted_marker "$PWD" 2>/dev/null || new_preempted_marker)
run_in_group "$target" "$marker" "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher "$launcher" "${ds_args[@]}" \
  --module mtpeft train "$CONFIG" --preempted-file "$marker" "$@"
