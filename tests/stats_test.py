"""Statistics against SciPy and closed forms, including n_A = 0 and n_A = n."""

import numpy as np
import pytest
from scipy import stats as sps

from dds_jax import stats


def _reference_lower(n_a, n, alpha):
  # statsmodels' proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]
  return 0.0 if n_a == 0 else sps.beta.ppf(alpha, n_a, n - n_a + 1)


def test_lower_confidence_bound_matches_scipy_on_random_counts():
  rng = np.random.default_rng(0)
  n = rng.integers(1, 200_000, size=300)
  n_a = rng.integers(0, n + 1)
  n_a[:5], n_a[5:10] = 0, n[5:10]        # the edges
  for alpha in (0.001, 0.01, 0.05):
    got = stats.lower_confidence_bound(n_a, n, alpha)
    want = [_reference_lower(a, b, alpha) for a, b in zip(n_a, n)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


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
