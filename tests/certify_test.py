"""CERTIFY / PREDICT against closed forms: linear and constant classifiers.

Probabilistic statements use fixed keys, so each test is deterministic; the
docstrings give the chance that a random key would fail them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import dds_jax
from dds_jax import InputError

D = (4, 4, 1)


def linear_apply(params, x):
  z = x.reshape(x.shape[0], -1) @ params["w"] + params["b"]
  return jnp.stack([-z, z], axis=-1)


def constant_apply(params, x):
  del params
  return jnp.tile(jnp.array([0.0, 1.0, 0.0]), (x.shape[0], 1))


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(0)
  w = rng.normal(size=int(np.prod(D))).astype(np.float32)
  params = {"w": jnp.asarray(w), "b": jnp.float32(-float(w.sum()) / 2)}
  x = rng.uniform(size=(60,) + D).astype(np.float32)
  z = x.reshape(len(x), -1).astype(np.float64) @ w + float(params["b"])
  dist = np.abs(z) / np.linalg.norm(w.astype(np.float64))
  return params, x, z, dist


def test_linear_radius_never_exceeds_true_distance(linear):
  """Union bound: a random key fails with probability <= 60 * 0.001."""
  params, x, z, dist = linear
  sigma = 0.5
  cert = dds_jax.certify(linear_apply, params, x, sigma, jax.random.key(1),
                         n0=100, n=20_000, alpha=0.001)
  certified = cert.pred != dds_jax.ABSTAIN
  assert certified.mean() > 0.5
  np.testing.assert_array_equal(cert.pred[certified], (z[certified] > 0))
  assert np.all(cert.radius[certified] <= dist[certified])
  # p_lower is below the true probability Phi(|z| / (sigma ||w||)).
  p_true = sps.norm.cdf(dist / sigma)
  assert np.all(cert.p_lower[certified] <= p_true[certified])


def test_linear_radius_approaches_true_distance_as_n_grows(linear):
  params, x, _, dist = linear
  sigma = 0.5
  # Examples whose true p_A is in (0.6, 0.99): the radius is not capped.
  keep = (dist / sigma > sps.norm.ppf(0.6)) & (dist / sigma < sps.norm.ppf(0.99))
  assert keep.sum() >= 5
  gaps = []
  for n in (1_000, 10_000, 200_000):
    cert = dds_jax.certify(linear_apply, params, x[keep], sigma,
                           jax.random.key(2), n0=100, n=n, alpha=0.001,
                           batch_size=2000)
    gaps.append(np.mean(dist[keep] - cert.radius))
  assert gaps[0] > gaps[1] > gaps[2] > 0
  assert gaps[2] < 0.05 * sigma


def test_counts_follow_the_closed_form_probability(linear):
  """Each check fails for a random key with probability ~1e-6 (5 sigma)."""
  params, x, z, dist = linear
  sigma, n = 0.5, 50_000
  counts = dds_jax.sample_counts(linear_apply, params, x[:10], sigma,
                                 jax.random.key(3), n)
  p_true = sps.norm.cdf(dist[:10] / sigma)
  hits = counts[np.arange(10), (z[:10] > 0).astype(int)]
  sd = np.sqrt(n * p_true * (1 - p_true))
  assert np.all(np.abs(hits - n * p_true) <= 5 * sd + 1)
  assert np.all(counts.sum(1) == n)


def test_constant_classifier_radius_is_sigma_phi_inv_alpha_pow_one_over_n():
  x = np.full((3,) + D, 0.5, np.float32)
  sigma = np.array([0.12, 0.25, 1.0])
  for n, alpha in [(1_000, 0.001), (100_000, 0.001), (500, 0.05)]:
    cert = dds_jax.certify(constant_apply, {}, x, sigma, jax.random.key(0),
                           n0=10, n=n, alpha=alpha)
    np.testing.assert_array_equal(cert.pred, [1, 1, 1])
    np.testing.assert_allclose(
        cert.radius, sigma * sps.norm.ppf(alpha ** (1 / n)), rtol=1e-6)


def test_l1_uniform_noise_on_linear_classifier(linear):
  """L1 certificates never exceed the true L1 distance |z| / ||w||_inf."""
  params, x, z, _ = linear
  w = np.asarray(params["w"], np.float64)
  dist_l1 = np.abs(z) / np.abs(w).max()
  cert = dds_jax.certify(linear_apply, params, x, 0.5, jax.random.key(4),
                         n0=100, n=20_000, alpha=0.001, noise="uniform")
  certified = cert.pred != dds_jax.ABSTAIN
  assert certified.any()
  assert np.all(cert.radius[certified] <= dist_l1[certified])


def test_predict_abstains_near_the_boundary_and_answers_far_from_it(linear):
  params, x, z, dist = linear
  preds = dds_jax.predict(linear_apply, params, x, 0.5, jax.random.key(5),
                          n=2_000, alpha=0.001)
  far = dist > 0.5
  np.testing.assert_array_equal(preds[far], (z[far] > 0).astype(int))
  # On the boundary itself (z = 0) both classes are equally likely.
  on = x[:1] * 0 + 0.5            # w.x + b = 0 at x = 0.5 by construction
  assert dds_jax.predict(linear_apply, params, on, 0.5, jax.random.key(6),
                         n=2_000)[0] == dds_jax.ABSTAIN


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(sigma=np.ones(5)), "sigma"),
    (dict(n0=0), "n0"),
    (dict(n=0), "n "),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.5), "alpha"),
    (dict(x=np.full((2,) + D, np.nan, np.float32)), "NaN"),
    (dict(x=np.full((2,) + D, 2.0, np.float32)), r"\[0, 1\]"),
    (dict(x=np.zeros((2,) + D, np.uint8)), "dtype"),
    (dict(x=np.zeros(D, np.float32)), "shape"),
    (dict(x=np.zeros((2, 5, 5, 1), np.float32)), "do not fit the model"),
    (dict(batch_size=50), "samples_per_block"),
    (dict(noise="laplace"), "noise"),
    (dict(num_classes=3), "num_classes"),
])
def test_bad_input_is_a_clear_error(linear, kwargs, match):
  params, x, _, _ = linear
  args = dict(x=x[:2], sigma=0.5, n0=10, n=10, alpha=0.001)
  args.update(kwargs)
  with pytest.raises(InputError, match=match):
    dds_jax.certify(linear_apply, params, args.pop("x"), args.pop("sigma"),
                    jax.random.key(0), **args)


def test_a_model_error_is_chained_not_hidden(linear):
  """'do not fit the model' keeps the model's own error as its cause."""
  params, x, _, _ = linear

  def broken(params, images):
    raise ZeroDivisionError("a bug inside the model")

  with pytest.raises(InputError, match="do not fit the model") as info:
    dds_jax.certify(broken, params, x[:2], 0.5, jax.random.key(0), n0=10,
                    n=10)
  assert isinstance(info.value.__cause__, ZeroDivisionError)
