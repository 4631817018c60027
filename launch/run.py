r"""The main job: train, certify, compare.

  python -m launch.run --config=dds_jax/configs/digits.py --workdir=runs/digits

With a data-dependent `config.certify.sigma_method` (digits.py's default) it
runs the paper's comparison (`dds_jax.experiment.paper_comparison`): a
fixed-sigma and a per-sample-sigma model trained with the same seed
(--workdir/train_fixed, --workdir/train_ds), three certifications of the same
test images (fixed_fixed/, fixed_<method>/, ds_<method>/), and the table with
the memory row and the paired tests in --workdir/comparison.md (curves in
--workdir/certified_accuracy.png). With `sigma_method=fixed` it trains and
certifies one model in --workdir.
"""

from absl import app

from dds_jax import analysis
from dds_jax import distributed
from dds_jax import evaluate
from dds_jax import experiment
from dds_jax import train
from launch import common


def main(argv):
  del argv

  def run():
    config, workdir = common.CONFIG.value, common.WORKDIR.value
    header = (f"\nCertified accuracy ({config.data.name}, sigma0="
              f"{config.noise.sigma:g}, N={config.certify.n}, alpha="
              f"{config.certify.alpha}; files in {workdir}):\n")
    if config.certify.sigma_method != "fixed":
      _, text = experiment.paper_comparison(config, workdir)
    else:
      train.train_and_evaluate(config, workdir)
      summary = evaluate.certify_dataset(config, workdir)
      text = analysis.format_table({"fixed sigma": summary})
    if distributed.is_main():
      print(header)
      print(text)

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
