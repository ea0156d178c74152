#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a multi-host pod slice) with gcloud.
#
#   launch/tpu_vm.sh [FLAGS] COMMAND [-- TRAIN_FLAGS...]
#
# Safe by default: prints every command it would run. Add --yes to run them.
#
# Commands (run in this order; `up` does create, install, data, mount, train):
#   create   create the slice (--spot for a preemptible one)
#   install  copy this checkout's committed tree (git archive HEAD) to every worker and
#            install it with the [tpu] extra into ~/venv (Python 3.11, through uv)
#   data     copy the prepared data directory to every worker's disk (a local directory is
#            copied with scp, a gs:// one with gcloud storage)
#   mount    mount the bucket that holds the workdir on every worker (gcsfuse): checkpoints are
#            written by all workers together, so they need one directory every worker sees
#   train    start `python -m tinystories_jax.train` on all workers at once, in the background;
#            each worker logs to ~/train.log
#   logs     follow worker 0's log (--worker=N for another)
#   resume   after a preemption: recreate the slice if it is gone or PREEMPTED, reinstall, and
#            train again; the workdir resumes from its latest checkpoint
#   status   show the slice's state
#   delete   delete the slice
#   up       create, install, data, mount, train
#
# Flags (defaults in brackets):
#   --name=NAME        slice name [tinystories]
#   --zone=ZONE        [us-central2-b]
#   --type=TYPE        accelerator type, e.g. v4-8 (one host), v4-32 (four hosts) [v4-8]
#   --version=VERSION  TPU software version [tpu-ubuntu2204-base]
#   --project=PROJECT  GCP project [gcloud's default]
#   --spot             create a Spot (preemptible) slice
#   --config=FILE      training config [configs/tinystories.py:33m]
#   --data=DIR         prepared data: local directory or gs://bucket/path [runs/tinystories-data]
#   --bucket=BUCKET    bucket (name, no gs://) mounted at /mnt/BUCKET for the workdir; required
#                      on more than one host, where all workers write the same checkpoints
#   --run=NAME         run name: the workdir is /mnt/BUCKET/NAME (or ~/runs/NAME) [NAME of --name]
#   --worker=N         worker whose log `logs` follows [0]
#   --yes              run the commands instead of printing them
#
# Example: a 4-host v4-32 run of the 33M model, then its log:
#   launch/tpu_vm.sh --type=v4-32 --bucket=my-runs --data=gs://my-runs/tinystories-data up --yes
#   launch/tpu_vm.sh logs --yes
set -euo pipefail

NAME=tinystories
ZONE=us-central2-b
TYPE=v4-8
VERSION=tpu-ubuntu2204-base
PROJECT=""
SPOT=0
CONFIG="configs/tinystories.py:33m"
DATA=runs/tinystories-data
BUCKET=""
RUN=""
WORKER=0
YES=0
COMMAND=""
TRAIN_FLAGS=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --data=*) DATA="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}"; BUCKET="${BUCKET#gs://}" ;;
    --run=*) RUN="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --yes) YES=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    -*) die "unknown flag $1; see launch/tpu_vm.sh --help." ;;
    *)
      [[ -z "$COMMAND" ]] || die "one command at a time (got $COMMAND and $1)."
      COMMAND="$1" ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || die "no command given; one of create install data mount train logs resume status delete up (see --help)."
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "--worker=$WORKER is not a worker number."
RUN="${RUN:-$NAME}"
for value in "$NAME" "$RUN" "$BUCKET"; do
  # These go into remote shell commands and paths: keep them to plain names.
  [[ -z "$value" || "$value" =~ ^[A-Za-z0-9._-]+$ ]] || die "'$value' is not a plain name; use letters, digits, '.', '_' and '-' in --name, --run and --bucket."
done

# Hosts in the slice. v2, v3, v4 and v5p sizes count TensorCores, 8 per host; v5e and v6e sizes
# count chips: up to 8 on one host, 4 per host in larger slices.
size="${TYPE##*-}"
[[ "$size" =~ ^[0-9]+$ ]] || die "--type=$TYPE does not end in a size (e.g. v4-32)."
case "$TYPE" in
  v2-* | v3-* | v4-* | v5p-*) hosts=$(((size + 7) / 8)) ;;
  *) if ((size <= 8)); then hosts=1; else hosts=$((size / 4)); fi ;;
esac
if ((hosts > 1)) && [[ -z "$BUCKET" ]]; then
  case "$COMMAND" in
    mount | train | resume | up)
      die "--type=$TYPE has $hosts hosts, which write checkpoints together: pass --bucket=BUCKET (mounted at /mnt/BUCKET on every worker)." ;;
  esac
fi
if [[ -n "$BUCKET" ]]; then
  WORKDIR="/mnt/$BUCKET/$RUN"
else
  WORKDIR="\$HOME/runs/$RUN"
fi
REMOTE_DATA="\$HOME/data/$(basename "$DATA")"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

