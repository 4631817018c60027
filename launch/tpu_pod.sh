#!/usr/bin/env bash
# The same dds_jax command on every worker of a Cloud TPU VM pod slice.
#
#   TPU=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh setup
#   TPU=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh run \
#       launch.certify --config=dds_jax/configs/imagenet.py --workdir=/mnt/shared/run
#
# `setup` copies this checkout to every worker and installs it with JAX for
# TPU; `run` starts `python -m <module> <args> --multihost` on all workers at
# once (`gcloud compute tpus tpu-vm ssh --worker=all`). On Cloud TPU
# jax.distributed.initialize() needs no arguments: each worker finds the
# coordinator and its process id itself. Process 0 writes certify.tsv,
# summary.json, plots and the memory store. Training writes orbax checkpoints
# from all workers together: --workdir must be a mount every worker sees
# (NFS, Filestore, or a gcsfuse mount of a bucket). Certification only needs
# the model on every worker (e.g. --config.certify.checkpoint=<export dir>
# copied to each) and keeps its files on worker 0. The memory store stays on
# worker 0's local disk when --workdir is a network mount (SQLite's WAL does
# not work there; see the README's section on the memory).
# DRY=1 prints the gcloud commands instead of running them.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
DIR=${REMOTE_DIR:-dds_jax}
what=${1:?usage: tpu_pod.sh setup | run <module> [args...]}; shift
ssh_all() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all
             --command="$1")
  if [ "${DRY:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}
case $what in
  setup)
    scp=(gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all
         "$(cd "$(dirname "$0")/.." && pwd)" "$TPU:$DIR")
    if [ "${DRY:-0}" = 1 ]; then printf '%q ' "${scp[@]}"; echo; else "${scp[@]}"; fi
    ssh_all "cd $DIR && python3 -m venv .venv && .venv/bin/pip install -q 'jax[tpu]' -e ." ;;
  run)
    module=${1:?usage: tpu_pod.sh run <module> [args...]}; shift
    args=$(printf '%q ' "$@")
    ssh_all "cd $DIR && .venv/bin/python -m $module $args --multihost" ;;
  *) echo "unknown action $what (setup | run)" >&2; exit 2 ;;
esac
