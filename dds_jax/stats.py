"""Exact statistics of the smoothed classifier: where counts become a radius.

Everything here runs on the host in float64 with SciPy, on a handful of counts
per example: the Monte Carlo work is in `dds_jax.sampler`.

Also the paired comparison of two certification runs on the same examples:
McNemar's exact test (`binom_pvalue` on the discordant counts) and Newcombe's
interval for the paired difference (`paired_difference_interval`).

References:
  Cohen, Rosenfeld, Kolter. Certified Adversarial Robustness via Randomized
  Smoothing. ICML 2019 (CERTIFY and PREDICT, Clopper-Pearson bound).
  Newcombe. Improved confidence intervals for the difference between binomial
  proportions based on paired data. Statistics in Medicine 17, 1998
  (method 10: Wilson score intervals combined with the phi correlation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special
from scipy import stats as sps

from dds_jax.errors import InputError

ABSTAIN = -1


def _clopper_pearson_bound(k, n, tail: float, upper: bool = False
                          ) -> np.ndarray:
  """THE Clopper-Pearson formula: one end of the exact interval of k / n.

  The lower end is the p with P[Bin(n, p) >= k] = tail, the Beta(k, n - k + 1)
  quantile at tail (0 when k = 0); the upper end the p with P[Bin(n, p) <= k]
  = tail, the Beta(k + 1, n - k) quantile at 1 - tail (1 when k = n).

  Args:
    k: successes, float64 array in [0, n] (not checked).
    n: trials, float64 array >= 1 (not checked), broadcast with k.
    tail: the probability outside this end, in (0, 1).
    upper: the upper end instead of the lower one.

  Returns:
    float64 array of the shape of broadcast(k, n).
  """
  # Valid shape parameters are substituted where the end is fixed (k = 0 for
  # the lower end, k = n for the upper), where betaincinv would give NaN.
  if upper:
    return np.where(k == n, 1.0,
                    special.betaincinv(k + 1.0, np.maximum(n - k, 1.0),
                                       1.0 - tail))
  return np.where(k == 0, 0.0,
                  special.betaincinv(np.maximum(k, 1.0), n - k + 1.0, tail))


def lower_confidence_bound(n_a, n, alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) Clopper-Pearson lower bound of n_a / n.

  The p with P[Bin(n, p) >= n_a] = alpha: `beta.ppf(alpha, n_a, n - n_a + 1)`,
  0 when n_a = 0, which is statsmodels' `proportion_confint(n_a, n,
  alpha=2 * alpha, method="beta")[0]` and the lower end of
  `clopper_pearson_interval(n_a, n, 1 - 2 * alpha)`.

  Args:
    n_a: hits, int array (or scalar) in [0, n].
    n: trials, int array (or scalar) >= 1.
    alpha: one-sided failure probability in (0, 1).

  Returns:
    float64 array of the shape of broadcast(n_a, n).
  """
  n_a, n = np.broadcast_arrays(np.asarray(n_a, np.float64),
                               np.asarray(n, np.float64))
  return _clopper_pearson_bound(n_a, n, alpha)


