#!/usr/bin/env bash
# The CIFAR-10 reproduction of the paper's +9 points at radius 0.5 (issue 7/7),
# one self-contained step per call, each under 10 minutes on one H100.
#
#   bash launch/cifar10_repro.sh <step> <cifar10-jpeg-q75.zip> <out dir> [extra --config flags]
#
# Steps (RUN = gauss | gauss_ds | macer_ds):
#   train_<RUN>          train ResNet-18 at sigma 0.25, write <out>/<RUN>/export
#   certify_fixed_<RUN>  certify the 500-image set at fixed sigma 0.25 (N = 100,000)
#   certify_ds_<RUN>     optimize sigma per image, certify, memory rule
# A dry run on this CPU: DRY=1 (small CNN, 1 epoch, N = 1,000, 20 images).
set -euo pipefail
PY=${PYTHON:-python}   # e.g. PYTHON=.venv/bin/python
step=$1; zip=$2; out=$3; shift 3
run=${step#train_}; run=${run#certify_fixed_}; run=${run#certify_ds_}
case $run in
  gauss)    args="sigma=0.25" ;;
  gauss_ds) args="sigma=0.25,ds" ;;
  macer_ds) args="sigma=0.25,ds,method=macer" ;;
  *) echo "unknown run $run" >&2; exit 2 ;;
esac
epochs=${EPOCHS:-60}
if [ "${DRY:-0}" = 1 ]; then args="$args,small"; fi
cfg="dds_jax/configs/cifar10.py:data=$zip,$args,epochs=$epochs"
common=(--config.train.dtype=bfloat16 --config.ckpt.export_dtype=bfloat16 "$@")
case $step in
  train_*)
    "$PY" -m launch.train --config="$cfg" --workdir="$out/$run" "${common[@]}" ;;
  certify_fixed_*)
    "$PY" -m launch.certify --config="$cfg" --workdir="$out/$run/fixed" \
      --config.certify.checkpoint="$out/$run/export" \
      --config.certify.sigma_method=fixed --config.certify.soundness=none "${common[@]}" ;;
  certify_ds_*)
    "$PY" -m launch.certify --config="$cfg" --workdir="$out/$run/ds" \
      --config.certify.checkpoint="$out/$run/export" \
      --config.certify.sigma_method=ascent --config.certify.soundness=memory "${common[@]}" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
