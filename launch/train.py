r"""Trains a base classifier with Gaussian noise augmentation.

  python -m launch.train --config=dds_jax/configs/digits.py --workdir=runs/digits

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

from absl import app

from dds_jax import train
from launch import common


def main(argv):
  del argv
  common.run_main(lambda: train.train_and_evaluate(common.CONFIG.value,
                                                   common.WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