def clopper_pearson_interval(
    k: Any, n: Any, level: float = 0.95) -> tuple[Any, Any]:
  """Two-sided exact (Clopper-Pearson) interval of a binomial proportion.

  Each end leaves (1 - level) / 2 outside: lo is `lower_confidence_bound(k,
  n, (1 - level) / 2)` (0 where k == 0), hi the Beta(k + 1, n - k) quantile
  at (1 + level) / 2 (1 where k == n).

  Args:
    k: successes (int or array of ints), 0 <= k <= n.
    n: trials (int or array, broadcast with `k`), n >= 1.
    level: confidence level in (0, 1).

  Returns:
    (lo, hi): floats for scalar inputs, else float64 arrays of the broadcast
    shape.

  Raises:
    InputError: on non-integer counts, k outside [0, n], n < 1 or a bad level.
  """
  if not 0.0 < level < 1.0:
    raise InputError(f"level must be in (0, 1), got {level}")
  k_arr = np.asarray(k)
  n_arr = np.asarray(n)
  for name, a in (("k", k_arr), ("n", n_arr)):
    if a.dtype.kind not in "iuf" or (
        a.dtype.kind == "f" and not np.all(a == np.round(a))):
      raise InputError(f"{name} must hold integers, got {a!r}")
  k_arr, n_arr = np.broadcast_arrays(k_arr.astype(np.float64),
                                     n_arr.astype(np.float64))
  if np.any(n_arr < 1) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
    raise InputError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
  tail = (1.0 - level) / 2.0
  lo = _clopper_pearson_bound(k_arr, n_arr, tail)
  hi = _clopper_pearson_bound(k_arr, n_arr, tail, upper=True)
  if lo.ndim == 0:
    return float(lo), float(hi)
  return lo, hi


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


def wilson_interval(k, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Wilson's score interval of k / n (no continuity correction)."""
  k = np.asarray(k, np.float64)
  n = np.asarray(n, np.float64)
  z = sps.norm.ppf(0.5 + level / 2.0)
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def paired_difference_interval(a, b, c, d, level: float = 0.95
                               ) -> tuple[float, float, float]:
  """Newcombe's interval for p1 - p2 from paired binary outcomes.

  The 2x2 table of the pairs: a = both 1, b = first 1 and second 0, c = first
  0 and second 1, d = both 0; p1 = (a + b) / n, p2 = (a + c) / n and the
  difference is (b - c) / n. Newcombe's (1998) method 10: the Wilson
  intervals (l1, u1) of p1 and (l2, u2) of p2 are combined with the phi
  coefficient of the table (0 when a margin is empty),

    lower = D - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
    upper = D + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2).

  Unlike Wald's interval it stays inside [-1, 1] and does not collapse to a
  point when b = c = 0.

  Returns:
    (difference, lower, upper).
  """
  a, b, c, d = (float(x) for x in (a, b, c, d))
  if min(a, b, c, d) < 0 or a + b + c + d < 1:
    raise InputError(f"need non-negative counts with n >= 1, got {(a, b, c, d)}")
  n = a + b + c + d
  p1, p2 = (a + b) / n, (a + c) / n
  l1, u1 = wilson_interval(a + b, n, level)
  l2, u2 = wilson_interval(a + c, n, level)
  denom = (a + b) * (c + d) * (a + c) * (b + d)
  phi = (a * d - b * c) / np.sqrt(denom) if denom > 0 else 0.0
  diff = p1 - p2
  lo = diff - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                          + (u2 - p2) ** 2, 0.0))
  hi = diff + np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                          + (p2 - l2) ** 2, 0.0))
  return float(diff), float(max(lo, -1.0)), float(min(hi, 1.0))


def radius_cap(sigma, n: int, alpha: float, noise: str = "gaussian"
               ) -> np.ndarray:
  """The largest radius CERTIFY can issue with n draws at level alpha.

  Every draw a hit gives the Clopper-Pearson bound alpha^(1/n), so the cap is
  sigma * Phi^-1(alpha^(1/n)) (gaussian): 0.80 at sigma 0.25, n = 10,000,
  alpha = 0.001. A certified accuracy at a larger radius is 0 by
  construction, not a measurement.
  """
  return radius_from_p_lower(lower_confidence_bound(n, n, alpha), sigma, noise)


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


