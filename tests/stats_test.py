"""Statistics against SciPy and closed forms, including n_A = 0 and n_A = n."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from dds_jax import analysis
from dds_jax import stats


def _lower_by_bisection(n_a, n, alpha):
  """The Clopper-Pearson lower bound by its definition, not by a Beta quantile.

  The p where P[Bin(n, p) >= n_a] (increasing in p) crosses alpha, found by
  bisection on log p over [log 5e-324, 0] to a relative 1e-13 (vectorised).
  Where n_a = 0 the tail is 1 for every p and the bisection ends at the
  smallest positive double, 0 to any tolerance.
  """
  n_a = np.asarray(n_a, np.float64)
  n = np.asarray(n, np.float64)
  lo, hi = np.full(n_a.shape, -745.0), np.zeros(n_a.shape)
  while np.max(hi - lo) > 1e-13:
    mid = 0.5 * (lo + hi)
    below = sps.binom.sf(n_a - 1, n, np.exp(mid)) < alpha
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return np.exp(0.5 * (lo + hi))


def _binom_tail(k, n, p, upper=True):
  """P[Bin(n, p) >= k] (upper) or P[Bin(n, p) <= k], summed in pure Python."""
  if p <= 0.0 or p >= 1.0:
    x = 0 if p <= 0.0 else n
    return float(x >= k if upper else x <= k)
  terms = range(k, n + 1) if upper else range(0, k + 1)
  return math.fsum(
      math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p)) for i in terms)


def _bisect(f, target, increasing):
  """The p in [0, 1] where the monotone f crosses target, to 1e-14."""
  lo, hi = 0.0, 1.0
  while hi - lo > 1e-14:
    mid = 0.5 * (lo + hi)
    if (f(mid) < target) == increasing:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def test_lower_confidence_bound_is_the_root_of_the_binomial_tail():
  rng = np.random.default_rng(0)
  n = rng.integers(1, 200_000, size=300)
  n_a = rng.integers(0, n + 1)
  n_a[:5], n_a[5:10] = 0, n[5:10]        # the edges
  n[10], n_a[10] = 1, 1
  for alpha in (0.001, 0.01, 0.05):
    got = stats.lower_confidence_bound(n_a, n, alpha)
    want = _lower_by_bisection(n_a, n, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert np.all(got[:5] == 0.0)
    np.testing.assert_allclose(got[5:11], alpha ** (1.0 / n[5:11]), rtol=1e-12)


def test_clopper_pearson_interval_is_the_roots_of_pure_python_tails():
  # Each end of the 1 - 2 tail interval leaves `tail` outside: lo is where
  # P[Bin(n, lo) >= k] = tail, hi where P[Bin(n, hi) <= k] = tail.
  cases = [(0, 1), (1, 1), (0, 7), (7, 7), (1, 7), (3, 10), (0, 50), (50, 50),
           (1, 50), (49, 50), (17, 40)]
  for level in (0.95, 0.998):
    tail = (1 - level) / 2
    k = np.array([c[0] for c in cases])
    n = np.array([c[1] for c in cases])
    lo, hi = stats.clopper_pearson_interval(k, n, level)
    for i, (ki, ni) in enumerate(cases):
      want_lo = _bisect(lambda p: _binom_tail(ki, ni, p), tail, True)
      want_hi = _bisect(lambda p: _binom_tail(ki, ni, p, upper=False), tail,
                        False)
      assert lo[i] == pytest.approx(want_lo, abs=1e-12), (ki, ni, level)
      assert hi[i] == pytest.approx(want_hi, abs=1e-12), (ki, ni, level)
      # The one-sided bound of CERTIFY is the lower end of this interval.
      assert stats.lower_confidence_bound(ki, ni, tail) == lo[i]
    assert lo[0] == lo[2] == lo[6] == 0.0 and hi[1] == hi[3] == hi[7] == 1.0


def test_analysis_interval_is_the_stats_one():
  assert analysis.clopper_pearson_interval is stats.clopper_pearson_interval


def test_lower_bound_equals_two_sided_interval_of_binomtest():
  # Clopper-Pearson one-sided at alpha = lower end of the two-sided 1 - 2 alpha.
  for n_a, n in [(0, 10), (1, 1), (7, 10), (99_990, 100_000), (100, 100)]:
    ci = sps.binomtest(n_a, n).proportion_ci(0.998, method="exact")
    assert stats.lower_confidence_bound(n_a, n, 0.001) == pytest.approx(
        ci.low, abs=1e-12)


def test_all_hits_bound_is_alpha_to_the_one_over_n():
  for n in (1, 100, 100_000):
    assert stats.lower_confidence_bound(n, n, 0.001) == pytest.approx(
        0.001 ** (1 / n), rel=1e-12)


def test_radius_cap_of_the_paper():
  # PAPER.md: with n = 100,000, alpha = 0.001, all hits: R = 3.81 sigma.
  p = stats.lower_confidence_bound(100_000, 100_000, 0.001)
  for sigma, want in [(0.12, 0.457), (0.25, 0.953), (0.5, 1.906), (1.0, 3.811)]:
    assert stats.radius_from_p_lower(p, sigma) == pytest.approx(want, abs=6e-4)


def test_certificate_from_counts_abstains_below_half_and_uses_selection():
  counts0 = np.array([[90, 10], [10, 90], [50, 50]])
  counts = np.array([[600, 400], [600, 400], [1000, 0]])
  pred, radius, p_lower = stats.certificate_from_counts(
      counts0, counts, [0.5, 0.5, 0.25], 0.001)
  # Row 0: c_A = 0 with 600/1000 -> p_lower ~0.56 -> certified.
  assert pred[0] == 0 and radius[0] > 0
  want = 0.5 * sps.norm.ppf(sps.beta.ppf(0.001, 600, 401))
  assert radius[0] == pytest.approx(want, rel=1e-12)
  # Row 1: selection picked class 1, but estimation gives it 400/1000.
  assert pred[1] == stats.ABSTAIN and radius[1] == 0
  assert p_lower[1] == pytest.approx(sps.beta.ppf(0.001, 400, 601))
  # Row 2: tie in selection goes to the lowest class.
  assert pred[2] == 0


def test_uniform_noise_gives_l1_radius():
  assert stats.radius_from_p_lower(0.9, 0.5, "uniform") == pytest.approx(0.4)
  assert stats.radius_from_p_lower(0.4, 0.5, "uniform") == 0.0


def test_binom_pvalue_matches_binomtest():
  rng = np.random.default_rng(1)
  n1 = rng.integers(0, 500, 50)
  n2 = rng.integers(0, 500, 50)
  want = [sps.binomtest(int(a), int(a + b), 0.5).pvalue if a + b else 1.0
          for a, b in zip(n1, n2)]
  np.testing.assert_allclose(stats.binom_pvalue(n1, n2), want, rtol=1e-12)


def test_prediction_from_counts():
  counts = np.array([[60, 40, 0], [0, 10, 990], [500, 490, 10]])
  # p-values: 60 vs 40 -> 0.057 (> 0.05 abstain, < 0.1 predict)
  np.testing.assert_array_equal(stats.prediction_from_counts(counts, 0.05),
                                [-1, 2, -1])
  np.testing.assert_array_equal(stats.prediction_from_counts(counts, 0.1),
                                [0, 2, -1])


def test_radius_cap_is_the_all_hits_certificate():
  n, alpha = 10_000, 0.001
  counts = np.array([[n, 0]])
  _, radius, _ = stats.certificate_from_counts(counts, counts, 0.25, alpha)
  assert stats.radius_cap(0.25, n, alpha) == pytest.approx(radius[0], abs=0)
  assert 0.79 < float(stats.radius_cap(0.25, n, alpha)) < 0.81
  np.testing.assert_allclose(stats.radius_cap(np.array([0.25, 0.5]), n, alpha),
                             [radius[0], 2 * radius[0]])


def test_wilson_interval_is_the_root_of_the_score_test():
  k, n, level = 7, 40, 0.95
  lo, hi = stats.wilson_interval(k, n, level)
  z = sps.norm.ppf(0.975)
  for p in (lo, hi):  # (k/n - p)^2 = z^2 p (1 - p) / n at both ends
    assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n)


def _exact_coverage(probs, n, level):
  """P[interval covers p1 - p2] for multinomial(n, probs) 2x2 tables."""
  from scipy.stats import multinomial
  truth = probs[1] - probs[2]
  covered = 0.0
  for a in range(n + 1):
    for b in range(n + 1 - a):
      for c in range(n + 1 - a - b):
        d = n - a - b - c
        _, lo, hi = stats.paired_difference_interval(a, b, c, d, level)
        if lo <= truth <= hi:
          covered += multinomial.pmf([a, b, c, d], n, probs)
  return covered


@pytest.mark.parametrize("probs", [
    (0.6, 0.1, 0.05, 0.25),   # two correlated runs, a few discordant pairs
    (0.3, 0.2, 0.2, 0.3),
    (0.85, 0.05, 0.0, 0.10),  # one side never wins (the main job's case)
])
def test_paired_difference_interval_has_nominal_exact_coverage(probs):
  # Exact coverage by enumerating every table of n = 30 pairs. Newcombe's
  # method 10 is close to nominal; Wald's interval (checked below on the third
  # point) falls far short when one discordant cell is empty.
  coverage = _exact_coverage(probs, 30, 0.95)
  assert coverage >= 0.93, coverage
  if probs[2] == 0.0:
    wald = 0.0
    from scipy.stats import multinomial
    for b in range(31):
      for a in range(31 - b):
        d = 30 - a - b
        diff = b / 30
        se = math.sqrt(max(b / 30 - diff * diff, 0.0) / 30)
        if diff - 1.96 * se <= 0.05 <= diff + 1.96 * se:
          wald += multinomial.pmf([a, b, 0, d], 30, probs)
    assert wald < 0.85


def test_paired_difference_interval_symmetry_and_degenerate_tables():
  d, lo, hi = stats.paired_difference_interval(36, 12, 2, 0)
  assert d == pytest.approx(0.2) and lo < d < hi
  d2, lo2, hi2 = stats.paired_difference_interval(36, 2, 12, 0)
  assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
  # No discordant pairs: the interval still has width and contains 0.
  d, lo, hi = stats.paired_difference_interval(20, 0, 0, 10)
  assert d == 0 and lo < 0 < hi
  for table in [(0, 30, 0, 0), (0, 0, 30, 0), (30, 0, 0, 0)]:
    _, lo, hi = stats.paired_difference_interval(*table)
    assert -1 <= lo <= hi <= 1
  with pytest.raises(stats.InputError):
    stats.paired_difference_interval(1, -1, 0, 0)
