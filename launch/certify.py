r"""Certifies test examples with a model trained by launch.train.

  python -m launch.certify --config=dds_jax/configs/digits.py --workdir=runs/digits

Writes certify.tsv, summary.json and certified_accuracy.png into --workdir.
"""

from absl import app

from dds_jax import analysis
from dds_jax import distributed
from dds_jax import evaluate
from launch import common


def main(argv):
  del argv

  def run():
    summary = evaluate.certify_dataset(common.CONFIG.value,
                                       common.WORKDIR.value)
    if distributed.is_main():
      print(analysis.format_table({"certify": summary}))

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
