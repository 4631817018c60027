r"""Seed-to-seed spread of the main job's model: how much a new seed moves it.

Trains the digits main job's model (`dds_jax/configs/digits.py`) once per seed
and measures, on all 360 test images with N = 1,000 draws at sigma 0.25, the
mean of p_A = P[f(x + e) = y] and the fraction of images with p_A > 0.977
(the fraction that can reach a radius of 0.5 at sigma 0.25). A change that
only re-draws random streams (a new seed, new noise streams) should move these
no more than the seeds do.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 \
      .venv/bin/python bench/seed_quality.py --seeds=0-5

For an older commit: `git worktree add ../old <commit>` and run the same file
with `PYTHONPATH=../old` from inside `../old` (it uses whichever model-loading
API that commit has).
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile

import jax
import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0-5", help="first-last seeds")
  parser.add_argument("--n", type=int, default=1000, help="draws per image")
  parser.add_argument("--out", default="", help="optional JSON output")
  args = parser.parse_args()
  import dds_jax  # pylint: disable=g-import-not-at-top
  from dds_jax import data, train  # pylint: disable=g-import-not-at-top
  from dds_jax.configs import digits  # pylint: disable=g-import-not-at-top
  first, last = (int(s) for s in args.seeds.split("-"))
  test = data.load("digits", "test")
  rows = []
  for seed in range(first, last + 1):
    config = digits.get_config(None)
    config.seed = seed
    workdir = tempfile.mkdtemp(prefix="seed_quality_")
    with contextlib.redirect_stdout(io.StringIO()):
      train.train_and_evaluate(config, workdir)
    try:
      from dds_jax import checkpoint  # pylint: disable=g-import-not-at-top
      bundle, params = checkpoint.restore_params(config, workdir,
                                                 test.image_shape)
    except AttributeError:  # commits before restore_params moved
      bundle, params = train.restore_params(config, workdir, test.image_shape)
    counts = dds_jax.sample_counts(bundle.apply_fn, params, test.images,
                                   config.noise.sigma, jax.random.key(123),
                                   args.n, example_ids=test.example_ids)
    p_a = counts[np.arange(len(test.labels)), test.labels] / args.n
    row = {"seed": seed, "mean_p_a": float(p_a.mean()),
           "frac_p_a_above_0.977": float((p_a > 0.977).mean()),
           "frac_p_a_above_0.5": float((p_a > 0.5).mean())}
    rows.append(row)
    print(json.dumps(row), flush=True)
  for key in ("mean_p_a", "frac_p_a_above_0.977"):
    v = np.array([r[key] for r in rows])
    print(f"{key}: mean {v.mean():.4f}, sd {v.std(ddof=1):.4f} over "
          f"{len(v)} seeds")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "argv": sys.argv}, f, indent=1)


if __name__ == "__main__":
  main()
