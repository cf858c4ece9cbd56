# Sourced by the launch scripts (not run): start the deepspeed launcher in a process group of its
# own and forward TERM, INT and HUP to that whole group, so that a signal to this script reaches the
# per-node launcher and every rank (a SIGTERM to the top `deepspeed` process alone kills only it on
# one node: its per-node launcher and ranks go on training as orphans, without a checkpoint).
#
# Exit status: the launcher's, except after a forwarded signal when the run saved its checkpoint
# (each node's local rank 0 writes the tag to MARKER): then 0. DeepSpeed's per-node launcher
# itself exits 1 after any SIGTERM, whatever its ranks did, so its status cannot say so.
#
#   marker=$(new_preempted_marker [DIR])   an empty file in DIR (default $TMPDIR or /tmp)
#   run_in_group group|leader MARKER COMMAND...
#       group:  forward to COMMAND's whole process group (one node: every rank is in it)
#       leader: forward to COMMAND only, which signals the rest itself (the pdsh runner, whose
#               ranks are on other hosts)
# MARKER reaches the ranks as MTPEFT_PREEMPTED_FILE; the multi-node launchers do not forward the
# environment, so there the caller also passes it on the command line (--preempted-file).

new_preempted_marker() {
  mktemp "${1:-${TMPDIR:-/tmp}}/.mtpeft-preempted.XXXXXX"
}

run_in_group() {
  local target=$1 marker=$2 pid status
  shift 2
  export MTPEFT_PREEMPTED_FILE=$marker
  MTPEFT_SIGNALLED=
  set -m  # job control: the background job gets a process group whose id is its pid
  "$@" &
  pid=$!
  set +m
  local dest="-$pid"
  [[ $target == leader ]] && dest=$pid
  MTPEFT_TRAPS=0
  for sig in TERM INT HUP; do
    # shellcheck disable=SC2064
    trap "MTPEFT_SIGNALLED=$sig; MTPEFT_TRAPS=\$((MTPEFT_TRAPS + 1)); kill -$sig -- $dest 2>/dev/null || true" "$sig"
  done
  local seen
  while :; do
    seen=$MTPEFT_TRAPS
    status=0
    wait "$pid" || status=$?
    # a trapped signal ends `wait` early; wait again for the launcher's own status
    (( MTPEFT_TRAPS == seen || status == 127 )) && break
  done
  # the launcher may be gone before its ranks (it exits on a signal): wait for the whole group
  if [[ $target == group ]]; then
    while kill -0 -- "-$pid" 2>/dev/null; do sleep 1; done
  fi
  trap - TERM INT HUP
  if [[ -n $MTPEFT_SIGNALLED && -s $marker ]]; then
    echo "mtpeft: SIG$MTPEFT_SIGNALLED: checkpoint $(head -n1 "$marker") saved; rerun the same command to resume" >&2
    status=0
  fi
  rm -f "$marker"
  return "$status"
}
