#!/usr/bin/env bash
# The CIFAR-10 study on a CPU (docs/cifar10_cpu.md): one resumable step per
# call. Training resumes from its checkpoints, certification from its TSV.
#
#   bash launch/cifar10_cpu.sh <step> <cifar10-jpeg-q75.zip>
#
# Steps:
#   train_fixed, train_ds   the small CNN at sigma 0.25, fixed or per-sample
#                           sigma (same seed, epochs, schedule); the export
#                           (parameters, sigma table) and metrics go to
#                           results/cifar10-cpu/models/<fixed|ds>/
#   certify_<MODEL>_<SIGMA> MODEL = fixed | ds, SIGMA = fixed | ascent | grid:
#                           500 test images, N0 = 100, N = 10,000, alpha 0.001,
#                           data-dependent sigma through the memory; files in
#                           results/cifar10-cpu/<MODEL>_<SIGMA>/
#   train_selector          dual RS's sigma selector (docs/dual.md), trained on
#                           the per-sample model's sigma table (the small CNN
#                           over dual.sigmas, noise s_e); its export goes to
#                           results/cifar10-cpu/models/selector/
#   certify_<MODEL>_dual    MODEL = fixed | ds, certified with the selector and
#                           dual soundness (no memory): <MODEL>_dual/
#   tune_grid_<MODEL>       the grid settings (dds_jax.experiment.GRID_SETTINGS)
#                           on 100 held-out training images (data.holdout;
#                           never the test set): results/cifar10-cpu/tune_<MODEL>
#   spot                    1 epoch and 20 images (grid sigma, memory), compared
#                           with the committed results/cifar10-cpu/spot/
#                           certify.tsv, the time column aside
#
# Environment: PYTHON (default python), RUNS (default runs/cifar10-cpu; holds
# the training checkpoints), EPOCHS (default 20).
set -euo pipefail
PY=${PYTHON:-python}
step=$1; zip=$2; shift 2
runs=${RUNS:-runs/cifar10-cpu}
res=results/cifar10-cpu
cfg="dds_jax/configs/cifar10.py:data=$zip,cpu,epochs=${EPOCHS:-20}"

save_model() {  # <run dir> <name>: the small files of a trained model
  mkdir -p "$res/models/$2"
  cp "$1/export/"* "$1/metrics.jsonl" "$1/train_config.json" "$res/models/$2/"
  scrub "$res/models/$2"
}

scrub() {  # the zip's local path does not go into committed files
  find "$1" -maxdepth 1 -name '*.json' -exec sed -i "s#$zip#<cifar10-jpeg-q75.zip>#g" {} +
}

case $step in
  train_fixed|train_ds)
    m=${step#train_}; extra=""; [ "$m" = ds ] && extra=",ds"
    "$PY" -m launch.train --config="$cfg$extra" --workdir="$runs/$m" "$@"
    save_model "$runs/$m" "$m" ;;
  train_selector)
    "$PY" -m launch.train --config="$cfg" --workdir="$runs/selector" \
      --config.train.target=selector \
      --config.dual.targets="$res/models/ds/sigma_table.tsv" "$@"
    save_model "$runs/selector" selector ;;
  certify_*_dual)
    cond=${step#certify_}; m=${cond%_*}
    "$PY" -m launch.certify --config="$cfg" --workdir="$res/$cond" \
      --config.certify.checkpoint="$res/models/$m" \
      --config.certify.sigma_method=selector \
      --config.certify.soundness=dual \
      --config.dual.selector="$res/models/selector" "$@"
    scrub "$res/$cond" ;;
  certify_*)
    cond=${step#certify_}; m=${cond%_*}; sigma=${cond#*_}
    soundness=memory; [ "$sigma" = fixed ] && soundness=none
    "$PY" -m launch.certify --config="$cfg" --workdir="$res/$cond" \
      --config.certify.checkpoint="$res/models/$m" \
      --config.certify.sigma_method="$sigma" \
      --config.certify.soundness="$soundness" "$@"
    scrub "$res/$cond" ;;
  tune_grid_*)
    m=${step#tune_grid_}
    "$PY" -m launch.tune_grid --config="$cfg" --workdir="$res/tune_$m" \
      --config.certify.checkpoint="$res/models/$m" \
      --config.data.test_split=holdout --config.certify.skip=10 "$@"
    scrub "$res/tune_$m" ;;
  spot)  # SPOT_WRITE=1: (re)write the committed reference instead
    rm -rf "$runs/spot"
    "$PY" -m launch.train --config="$cfg,small" --workdir="$runs/spot/train" "$@"
    "$PY" -m launch.certify --config="$cfg,small" --workdir="$runs/spot" \
      --config.certify.checkpoint="$runs/spot/train/export" \
      --config.certify.sigma_method=grid --config.certify.soundness=memory "$@"
    if [ "${SPOT_WRITE:-0}" = 1 ]; then
      mkdir -p "$res/spot"; cp "$runs/spot/certify.tsv" "$res/spot/"
    fi
    "$PY" - "$res/spot/certify.tsv" "$runs/spot/certify.tsv" <<'EOF'
import sys
import numpy as np
from dds_jax import analysis
want, got = (analysis.read_tsv(p) for p in sys.argv[1:])
bad = [k for k in want if k != "time" and not np.array_equal(want[k], got[k])]
print("spot check:", "DIFFERS in " + ", ".join(bad) if bad else
      f"the same {len(got['idx'])} rows (time aside)")
sys.exit(1 if bad else 0)
EOF
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
