r"""Where the sequential procedures' samples go: a host-only simulation.

Usage (from the repository root)::

  PYTHONPATH=. python bench/sequential_sim.py \
      --tsv=runs/digits/fixed_fixed/certify.tsv --n=10000 [--reps=20]

`bench/sequential.py` measures samples per decision with the model; this
asks why the means are what they are. Each image of a Cohen certification
TSV (fixed sigma, its `p_lower` at N = --n and alpha) gets its p_A back from
the Clopper-Pearson bound (the count n_A whose bound is p_lower; 0 for an
image whose top class is not its label, which no procedure may certify for
it), and Bernoulli(p_A) draws go through the same round schedule
(`certify.round_ends`) and decisions (`stats.sequence_decision`) as
`certify_at`, with no model. Printed per radius and procedure: the mean and
median samples (n0 included), the fraction that ran to max_samples and
their share of the mean. 'one-sided' is a variant not in the library: the
Beta(1/2, 1/2) mixture restricted (and renormalised) to p above the
threshold for certifying, and to p below it for stopping, each at alpha
(only a wrong certification breaks the guarantee).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import numpy as np
from scipy import special
from scipy import stats as sps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dds_jax import analysis  # pylint: disable=g-import-not-at-top
from dds_jax import stats  # pylint: disable=g-import-not-at-top
from dds_jax.certify import ROUND_GROWTH, round_ends  # pylint: disable=g-import-not-at-top

_TSV = flags.DEFINE_string('tsv', None, 'A fixed-sigma certify.tsv.')
_N = flags.DEFINE_integer('n', 10_000, "The TSV's N.")
_ALPHA = flags.DEFINE_float('alpha', 0.001, "The TSV's and the runs' alpha.")
_SIGMA = flags.DEFINE_float('sigma', 0.25, 'sigma.')
_N0 = flags.DEFINE_integer('n0', 100, 'Selection draws (counted).')
_MAX = flags.DEFINE_integer('max_samples', 100_000, 'max_samples.')
_REPS = flags.DEFINE_integer('reps', 20, 'Simulated runs per image.')
_RADII = flags.DEFINE_list('radii', ['0.25', '0.5', '0.75'], 'Radii.')


def p_from_tsv(path: str, n: int, alpha: float) -> np.ndarray:
  cols = analysis.read_tsv(path)
  k = np.arange(n + 1)
  bound = np.where(k > 0, sps.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0)
  n_a = np.searchsorted(bound, np.asarray(cols['p_lower'], float) - 1e-12)
  return np.where(np.asarray(cols['correct']) == 1, np.clip(n_a / n, 0, 1), 0)


def _one_sided(h, t, p0, alpha):
  a, b = h + 0.5, t - h + 0.5
  base = (special.betaln(a, b) - special.betaln(0.5, 0.5)
          - special.xlogy(h, p0) - special.xlog1py(t - h, -p0))
  with np.errstate(divide='ignore'):
    up = (base + np.log(special.betainc(b, a, 1 - p0))
          - np.log(special.betainc(0.5, 0.5, 1 - p0)))
    down = (base + np.log(special.betainc(a, b, p0))
            - np.log(special.betainc(0.5, 0.5, p0)))
  level = np.log(1 / alpha)
  return np.where(up >= level, stats.CERTIFIED,
                  np.where(down >= level, stats.NOT_CERTIFIED,
                           stats.UNDECIDED))


def simulate(p, kind, threshold, rng):
  """Samples used per image (n0 included) in one simulated run."""
  if kind == 'adaptive':  # stages ending at these draws
    ends = list(stats.ADAPTIVE_STAGES)
  else:
    ends = round_ends(_MAX.value, 100, 100,
                      ROUND_GROWTH.get(kind, ROUND_GROWTH['betting']))
  hits = np.zeros(len(p))
  decision = np.zeros(len(p), int)
  used = np.zeros(len(p))
  prev = 0
  for k, end in enumerate(ends, start=1):
    run = decision == stats.UNDECIDED
    hits[run] += rng.binomial(end - prev, p[run])
    draws = end
    if kind == 'one-sided':
      d = _one_sided(hits, draws, threshold, _ALPHA.value)
    else:
      d = stats.sequence_decision(kind, hits, draws, threshold, _ALPHA.value,
                                  checkpoint=k)
    new = run & (d != stats.UNDECIDED)
    decision[new] = d[new]
    used[run] = end
    prev = end
  return used + _N0.value, ends[-1] + _N0.value


def main(argv):
  del argv
  if not _TSV.value:
    raise app.UsageError('--tsv is required')
  p = p_from_tsv(_TSV.value, _N.value, _ALPHA.value)
  rng = np.random.default_rng(0)
  print(f'{len(p)} images from {_TSV.value}; {_REPS.value} runs each')
  print('| r | procedure | mean samples | median | ran to max | their share '
        'of the mean |')
  print('| --: | --- | --: | --: | --: | --: |')
  for r in (float(v) for v in _RADII.value):
    th = float(stats.p_threshold(r, _SIGMA.value))
    for kind in ('betting', 'union', 'adaptive', 'one-sided'):
      runs = [simulate(p, kind, th, rng) for _ in range(_REPS.value)]
      s = np.stack([u for u, _ in runs])
      at_max = s >= runs[0][1]
      print(f'| {r:g} | {kind} | {s.mean():.0f} | {np.median(s):.0f} | '
            f'{at_max.mean():.3f} | {s[at_max].sum() / s.sum():.2f} |')


if __name__ == '__main__':
  app.run(main)
