# Sourced by the launch scripts (not run): start the deepspeed launcher in a process group of its
# own and forward TERM, INT and HUP to that whole group, so that a signal to this script reaches the
# per-node launcher and every rank (a SIGTERM to the top `deepspeed` process alone kills only it on
# one node: its per-node launcher and ranks go on training as orphans, without a checkpoint).
#
# Exit status: the launcher's, except after a forwarded signal when the run saved its checkpoint
# (local rank 0 writes the tag to $MTPEFT_PREEMPTED_FILE): then 0. DeepSpeed's per-node launcher
# itself exits 1 after any SIGTERM, whatever its ranks did, so its status cannot say so.
#
#   run_in_group group|leader COMMAND...   (leader: forward to COMMAND only, which signals the rest
#                                          itself: the pdsh runner, whose ranks are on other hosts)

run_in_group() {
  local target=$1 marker pid status
  shift
  marker=$(mktemp "${TMPDIR:-/tmp}/mtpeft-preempted.XXXXXX")
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
