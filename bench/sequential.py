r"""Samples per decision "certified at radius r?": sequences vs Cohen.

Usage (from the repository root)::

  PYTHONPATH=. python bench/sequential.py \
      --config=dds_jax/configs/digits.py --model=runs/digits/train_fixed \
      [--cohen_n=100000 | --cohen_tsv=runs/.../certify.tsv] \
      [--radii=0.25,0.5,0.75] [--max_samples=100000] [--max_examples=0] \
      [--out=bench/results/sequential_digits.json]

On the config's test images (Cohen's skip/max) at fixed sigma
(`noise.sigma`), for each radius r and each procedure of
`dds_jax.certify_at` ('betting', 'union', 'adaptive': the Horvath-style
staged reference), max_samples draws at most, it records the mean and median
samples per decision (n0 included), the fraction of decisions that ran to
n0 + max_samples (`reached_max`) and the mean of the others, certified
accuracy at r (certified and correct) with its 95% Clopper-Pearson
interval, and how often the decision
("certified at r with the label's class") agrees with Cohen's CERTIFY. Cohen
is run here at --cohen_n (n0 + N samples per image), or read from an
existing TSV of the same images (--cohen_tsv, e.g. the CIFAR-10 CPU study's
N = 10,000 run; its N is --cohen_n). The ratio columns divide by Cohen's
n0 + N and by the adaptive reference's mean.

Prints a Markdown table and writes the JSON (machine, load averages,
command) to --out.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top
from dds_jax import analysis  # pylint: disable=g-import-not-at-top
from dds_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from dds_jax import data as data_lib  # pylint: disable=g-import-not-at-top
from dds_jax import distributed  # pylint: disable=g-import-not-at-top
from dds_jax import stats  # pylint: disable=g-import-not-at-top
from dds_jax.certify import certify, certify_at  # pylint: disable=g-import-not-at-top

CONFIG = config_flags.DEFINE_config_file(
    'config', 'dds_jax/configs/digits.py', 'A dds_jax config (test set, n0, '
    'alpha, sigma, batch sizes).', lock_config=False)
MODEL = flags.DEFINE_string('model', 'runs/digits/train_fixed',
                            'Training workdir or export of the model.')
COHEN_N = flags.DEFINE_integer('cohen_n', 100_000, "Cohen's N.")
COHEN_TSV = flags.DEFINE_string(
    'cohen_tsv', '', "A Cohen certification TSV of the same images at "
    "--cohen_n (default: run Cohen's CERTIFY here).")
RADII = flags.DEFINE_list('radii', ['0.25', '0.5', '0.75'], 'Radii.')
MAX_SAMPLES = flags.DEFINE_integer('max_samples', 100_000,
                                   'The most estimation draws per decision.')
MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0,
                                    'Only the first this many images (0: all).')
SEQUENCES = flags.DEFINE_list('sequences', list(stats.SEQUENCES),
                              'Procedures of certify_at.')
OUT = flags.DEFINE_string('out', 'bench/results/sequential.json',
                          'Where the JSON goes.')


def _load(config):
  test = data_lib.load_split(config, config.data.test_split)
  ds = data_lib.select(test, config.certify.skip, config.certify.max)
  if MAX_EXAMPLES.value:
    ds = ds.take(np.arange(min(MAX_EXAMPLES.value, len(ds))))
  export = os.path.join(MODEL.value, 'export')
  with config.unlocked():
    config.certify.checkpoint = (
        export if os.path.isdir(export) else MODEL.value)
  bundle, params = ckpt_lib.restore_params(config, MODEL.value,
                                           ds.image_shape)
  return ds, bundle, distributed.replicate(params, distributed.make_mesh())


def _cohen(config, ds, bundle, params, key):
  """(radius, pred) per image from --cohen_tsv or a run at --cohen_n."""
  cc = config.certify
  if COHEN_TSV.value:
    cols = analysis.read_tsv(COHEN_TSV.value)
    by_id = dict(zip(cols['idx'].tolist(), range(len(cols['idx']))))
    rows = [by_id[int(i)] for i in ds.example_ids]
    return (np.asarray(cols['radius'])[rows],
            np.asarray(cols['predict'])[rows], None)
  t0 = time.time()
  radius, pred = [], []
  for lo in range(0, len(ds), cc.examples_per_call):
    part = ds.take(np.arange(lo, min(lo + cc.examples_per_call, len(ds))))
    c = certify(bundle.apply_fn, params, part.images, config.noise.sigma, key,
                n0=cc.n0, n=COHEN_N.value, alpha=cc.alpha,
                batch_size=cc.batch_size, example_ids=part.example_ids,
                samples_per_block=cc.samples_per_block,
                noise=config.noise.kind)
    radius.append(c.radius)
    pred.append(c.pred)
  return np.concatenate(radius), np.concatenate(pred), time.time() - t0


def main(argv):
  del argv
  config = CONFIG.value
  cc = config.certify
  import jax  # pylint: disable=g-import-not-at-top
  key = jax.random.key(config.seed)
  ds, bundle, params = _load(config)
  result = common.machine(num_examples=len(ds), n0=cc.n0, alpha=cc.alpha,
                          sigma=config.noise.sigma, cohen_n=COHEN_N.value,
                          max_samples=MAX_SAMPLES.value, cases=[])
  start = time.time()
  c_radius, c_pred, c_wall = _cohen(config, ds, bundle, params, key)
  result['cohen_wall_s'] = c_wall
  labels = ds.labels
  cohen_samples = cc.n0 + COHEN_N.value
  for r in (float(v) for v in RADII.value):
    cohen_yes = (c_pred == labels) & (c_radius >= r)
    k = int(cohen_yes.sum())
    lo, hi = stats.clopper_pearson_interval(k, len(ds), 0.95)
    result['cases'].append(dict(
        radius=r, procedure='cohen', mean_samples=float(cohen_samples),
        median_samples=float(cohen_samples), certified_accuracy=k / len(ds),
        ci_low=float(lo), ci_high=float(hi), agreement=1.0))
    for seq in SEQUENCES.value:
      t0 = time.time()
      dec = []
      for a in range(0, len(ds), cc.examples_per_call):
        part = ds.take(np.arange(a, min(a + cc.examples_per_call, len(ds))))
        dec.append(certify_at(
            bundle.apply_fn, params, part.images, config.noise.sigma, key, r,
            cc.alpha, n0=cc.n0, max_samples=MAX_SAMPLES.value, sequence=seq,
            batch_size=cc.batch_size, example_ids=part.example_ids,
            samples_per_block=cc.samples_per_block, noise=config.noise.kind))
      certified = np.concatenate([d.certified for d in dec])
      pred = np.concatenate([d.pred for d in dec])
      samples = np.concatenate([d.samples for d in dec]).astype(np.float64)
      yes = certified & (pred == labels)
      k = int(yes.sum())
      lo, hi = stats.clopper_pearson_interval(k, len(ds), 0.95)
      result['cases'].append(dict(
          radius=r, procedure=seq, mean_samples=float(samples.mean()),
          median_samples=float(np.median(samples)),
          certified_accuracy=k / len(ds), ci_low=float(lo), ci_high=float(hi),
          agreement=float(np.mean(yes == cohen_yes)),
          reached_max=float(np.mean(samples >= cc.n0 + MAX_SAMPLES.value)),
          mean_samples_below_max=(
              float(samples[samples < cc.n0 + MAX_SAMPLES.value].mean())
              if (samples < cc.n0 + MAX_SAMPLES.value).any() else None),
          wall_s=time.time() - t0))
      print(f'r={r:g} {seq}: mean {samples.mean():.0f} samples, certified '
            f'{k / len(ds):.3f}', flush=True)
  result['wall_s'] = time.time() - start
  result['loadavg_end'] = list(os.getloadavg())
  adaptive = {c['radius']: c['mean_samples'] for c in result['cases']
              if c['procedure'] == 'adaptive'}
  lines = ['| r | procedure | mean samples | median | / (n0 + N) | / adaptive '
           '| certified accuracy | agrees with Cohen |',
           '| --: | --- | --: | --: | --: | --: | --- | --: |']
  for c in result['cases']:
    c['ratio_to_cohen'] = c['mean_samples'] / cohen_samples
    base = adaptive.get(c['radius'])
    c['ratio_to_adaptive'] = c['mean_samples'] / base if base else None
    lines.append(
        f"| {c['radius']:g} | {c['procedure']} | {c['mean_samples']:.0f} | "
        f"{c['median_samples']:.0f} | {c['ratio_to_cohen']:.4f} | "
        + ('-' if base is None else f"{c['ratio_to_adaptive']:.2f}") +
        f" | {c['certified_accuracy']:.3f} [{c['ci_low']:.3f}, "
        f"{c['ci_high']:.3f}] | {c['agreement']:.3f} |")
  print('\n'.join(lines))
  result['table'] = lines
  common.write_result(OUT.value, result)


if __name__ == '__main__':
  app.run(main)
