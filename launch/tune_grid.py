r"""Tunes the grid sigma method on held-out training images, never the test set.

  python -m launch.train --config=dds_jax/configs/digits.py \
      --config.data.holdout=300 --workdir=runs/digits_tune/train
  python -m launch.tune_grid --config=dds_jax/configs/digits.py \
      --config.data.holdout=300 --config.data.test_split=holdout \
      --config.certify.checkpoint=runs/digits_tune/train/export \
      --workdir=runs/digits_tune

Certifies the held-out images at fixed sigma and with each setting of
`dds_jax.experiment.GRID_SETTINGS` (candidate sigmas, pilot draws; a subset
with --settings="7 sigmas x 700,..."), and writes the table with the paired
tests to --workdir/comparison.md. Settings already certified in --workdir are
read back, not run again.
"""

from absl import app
from absl import flags

from dds_jax import distributed
from dds_jax import experiment
from launch import common

SETTINGS = flags.DEFINE_list(
    "settings", [], "Names of dds_jax.experiment.GRID_SETTINGS to compare "
    "(e.g. '7 sigmas x 700'); empty: all.")


def main(argv):
  del argv

  def run():
    config, workdir = common.CONFIG.value, common.WORKDIR.value
    model_dir = config.certify.checkpoint or workdir
    settings = experiment.grid_settings(SETTINGS.value)
    _, text = experiment.tune_sigma_grid(config, model_dir, workdir, settings)
    if distributed.is_main():
      print(text)

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
