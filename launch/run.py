r"""The main job: train, certify, analyze.

  python -m launch.run --config=dds_jax/configs/digits.py --workdir=runs/digits

Prints the certified-accuracy table; --workdir then holds checkpoints/,
metrics.jsonl, certify.tsv, summary.json and certified_accuracy.png.
"""

from absl import app

from dds_jax import analysis
from dds_jax import evaluate
from dds_jax import train
from launch import common


def main(argv):
  del argv

  def run():
    config, workdir = common.CONFIG.value, common.WORKDIR.value
    train.train_and_evaluate(config, workdir)
    summary = evaluate.certify_dataset(config, workdir)
    print(f"\nCertified accuracy ({summary['dataset']}, sigma="
          f"{summary['sigma']:g}, N={summary['n']}, alpha={summary['alpha']}; "
          f"files in {workdir}):\n")
    print(analysis.format_table({"certify": summary}))

  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
