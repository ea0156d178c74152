#!/usr/bin/env bash
# Multi-node training without a scheduler: start one train process per host (or per GPU) over
# ssh, each given the coordinator's address, the process count and its own rank explicitly.
#
#   launch/multinode.sh --hosts=gpu1,gpu2 [FLAGS] -- --config=configs/tinystories.py:33m \
#       --workdir=/shared/runs/33m --config.data.dir=/shared/tinystories-data
#
# Safe by default: prints every command it would run. Add --yes to run them.
#
# The first host runs process 0, which hosts the coordinator on --port; every host must reach
# it there. Each host needs this checkout at the same path (--repo) with the project installed,
# and the workdir must be one directory all hosts share (NFS or similar): all processes write the
# checkpoints together, process 0 alone writes metrics. With --yes the script waits for every
# process; each one's output goes to LOGDIR/process<rank>.log on its host, and a process that
# dies ends the others within --heartbeat_timeout seconds (a train flag; default 100).
#
# Flags (defaults in brackets):
#   --hosts=H1,H2,...    ssh destinations; "localhost" runs without ssh [localhost]
#   --procs_per_host=N   1: one process drives all of a host's GPUs; the GPU count: one process
#                        per GPU, each given --local_device_ids [1]
#   --port=PORT          coordinator port on the first host [8476]
#   --coordinator=HOST   the first host's address as the others reach it [the first of --hosts]
#   --repo=DIR           checkout path on every host [this checkout's path]
#   --python=PYTHON      interpreter with the project installed [python]
#   --logdir=DIR         where each host writes its processes' logs [/tmp/tinystories-logs]
#   --yes                run instead of printing
set -euo pipefail

HOSTS=localhost
PROCS_PER_HOST=1
PORT=8476
COORDINATOR=""
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=python
LOGDIR=/tmp/tinystories-logs
YES=0
TRAIN_FLAGS=()

die() {
  echo "error: $*" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --hosts=*) HOSTS="${1#*=}" ;;
    --procs_per_host=*) PROCS_PER_HOST="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --coordinator=*) COORDINATOR="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --logdir=*) LOGDIR="${1#*=}" ;;
    --yes) YES=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) die "unknown argument $1; see launch/multinode.sh --help (train flags go after --)." ;;
  esac
  shift
done

IFS=, read -r -a HOST_LIST <<< "$HOSTS"
((${#HOST_LIST[@]} > 0)) || die "--hosts is empty; give the ssh destinations, e.g. --hosts=gpu1,gpu2."
[[ "$PROCS_PER_HOST" =~ ^[1-9][0-9]*$ ]] || die "--procs_per_host=$PROCS_PER_HOST must be a positive number."
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT == 0 || PORT > 65535)); then
  die "--port=$PORT is not a port number."
fi
((${#TRAIN_FLAGS[@]} > 0)) || die "no train flags; pass at least -- --config=FILE --workdir=DIR."
for flag in "${TRAIN_FLAGS[@]}"; do
  case "$flag" in
    --coordinator_address=* | --num_processes=* | --process_id=*)
      die "$flag is set by this script; leave it out of the train flags." ;;
  esac
done
COORDINATOR="${COORDINATOR:-${HOST_LIST[0]#*@}}"
NUM=$((${#HOST_LIST[@]} * PROCS_PER_HOST))

# One shell word, single-quoted unless it needs no quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

((YES)) || echo "# dry run: printing the commands; add --yes to run them"
echo "# $NUM processes on ${#HOST_LIST[@]} host(s); coordinator $COORDINATOR:$PORT"
pids=()
rank=0
for host in "${HOST_LIST[@]}"; do
  for ((local_id = 0; local_id < PROCS_PER_HOST; local_id++)); do
    args=("$PYTHON" -m tinystories_jax.train --coordinator_address="$COORDINATOR:$PORT"
          --num_processes="$NUM" --process_id="$rank")
    ((PROCS_PER_HOST > 1)) && args+=(--local_device_ids="$local_id")
    args+=("${TRAIN_FLAGS[@]}")
    remote="cd $(quote "$REPO") && mkdir -p $(quote "$LOGDIR") && $(words "${args[@]}") > $(quote "$LOGDIR/process$rank.log") 2>&1"
    if [[ "$host" == localhost ]]; then
      cmd=(bash -c "$remote")
    else
      # -n: no stdin, so that background ssh sessions do not fight over the terminal.
      cmd=(ssh -n -o BatchMode=yes "$host" "$remote")
    fi
    echo "+ $(words "${cmd[@]}") &"
    if ((YES)); then
      "${cmd[@]}" &
      pids+=($!)
    fi
    rank=$((rank + 1))
  done
done
((YES)) || exit 0

failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGDIR/process$i.log on its host" >&2
    failed=1
  fi
done
exit "$failed"
