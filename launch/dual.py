r"""Dual randomized smoothing beside the main job's certificates, one model.

  python -m launch.run  --config=dds_jax/configs/digits.py --workdir=runs/digits
  python -m launch.dual --config=dds_jax/configs/digits.py --workdir=runs/digits \
      [--model=ds|fixed]

With the main job's trained models in --workdir (trained first if missing),
trains two sigma selectors (targets: the per-sample sigma table, and the grid
method's sigma of every training image) and certifies the same test images at
fixed sigma, with data-dependent sigma + the memory, and with dual soundness
(`dds_jax.experiment.dual_comparison`); the table with the paired tests goes
to --workdir/dual_<model>/comparison.md. Every step resumes.
"""

from absl import app
from absl import flags

from dds_jax import distributed
from dds_jax import experiment
from launch import common

MODEL = flags.DEFINE_enum("model", "ds", ["ds", "fixed"],
                          "The main job's model to certify: per-sample-sigma "
                          "trained (ds) or fixed-sigma trained.")


def main(argv):
  del argv

  def run():
    config, workdir = common.CONFIG.value, common.WORKDIR.value
    _, text = experiment.dual_comparison(config, workdir, MODEL.value)
    if distributed.is_main():
      print(text)

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
