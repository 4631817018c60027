"""Certifying a test set: what `launch.certify` runs.

`certify_dataset(config, workdir)` restores the trained model from
`<workdir>/checkpoints`, selects test examples (Cohen's skip/max), certifies
them `certify.examples_per_call` at a time and after each call rewrites
`certify.tsv` atomically (Cohen's columns `idx label predict radius correct
time`, plus `sigma p_lower`). At the end it writes `summary.json` (certified
accuracy with 95% intervals, ACR, abstain rate, samples/s, wall time,
provenance) and `certified_accuracy.png`.

`time` in the TSV is the wall time of the example's call divided by the
examples in it (the sampler certifies several examples per device batch).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dds_jax import analysis
from dds_jax.certify import certify
from dds_jax import data as data_lib
from dds_jax import progress as progress_lib
from dds_jax import provenance
from dds_jax import sampler
from dds_jax import train as train_lib
from dds_jax.configs import common

TSV = "certify.tsv"
SUMMARY = "summary.json"
PLOT = "certified_accuracy.png"
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "sigma",
           "p_lower")


def certify_dataset(config: ml_collections.ConfigDict, workdir: str, *,
                    params=None, bundle=None) -> dict[str, Any]:
  """Certifies the configured test examples and writes the result files.

  Args:
    config: a validated dds_jax config.
    workdir: holds `checkpoints/` (unless params are given) and receives
      certify.tsv, summary.json and certified_accuracy.png.
    params, bundle: an already loaded model (e.g. from a notebook); default:
      restore from the workdir.

  Returns:
    The summary written to summary.json.
  """
  common.validate(config)
  cc = config.certify
  test_ds = train_lib.load_split(config, config.data.test_split)
  train_lib.check_dataset_fits(config, test_ds)
  ds = data_lib.select(test_ds, cc.skip, cc.max)
  if bundle is None or params is None:
    bundle, params = train_lib.restore_params(config, workdir,
                                              test_ds.image_shape)
  mesh = sampler.make_mesh(config.mesh.num_devices or None)
  key = jax.random.key(config.seed)
  sigma = float(config.noise.sigma)

  rows = {name: [] for name in COLUMNS}
  bar = progress_lib.Progress(len(ds), "certify", unit="examples")
  start = time.time()
  for lo in range(0, len(ds), cc.examples_per_call):
    part = ds.take(np.arange(lo, min(lo + cc.examples_per_call, len(ds))))
    t0 = time.time()
    cert = certify(
        bundle.apply_fn, params, part.images, sigma, key, n0=cc.n0, n=cc.n,
        alpha=cc.alpha, batch_size=cc.batch_size,
        num_classes=config.model.num_classes, example_ids=part.example_ids,
        samples_per_block=cc.samples_per_block, noise=config.noise.kind,
        mesh=mesh)
    per_example = (time.time() - t0) / len(part)
    rows["idx"] += part.example_ids.tolist()
    rows["label"] += part.labels.tolist()
    rows["predict"] += cert.pred.tolist()
    rows["radius"] += cert.radius.tolist()
    rows["correct"] += (cert.pred == part.labels).astype(int).tolist()
    rows["time"] += [per_example] * len(part)
    rows["sigma"] += cert.sigma.tolist()
    rows["p_lower"] += cert.p_lower.tolist()
    analysis.write_tsv(os.path.join(workdir, TSV), rows, COLUMNS)
    bar.update(lo + len(part))
  wall = time.time() - start

  summary = analysis.summarize(rows, cc.radii)
  summary.update({
      "dataset": ds.name, "split": ds.split, "noise": config.noise.kind,
      "sigma": sigma, "n0": cc.n0, "n": cc.n, "alpha": cc.alpha,
      "seed": config.seed, "wall_time_s": wall,
      "samples_per_s": len(ds) * (cc.n0 + cc.n) / max(wall, 1e-9),
      "provenance": provenance.collect(config)})
  analysis.write_text(os.path.join(workdir, SUMMARY),
                      json.dumps(summary, indent=2) + "\n")
  analysis.plot_certified_accuracy(
      {f"sigma={sigma:g}": (np.asarray(rows["radius"]),
                            np.asarray(rows["correct"]))},
      os.path.join(workdir, PLOT),
      title=f"{ds.name} ({len(ds)} test images), N={cc.n}, alpha={cc.alpha}")
  return summary
