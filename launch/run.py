r"""The main job: train, certify, analyze.

  python -m launch.run --config=dds_jax/configs/digits.py --workdir=runs/digits

With a data-dependent `config.certify.sigma_method` (digits.py's default) it certifies twice and
prints fixed sigma, data-dependent sigma, and data-dependent sigma with the
memory side by side: --workdir/fixed and --workdir/ds hold each run's
certify.tsv and summary.json, --workdir/comparison.md the table and
--workdir/certified_accuracy.png the curves. Otherwise --workdir holds one
run's files.
"""

from absl import app

from dds_jax import analysis
from dds_jax import distributed
from dds_jax import evaluate
from dds_jax import train
from launch import common


def main(argv):
  del argv

  def run():
    config, workdir = common.CONFIG.value, common.WORKDIR.value
    train.train_and_evaluate(config, workdir)
    header = (f"\nCertified accuracy ({config.data.name}, sigma0="
              f"{config.noise.sigma:g}, N={config.certify.n}, alpha="
              f"{config.certify.alpha}; files in {workdir}):\n")
    if config.certify.sigma_method != "fixed":
      _, text = evaluate.compare_fixed_and_ds(config, workdir)
    else:
      summary = evaluate.certify_dataset(config, workdir)
      text = analysis.format_table({"fixed sigma": summary})
    if distributed.is_main():
      print(header)
      print(text)

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