def p_threshold(radius, sigma, noise: str = "gaussian") -> np.ndarray:
  """The p_A above which a radius is certified: `radius_from_p_lower`'s
  inverse, Phi(r / sigma) (gaussian) or 1/2 + r / (2 sigma) (uniform)."""
  radius = np.asarray(radius, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if noise == "gaussian":
    return sps.norm.cdf(radius / sigma)
  if noise == "uniform":
    return np.minimum(0.5 + radius / (2.0 * sigma), 1.0)
  raise ValueError(f"unknown noise {noise!r}")


# ---------------------------------------------------------------------------
# The randomized Clopper-Pearson bound and anytime-valid confidence
# sequences (Voracek et al., NeurIPS 2024, "Treatment of Statistical
# Estimation Problems in Randomized Smoothing").
# ---------------------------------------------------------------------------


def randomized_lower_bound(n_a, n, alpha: float, w) -> np.ndarray:
  """The randomized Clopper-Pearson lower bound of n_a / n.

  inf{p : P[Bin(n, p) > n_a] + w P[Bin(n, p) = n_a] > alpha}, with w ~ U(0,
  1) drawn independently of the hits. Its coverage is exactly 1 - alpha for
  every p (the randomized test is exact), and it is never below the plain
  bound `lower_confidence_bound` (w = 1 gives the plain bound). Where n_a = n
  and w <= alpha the set is empty (the bound would be 1, an infinite
  radius): there it takes the plain bound's value alpha^(1/n) instead, a
  smaller lower bound, so the guarantee holds.

  Args:
    n_a, n: hits and draws (arrays, broadcast).
    alpha: one-sided failure probability in (0, 1).
    w: uniform draws in [0, 1), one per bound.

  Returns:
    float64 array.
  """
  n_a, n, w = np.broadcast_arrays(np.asarray(n_a, np.float64),
                                  np.asarray(n, np.float64),
                                  np.asarray(w, np.float64))
  plain = _clopper_pearson_bound(n_a, n, alpha)
  # The tail is increasing in p: bisect on [plain, upper end of support].
  def tail(p):
    return (sps.binom.sf(n_a, n, p) + w * sps.binom.pmf(n_a, n, p))
  lo, hi = plain.copy(), np.ones_like(plain)
  # Where even p -> 1 leaves the tail <= alpha (n_a = n, w <= alpha), fall
  # back to the plain bound.
  empty = tail(np.nextafter(1.0, 0.0)) <= alpha
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    above = tail(mid) > alpha
    hi = np.where(above, mid, hi)
    lo = np.where(above, lo, mid)
  return np.where(empty, plain, lo)


def betting_log_wealth(hits, draws, p) -> np.ndarray:
  """log of the betting confidence sequence's wealth against p.

  The bettor's wealth after `hits` hits in `draws` draws, betting with the
  Krichevsky-Trofimov forecast q_t = (H_{t-1} + 1/2) / t, is the Beta(1/2,
  1/2) mixture B(H + 1/2, T - H + 1/2) / B(1/2, 1/2) / (p^H (1 - p)^(T - H)):
  it depends on the draws only through (H, T). By Ville's inequality the set
  {p : wealth(p) < 1 / alpha} covers the true p at every T at once with
  probability >= 1 - alpha.
  """
  h, t, p = np.broadcast_arrays(np.asarray(hits, np.float64),
                                np.asarray(draws, np.float64),
                                np.asarray(p, np.float64))
  mixture = (special.betaln(h + 0.5, t - h + 0.5) - special.betaln(0.5, 0.5))
  return mixture - special.xlogy(h, p) - special.xlog1py(t - h, -p)


SEQUENCES = ("betting", "union", "adaptive")
# The reference of Horvath et al. (ICLR 2022)-style adaptive sampling: stages
# ending at these draws, each looked at with Clopper-Pearson at alpha / 3.
ADAPTIVE_STAGES = (1_000, 10_000, 100_000)
ADAPTIVE_BETA = 1e-4
CERTIFIED, NOT_CERTIFIED, UNDECIDED = 1, -1, 0


def union_bound_alpha(k, alpha: float) -> np.ndarray:
  """alpha_k = alpha / (k (k + 1)) of the k-th checkpoint (k >= 1); they sum
  to alpha."""
  k = np.asarray(k, np.float64)
  return alpha / (k * (k + 1.0))


def sequence_decision(kind: str, hits, draws, threshold, alpha: float,
                      checkpoint=None) -> np.ndarray:
  """Is p_A above the threshold, below it, or not known yet?

  Args:
    kind: 'betting' (the betting confidence sequence, any T) or 'union'
      (Clopper-Pearson at checkpoint k, level alpha_k = alpha / (k (k + 1)):
      certified if the lower bound exceeds the threshold, not certified if
      the upper bound is below it).
    hits, draws: the estimation draws so far.
    threshold: p_threshold(r, sigma).
    alpha: the sequence's failure probability: a decision is wrong with
      probability <= alpha whenever it is taken.
    checkpoint: k >= 1 for 'union' (draws = T_0 2^(k - 1) or max_samples).
      'adaptive' (the reference, Horvath-style adaptive sampling: at each of
      the len(ADAPTIVE_STAGES) stages, certified if the Clopper-Pearson
      lower bound at alpha / 3 reaches the threshold, stopped as not
      certified if the upper bound at ADAPTIVE_BETA / 2 is below it) needs
      no checkpoint.

  Returns:
    int array: CERTIFIED (1), NOT_CERTIFIED (-1) or UNDECIDED (0).
  """
  h, t, th = np.broadcast_arrays(np.asarray(hits, np.float64),
                                 np.asarray(draws, np.float64),
                                 np.asarray(threshold, np.float64))
  if kind == "betting":
    # p outside the set iff wealth(p) >= 1/alpha. The likelihood is
    # unimodal at H/T, so all p <= threshold are out iff the threshold is
    # out and H/T > threshold (and all p >= threshold iff H/T < threshold).
    out = betting_log_wealth(h, t, th) >= np.log(1.0 / alpha)
    phat = h / np.maximum(t, 1.0)
    return np.where(out & (phat > th), CERTIFIED,
                    np.where(out & (phat < th), NOT_CERTIFIED, UNDECIDED))
  if kind == "union":
    if checkpoint is None:
      raise InputError("the union-bound sequence needs the checkpoint k")
    a = union_bound_alpha(checkpoint, alpha)
    lower = _clopper_pearson_bound(h, t, a)
    upper = _clopper_pearson_bound(h, t, a, upper=True)
    return np.where(lower > th, CERTIFIED,
                    np.where(upper < th, NOT_CERTIFIED, UNDECIDED))
  if kind == "adaptive":
    lower = _clopper_pearson_bound(h, t, alpha / len(ADAPTIVE_STAGES))
    upper = _clopper_pearson_bound(h, t, ADAPTIVE_BETA / 2, upper=True)
    return np.where(lower >= th, CERTIFIED,
                    np.where(upper < th, NOT_CERTIFIED, UNDECIDED))
  raise InputError(f"unknown confidence sequence {kind!r}; expected one of "
                   f"{SEQUENCES}")


def certificate_from_counts(counts0, counts, sigma, alpha: float,
                            noise: str = "gaussian", w=None):
  """Cohen's CERTIFY on counts already sampled.

  Args:
    counts0: [B, K] selection counts (n0 draws); top class c_A = argmax, ties to
      the lowest class index.
    counts: [B, K] estimation counts from fresh noise (n draws).
    sigma: [B] or scalar noise level.
    alpha: failure probability.
    noise: see `radius_from_p_lower`.
    w: None for the Clopper-Pearson bound; [B] uniforms for the randomized
      bound (`randomized_lower_bound`).

  Returns:
    (pred [B] int, radius [B] float64, p_lower [B] float64); pred is ABSTAIN
    and radius 0 where p_lower < 1/2.
  """
  counts0 = np.asarray(counts0)
  counts = np.asarray(counts)
  c_a = counts0.argmax(axis=1)
  n = counts.sum(axis=1)
  n_a = np.take_along_axis(counts, c_a[:, None], axis=1)[:, 0]
  p_lower = (lower_confidence_bound(n_a, n, alpha) if w is None else
             randomized_lower_bound(n_a, n, alpha, w))
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
