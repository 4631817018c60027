"""Sequential certification at a radius (certify_at), the confidence
sequences and the randomized Clopper-Pearson bound: validity with power."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import dds_jax
from dds_jax import InputError
from dds_jax.certify import ROUND_GROWTH
from dds_jax.certify import round_ends
from dds_jax import sampler
from dds_jax import stats

ALPHA = 0.1
DECISIONS = 100_000


def _simulate(kind, p, threshold, max_samples=20_000, seed=0):
  """Host-only: the rounds of certify_at on Bernoulli(p) draws."""
  rng = np.random.default_rng(seed)
  ends = (list(stats.ADAPTIVE_STAGES) if kind == "adaptive" else
          round_ends(max_samples, 100, 100, ROUND_GROWTH[kind]))
  ends = [t for t in ends if t < max_samples] + [max_samples]
  hits = np.zeros(DECISIONS, np.int64)
  decision = np.zeros(DECISIONS, np.int64)
  samples = np.zeros(DECISIONS, np.int64)
  done = 0
  for k, end in enumerate(ends, start=1):
    run = decision == stats.UNDECIDED
    hits[run] += rng.binomial(end - done, p, size=int(run.sum()))
    samples[run] = end
    decision[run] = stats.sequence_decision(kind, hits[run], end, threshold,
                                            ALPHA, checkpoint=k)
    done = end
  return decision, samples


def _binomial_tolerance(rate, n):
  return rate + 3 * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("kind", stats.SEQUENCES)
@pytest.mark.parametrize("gap", [0.0, 0.01])
def test_wrong_certifications_are_at_most_alpha(kind, gap):
  """p_A at the threshold or just below it: any certification is wrong."""
  threshold = float(sps.norm.cdf(0.5 / 0.25))   # r = 0.5, sigma = 0.25
  decision, _ = _simulate(kind, threshold - gap, threshold)
  wrong = np.mean(decision == stats.CERTIFIED)
  assert wrong <= _binomial_tolerance(ALPHA, DECISIONS)


def test_the_simulation_catches_peeking():
  """The test above has power: Clopper-Pearson at alpha, looked at after
  every round without a correction, certifies wrongly more than alpha."""
  threshold = float(sps.norm.cdf(0.5 / 0.25))
  rng = np.random.default_rng(0)
  hits = np.zeros(DECISIONS, np.int64)
  wrong = np.zeros(DECISIONS, bool)
  done = 0
  for end in round_ends(20_000, 100, 100):
    hits += rng.binomial(end - done, threshold, size=DECISIONS)
    wrong |= stats.lower_confidence_bound(hits, end, ALPHA) > threshold
    done = end
  assert np.mean(wrong) > _binomial_tolerance(ALPHA, DECISIONS)


@pytest.mark.parametrize("kind", stats.SEQUENCES)
def test_clear_cases_stop_early_and_right(kind):
  threshold = float(sps.norm.cdf(0.5 / 0.25))
  decision, samples = _simulate(kind, 0.995, threshold)
  assert np.mean(decision == stats.CERTIFIED) > 0.99
  assert np.median(samples) <= (1_000 if kind == "adaptive" else 3_200)
  decision, samples = _simulate(kind, 0.9, threshold)
  assert np.mean(decision == stats.NOT_CERTIFIED) > 0.99
  assert np.median(samples) <= (1_000 if kind == "adaptive" else 800)


def test_betting_wealth_is_the_product_of_kt_bets():
  rng = np.random.default_rng(1)
  x = rng.random(300) < 0.8
  log_w, h = 0.0, 0
  for t, xi in enumerate(x, start=1):
    q = (h + 0.5) / t
    log_w += np.log(q / 0.7) if xi else np.log((1 - q) / 0.3)
    h += int(xi)
  assert stats.betting_log_wealth(h, 300, 0.7) == pytest.approx(log_w,
                                                                rel=1e-9)
  # The order of the draws does not matter, only (H, T).
  assert stats.betting_log_wealth(h, 300, 0.7) == stats.betting_log_wealth(
      int(x[::-1].sum()), 300, 0.7)


def test_union_bound_levels_sum_to_alpha():
  k = np.arange(1, 10_000)
  assert stats.union_bound_alpha(k, 0.1).sum() == pytest.approx(0.1,
                                                                rel=1e-3)


def test_randomized_bound_has_exact_coverage_and_is_tighter():
  rng = np.random.default_rng(2)
  n, p = 50, 0.8
  k = rng.binomial(n, p, size=DECISIONS)
  w = rng.random(DECISIONS)
  lower = stats.randomized_lower_bound(k, n, ALPHA, w)
  plain = stats.lower_confidence_bound(k, n, ALPHA)
  assert np.all(lower >= plain - 1e-12)
  miss = np.mean(lower > p)  # exact: alpha, not below it like the plain one
  assert abs(miss - ALPHA) <= 3 * np.sqrt(ALPHA * (1 - ALPHA) / DECISIONS)
  assert np.mean(plain > p) < ALPHA - 0.02
  # w = 1 is the plain bound.
  np.testing.assert_allclose(stats.randomized_lower_bound(k[:50], n, ALPHA,
                                                          1.0),
                             plain[:50], rtol=1e-9)


def test_randomized_bound_at_all_hits_and_small_w_is_capped():
  n = 1000
  got = stats.randomized_lower_bound(n, n, 0.001, [0.0005, 0.0, 0.5])
  cap = 0.001 ** (1 / n)
  assert got[0] == pytest.approx(cap) and got[1] == pytest.approx(cap)
  assert cap < got[2] < 1.0          # w > alpha: a bound below 1
  assert np.all(np.isfinite(stats.radius_from_p_lower(got, 0.25)))


# The linear classifier: class 1 iff w.x > b, so p_A(x) = Phi(d / sigma) for
# the distance d of x to the boundary.
W, B = np.array([1.0, 0.5]), 0.75


def _linear(params, x):
  z = x.reshape(x.shape[0], 2) @ params["w"] - params["b"]
  return jnp.stack([jnp.zeros_like(z), z], axis=-1)


PARAMS = {"w": jnp.asarray(W, jnp.float32), "b": jnp.float32(B)}


def _at_distance(d, num):
  """num copies of a point at distance d on the class-1 side."""
  x0 = np.array([0.5, 0.5]) + d * W / np.linalg.norm(W)
  return np.tile(x0, (num, 1)).reshape(num, 1, 1, 2).astype(np.float32)


@pytest.mark.parametrize("sequence", stats.SEQUENCES)
def test_model_run_at_the_threshold_is_valid(sequence):
  """p_A exactly Phi(r / sigma): a certification is wrong, at most alpha."""
  r, num = 0.2, 2000
  x = _at_distance(r, num)
  d = dds_jax.certify_at(_linear, PARAMS, x, 0.25, jax.random.key(0), r,
                         ALPHA, n0=20, max_samples=3200, sequence=sequence,
                         example_ids=np.arange(num), samples_per_block=100,
                         batch_size=2000)
  assert np.mean(d.certified) <= _binomial_tolerance(ALPHA, num)
  assert np.all(d.pred[d.certified] == 1)
  # Well inside the certified region nearly all certify, with few draws.
  x = _at_distance(0.45, 200)
  d = dds_jax.certify_at(_linear, PARAMS, x, 0.25, jax.random.key(1), r,
                         ALPHA, n0=20, max_samples=3200, sequence=sequence,
                         example_ids=np.arange(200))
  first = stats.ADAPTIVE_STAGES[0] if sequence == "adaptive" else 400
  assert np.mean(d.certified) > 0.95 and np.median(d.samples) <= 20 + first
  assert np.all(d.radius[d.certified] == r)


def test_rounds_share_no_noise():
  """Round k draws blocks start_block... : its counts are those blocks'."""
  x = _at_distance(0.1, 3)
  key = jax.random.key(3)
  kw = dict(example_ids=np.arange(3), samples_per_block=50, batch_size=200)
  whole = sampler.sample_counts(_linear, PARAMS, x, 0.5, key, 300, **kw)
  first = sampler.sample_counts(_linear, PARAMS, x, 0.5, key, 100, **kw)
  rest = sampler.sample_counts(_linear, PARAMS, x, 0.5, key, 200,
                               start_block=2, **kw)
  np.testing.assert_array_equal(first + rest, whole)
  again = sampler.sample_counts(_linear, PARAMS, x, 0.5, key, 100,
                                start_block=0, **kw)
  np.testing.assert_array_equal(again, first)
  assert round_ends(1000, 150, 100) == [200, 400, 800, 1000]
  assert round_ends(1000, 100, 100, 1.25) == [100, 200, 300, 400, 500, 700,
                                              900, 1000]


