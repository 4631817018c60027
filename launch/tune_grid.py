r"""Tunes the grid sigma method on held-out training images, never the test set.

  python -m launch.train --config=dds_jax/configs/digits.py \
      --config.data.holdout=300 --workdir=runs/digits_tune/train
  python -m launch.tune_grid --config=dds_jax/configs/digits.py \
      --config.data.holdout=300 --config.data.test_split=holdout \
      --config.certify.checkpoint=runs/digits_tune/train/export \
      --workdir=runs/digits_tune

Certifies the held-out images at fixed sigma and with each setting of
`dds_jax.experiment.GRID_SETTINGS` (candidate sigmas, pilot draws), and
writes the table with the paired tests to --workdir/comparison.md.
"""

from absl import app

from dds_jax import distributed
from dds_jax import experiment
from launch import common


def main(argv):
  del argv

  def run():
    config, workdir = common.CONFIG.value, common.WORKDIR.value
    model_dir = config.certify.checkpoint or workdir
    _, text = experiment.tune_sigma_grid(config, model_dir, workdir)
    if distributed.is_main():
      print(text)

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
