"""Exact statistics of the smoothed classifier: where counts become a radius.

Everything here runs on the host in float64 with SciPy, on a handful of counts
per example: the Monte Carlo work is in `dds_jax.sampler`.

References:
  Cohen, Rosenfeld, Kolter. Certified Adversarial Robustness via Randomized
  Smoothing. ICML 2019 (CERTIFY and PREDICT, Clopper-Pearson bound).
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

ABSTAIN = -1


def lower_confidence_bound(n_a, n, alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) Clopper-Pearson lower bound of n_a / n.

  Equals `beta.ppf(alpha, n_a, n - n_a + 1)`, 0 when n_a = 0, which is
  statsmodels' `proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]`.

  Args:
    n_a: hits, int array (or scalar) in [0, n].
    n: trials, int array (or scalar) >= 1.
    alpha: one-sided failure probability in (0, 1).

  Returns:
    float64 array of the shape of broadcast(n_a, n).
  """
  n_a = np.asarray(n_a, np.float64)
  n = np.asarray(n, np.float64)
  safe_a = np.maximum(n_a, 1.0)  # beta.ppf(., 0, b) is nan; we want 0.
  p = sps.beta.ppf(alpha, safe_a, n - n_a + 1.0)
  return np.where(n_a > 0, p, 0.0)


def binom_pvalue(n1, n2) -> np.ndarray:
  """Two-sided exact binomial test of n1 out of n1 + n2 at p = 1/2.

  Uses `scipy.stats.binomtest` (SciPy's `binom_test` is gone in >= 1.12).
  """
  n1 = np.atleast_1d(np.asarray(n1, np.int64))
  n2 = np.atleast_1d(np.asarray(n2, np.int64))
  out = np.empty(np.broadcast(n1, n2).shape, np.float64)
  for i, (a, b) in enumerate(zip(*np.broadcast_arrays(n1, n2))):
    out.flat[i] = 1.0 if a + b == 0 else sps.binomtest(int(a), int(a + b), 0.5).pvalue
  return out


def radius_from_p_lower(p_lower, sigma, noise: str = "gaussian") -> np.ndarray:
  """Certified radius for a lower bound p_lower >= 1/2 on the top class.

  Args:
    p_lower: lower confidence bound on P[f(x + e) = c_A].
    sigma: noise level: standard deviation (gaussian, L2 radius) or the
      half-width of U(-s, s) (uniform, L1 radius).
    noise: 'gaussian' (R = sigma * Phi^-1(p_lower)) or 'uniform'
      (R = 2 sigma (p_lower - 1/2)).

  Returns:
    float64 radius, 0 where p_lower < 1/2 (those examples abstain).
  """
  p_lower = np.asarray(p_lower, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if noise == "gaussian":
    r = sigma * sps.norm.ppf(np.clip(p_lower, 0.5, 1.0))
  elif noise == "uniform":
    r = 2.0 * sigma * (p_lower - 0.5)
  else:
    raise ValueError(f"unknown noise {noise!r}")
  return np.where(p_lower >= 0.5, r, 0.0)


def certificate_from_counts(counts0, counts, sigma, alpha: float,
                            noise: str = "gaussian"):
  """Cohen's CERTIFY on counts already sampled.

  Args:
    counts0: [B, K] selection counts (n0 draws); top class c_A = argmax, ties to
      the lowest class index.
    counts: [B, K] estimation counts from fresh noise (n draws).
    sigma: [B] or scalar noise level.
    alpha: failure probability.
    noise: see `radius_from_p_lower`.

  Returns:
    (pred [B] int, radius [B] float64, p_lower [B] float64); pred is ABSTAIN
    and radius 0 where p_lower < 1/2.
  """
  counts0 = np.asarray(counts0)
  counts = np.asarray(counts)
  c_a = counts0.argmax(axis=1)
  n = counts.sum(axis=1)
  n_a = np.take_along_axis(counts, c_a[:, None], axis=1)[:, 0]
  p_lower = lower_confidence_bound(n_a, n, alpha)
  radius = radius_from_p_lower(p_lower, np.broadcast_to(sigma, p_lower.shape),
                               noise)
  pred = np.where(p_lower >= 0.5, c_a, ABSTAIN).astype(np.int64)
  return pred, radius, p_lower


def prediction_from_counts(counts, alpha: float) -> np.ndarray:
  """Cohen's PREDICT: top class unless the binomial test can't separate it.

  Args:
    counts: [B, K] counts of n draws.
    alpha: the test's level.

  Returns:
    [B] int predictions, ABSTAIN where p-value(n1 vs n2) > alpha.
  """
  counts = np.asarray(counts)
  order = np.argsort(-counts, axis=1, kind="stable")
  top2 = np.take_along_axis(counts, order[:, :2], axis=1)
  pval = binom_pvalue(top2[:, 0], top2[:, 1])
  return np.where(pval > alpha, ABSTAIN, order[:, 0]).astype(np.int64)