# One shell word, single-quoted unless it needs no quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command, quoted so that it can be pasted into a shell; runs it only with --yes.
run() {
  local arg
  printf '+'
  for arg in "$@"; do
    printf ' %s' "$(quote "$arg")"
  done
  printf '\n'
  if ((YES)); then
    "$@"
  fi
}

ssh_all() {
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

do_create() {
  local extra=()
  ((SPOT)) && extra+=(--spot)
  run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
    --version="$VERSION" "${extra[@]}"
}

do_install() {
  local root
  root="$(cd "$(dirname "$0")/.." && pwd)"
  # git archive: only tracked files, no virtualenvs or runs.
  run git -C "$root" archive --format=tar.gz --prefix=tinystories-jax/ -o /tmp/tinystories-jax.tar.gz HEAD
  run "${GCLOUD[@]}" scp /tmp/tinystories-jax.tar.gz "$NAME":/tmp/ "${WHERE[@]}" --worker=all
  # The TPU images ship Python 3.10 and the project needs 3.11+: uv fetches one into ~/venv.
  ssh_all "rm -rf ~/tinystories-jax && tar -xzf /tmp/tinystories-jax.tar.gz -C ~ && cd ~/tinystories-jax && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/venv && ~/.local/bin/uv pip install -q --python ~/venv/bin/python -e '.[tpu]'"
}

do_data() {
  ssh_all "mkdir -p ~/data"
  if [[ "$DATA" == gs://* ]]; then
    [[ "$DATA" =~ ^gs://[A-Za-z0-9._/-]+$ ]] || die "--data=$DATA: use a gs:// path of letters, digits, '.', '_', '-' and '/'."
    ssh_all "gcloud storage cp -r ${DATA%/} ~/data/"
  else
    [[ -d "$DATA" ]] || ((!YES)) || die "--data=$DATA is not a directory; run \`python -m tinystories_jax.prepare --output_dir=$DATA ...\` first or pass a gs:// path."
    run "${GCLOUD[@]}" scp --recurse "$DATA" "$NAME":data/ "${WHERE[@]}" --worker=all
  fi
}

do_mount() {
  if [[ -z "$BUCKET" ]]; then
    echo "# no --bucket: the workdir stays on the worker's disk ($WORKDIR) and is lost with the slice"
    return
  fi
  # gcsfuse must show a directory that one worker renames to the others at once: Orbax finishes
  # each checkpoint by renaming its temporary directory.
  ssh_all "sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET && (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=100000 $BUCKET /mnt/$BUCKET)"
}

train_command() {
  local flags="" f
  for f in "${TRAIN_FLAGS[@]}"; do
    flags+=" $(printf '%q' "$f")"
  done
  # mesh.distributed=True: every worker joins the job; JAX reads the slice's workers from the VM
  # metadata. nohup + setsid: training outlives the ssh session; SIGTERM on preemption saves.
  # The guard matches only a command line that starts with the venv's python: the shell running
  # this very string also contains "tinystories_jax.train", and a bare pattern matched it. The
  # whole background group writes to the log (and execs the trainer), so nothing holds the ssh
  # session's output open and the ssh command returns at once.
  echo "if pgrep -f \"^\$HOME/venv/bin/python -m tinystories_jax[.]train\" > /dev/null; then echo \"\$(hostname): already training\"; else { cd ~/tinystories-jax && mkdir -p $WORKDIR && exec setsid nohup ~/venv/bin/python -m tinystories_jax.train --config=$CONFIG --workdir=$WORKDIR --config.data.dir=$REMOTE_DATA --config.mesh.distributed=True$flags; } > ~/train.log 2>&1 < /dev/null & fi"
}

do_train() {
  ssh_all "$(train_command)"
  echo "# training on $hosts host(s); follow it with: launch/tpu_vm.sh --name=$NAME --zone=$ZONE logs --yes"
}

do_logs() {
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$WORKER" --command="tail -n 100 -F ~/train.log"
}

do_status() {
  run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state)"
}

recreate() {
  do_create
  do_install
  do_data
  do_mount
}

do_resume() {
  local state
  if ((YES)); then
    state=$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state)" 2>/dev/null || true)
    echo "# slice $NAME: ${state:-missing}"
    case "$state" in
      READY) ;;
      PREEMPTED | TERMINATED) do_delete; recreate ;;
      "") recreate ;;
      *) die "slice $NAME is $state; wait until it is READY or PREEMPTED, then rerun resume." ;;
    esac
  else
    echo "# would read the slice's state:"
    do_status
    echo "# if it is PREEMPTED (or gone: then without the delete), recreate it:"
    do_delete
    recreate
    echo "# then, in every case, start training again; it resumes from the latest checkpoint:"
  fi
  do_train
}

do_delete() {
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

((YES)) || echo "# dry run: printing the commands; add --yes to run them"
case "$COMMAND" in
  create) do_create ;;
  install) do_install ;;
  data) do_data ;;
  mount) do_mount ;;
  train) do_train ;;
  logs) do_logs ;;
  resume) do_resume ;;
  status) do_status ;;
  delete) do_delete ;;
  up) recreate; do_train ;;
  *) die "unknown command $COMMAND; one of create install data mount train logs resume status delete up." ;;
esac