def test_per_example_sigma_and_the_same_decisions_in_any_batch():
  x = np.concatenate([_at_distance(0.3, 4), _at_distance(0.05, 4)])
  sigma = np.array([0.25, 0.5] * 4)
  ids = np.arange(10, 18)
  a = dds_jax.certify_at(_linear, PARAMS, x, sigma, jax.random.key(4), 0.1,
                         0.01, n0=20, max_samples=5000, example_ids=ids)
  perm = np.random.default_rng(0).permutation(8)
  b = dds_jax.certify_at(_linear, PARAMS, x[perm], sigma[perm],
                         jax.random.key(4), 0.1, 0.01, n0=20,
                         max_samples=5000, example_ids=ids[perm],
                         batch_size=300)
  for name in ("certified", "samples", "hits", "pred"):
    np.testing.assert_array_equal(getattr(b, name), getattr(a, name)[perm])
  np.testing.assert_array_equal(a.sigma, sigma)


@pytest.mark.parametrize("kwargs,what", [
    (dict(radius=-0.1), "radius"),
    (dict(radius=float("nan")), "radius"),
    (dict(max_samples=0), "max_samples"),
    (dict(sequence="hoeffding"), "confidence sequence"),
])
def test_bad_input_is_a_clear_error(kwargs, what):
  args = dict(radius=0.5, max_samples=1000, sequence="betting")
  args.update(kwargs)
  with pytest.raises(InputError, match=what):
    dds_jax.certify_at(_linear, PARAMS, _at_distance(0.1, 2), 0.25,
                       jax.random.key(0), args.pop("radius"), **args)
