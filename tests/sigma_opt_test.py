"""Per-input sigma: the ascent raises the proxy, vmapped = looped, floors hold."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as sps

from dds_jax import InputError
from dds_jax import data
from dds_jax import models
from dds_jax import sigma_opt


@pytest.fixture(scope="module")
def trained():
  """A small CNN trained on digits for a few hundred Adam steps (~5 s)."""
  train = data.load("digits", "train")
  test = data.load("digits", "test")
  bundle = models.build("small_cnn", 10, train.image_shape,
                        conv_features=(16, 32, 32))
  params = bundle.init(jax.random.key(0))
  tx = optax.adam(3e-3)
  opt = tx.init(params["params"])

  @jax.jit
  def step(p, opt, x, y, key):
    x = x + 0.25 * jax.random.normal(key, x.shape)
    def loss(q):
      logits = bundle.apply_fn({"params": q}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt

  p = params["params"]
  rng = np.random.default_rng(0)
  for i in range(300):
    idx = rng.integers(0, len(train), 64)
    p, opt = step(p, opt, train.images[idx], train.labels[idx],
                  jax.random.key(i))
  return bundle, {"params": p}, test


def test_radius_proxy_matches_the_formula_in_float64():
  # A binary linear f; psi and the proxy recomputed in numpy float64.
  def apply_fn(params, x):
    z = x.reshape(x.shape[0], -1).sum(-1) - params
    return jnp.stack([-z, z], -1) * 3.0
  x = jnp.full((2, 2, 1), 0.3)
  eps = jax.random.normal(jax.random.key(0), (4000, 2, 2, 1))
  for sigma, clip in [(0.5, (0.02, 0.98)), (0.05, (0.02, 0.98)),
                      (0.5, (0.001, 0.999))]:
    got = sigma_opt.radius_proxy(apply_fn, 1.0, x, sigma, eps, clip)
    z = (0.3 * 4 + sigma * np.asarray(eps, np.float64).sum((1, 2, 3))) - 1.0
    logits = np.stack([-z, z], -1) * 3.0
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    psi = (soft / soft.sum(-1, keepdims=True)).mean(0)
    p1, p2 = np.clip(np.sort(psi)[::-1], *clip)
    want = sigma / 2 * (sps.norm.ppf(p1) - sps.norm.ppf(p2))
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-6)
  # Uniform noise: the L1 proxy s (p1 - p2).
  got = sigma_opt.radius_proxy(apply_fn, 1.0, x, 0.5, eps, kind="uniform")
  assert 0 <= float(got) <= 0.5


def test_ascent_raises_the_proxy_on_average(trained):
  bundle, params, test = trained
  x, ids = test.images[:48], test.example_ids[:48]
  sigma, info = sigma_opt.optimize_sigma(
      bundle.apply_fn, params, x, 0.25, jax.random.key(1), steps=50, lr=0.02,
      num_samples=16, example_ids=ids, return_info=True)
  assert np.abs(sigma - 0.25).mean() > 0.01           # sigma moved
  before = sigma_opt.evaluate_proxy(bundle.apply_fn, params, x, 0.25,
                                    jax.random.key(2), example_ids=ids)
  after = sigma_opt.evaluate_proxy(bundle.apply_fn, params, x, sigma,
                                   jax.random.key(2), example_ids=ids)
  assert after.mean() > before.mean()
  assert info.trajectory.shape == (51, 48)
  assert info.sigmas.shape == (51, 48)
  np.testing.assert_allclose(info.sigmas[0], 0.25)
  np.testing.assert_allclose(info.sigmas[-1], sigma, rtol=1e-6)
  assert info.nonfinite_steps.sum() == 0


def test_vmapped_equals_per_example_loop(trained):
  bundle, params, test = trained
  x, ids = test.images[:5], test.example_ids[:5]
  kw = dict(steps=15, lr=0.02, num_samples=8)
  batched = sigma_opt.optimize_sigma(bundle.apply_fn, params, x,
                                     np.linspace(0.2, 0.3, 5),
                                     jax.random.key(3), example_ids=ids, **kw)
  looped = [sigma_opt.optimize_sigma(bundle.apply_fn, params, x[i:i + 1],
                                     np.linspace(0.2, 0.3, 5)[i],
                                     jax.random.key(3), example_ids=ids[i:i + 1],
                                     **kw)[0] for i in range(5)]
  np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-7)


def test_sigma_never_falls_below_sigma_min(trained):
  bundle, params, test = trained
  # A huge step size throws sigma far; the floor holds.
  sigma, info = sigma_opt.optimize_sigma(
      bundle.apply_fn, params, test.images[:16], 0.25, jax.random.key(4),
      steps=20, lr=50.0, num_samples=2, sigma_min=0.05, return_info=True)
  assert np.all(sigma >= 0.05) and np.all(info.sigmas >= 0.05)
  # And it binds: some steps are thrown below it and clamped to it exactly.
  assert info.sigmas.min() == pytest.approx(0.05, rel=0, abs=1e-7)
  assert np.sum(np.isclose(info.sigmas[1:], 0.05, rtol=0, atol=1e-7)) >= 2


def test_nonfinite_gradients_are_skipped_and_reported():
  def apply_fn(params, x):
    z = x.reshape(x.shape[0], -1).sum(-1)
    # d/dsigma of sqrt(|.|) at 0 is infinite for the first example (x = 0).
    return jnp.stack([jnp.sqrt(jnp.abs(z)) * 0 + z * params, -z], -1)
  x = np.zeros((2, 2, 2, 1), np.float32)
  x[1] = 0.5
  # NaN-producing model: logits NaN for any input -> gradients NaN.
  def nan_fn(params, x):
    return apply_fn(params, x) * jnp.nan
  sigma, info = sigma_opt.optimize_sigma(nan_fn, 1.0, x, 0.3,
                                         jax.random.key(0), steps=5, lr=0.1,
                                         return_info=True)
  np.testing.assert_array_equal(info.nonfinite_steps, [5, 5])
  np.testing.assert_allclose(sigma, 0.3)              # unchanged, not NaN


def test_optax_optimizer_and_uniform_noise(trained):
  bundle, params, test = trained
  x = test.images[:8]
  s_adam = sigma_opt.optimize_sigma(bundle.apply_fn, params, x, 0.25,
                                    jax.random.key(5), steps=10,
                                    optimizer=optax.adam(0.01))
  assert np.all(np.isfinite(s_adam)) and np.abs(s_adam - 0.25).max() > 0.01
  s_l1 = sigma_opt.optimize_sigma(bundle.apply_fn, params, x, 0.5,
                                  jax.random.key(5), steps=10, lr=0.05,
                                  num_samples=8, noise="uniform")
  assert np.all(np.isfinite(s_l1)) and np.abs(s_l1 - 0.5).max() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma0=0.0), "sigma"),
    (dict(sigma0=0.005), "sigma_min"),
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(lr=float("nan")), "lr"),
    (dict(clip=(0.5, 0.4)), "clip"),
    (dict(num_samples=0), "num_samples"),
    (dict(steps=-1), "steps"),
    (dict(noise="cauchy"), "noise"),
])
def test_bad_arguments(trained, kwargs, match):
  bundle, params, test = trained
  args = dict(sigma0=0.25)
  args.update(kwargs)
  with pytest.raises(InputError, match=match):
    sigma_opt.optimize_sigma(bundle.apply_fn, params, test.images[:2],
                             args.pop("sigma0"), jax.random.key(0), **args)


_CHILD = r"""
import json, jax, numpy as np
import dds_jax
from dds_jax import models, sigma_opt
assert len(jax.devices()) == 2
bundle = models.build("small_cnn", 10, (8, 8, 1), conv_features=(8, 8, 8))
params = bundle.init(jax.random.key(0))
x = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
out = {}
for ndev in (1, 2):
  s = sigma_opt.optimize_sigma(bundle.apply_fn, params, x, 0.25,
                               jax.random.key(1), steps=10, lr=0.05,
                               num_samples=4, examples_per_device=2,
                               mesh=dds_jax.make_mesh(ndev))
  out[ndev] = s.tolist()
print(json.dumps(out))
"""


def test_two_devices_give_the_same_sigma():
  import json, subprocess, sys
  from tests import conftest
  res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True,
                       text=True, env=conftest.subprocess_env(2), timeout=300,
                       cwd=conftest.REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  bundle = models.build("small_cnn", 10, (8, 8, 1), conv_features=(8, 8, 8))
  params = bundle.init(jax.random.key(0))
  x = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
  here = sigma_opt.optimize_sigma(bundle.apply_fn, params, x, 0.25,
                                  jax.random.key(1), steps=10, lr=0.05,
                                  num_samples=4, examples_per_device=2)
  # Same noise and same per-device program: equal up to float32 rounding
  # (the 2-device process runs XLA's CPU kernels with another thread pool).
  np.testing.assert_allclose(out["1"], out["2"], rtol=1e-6)
  np.testing.assert_allclose(out["1"], here, rtol=1e-6)
  assert np.abs(here - 0.25).max() > 1e-3


def test_sigma_fn_is_keyed_by_content_not_position(trained):
  bundle, params, test = trained
  fn = sigma_opt.make_sigma_fn(bundle.apply_fn, params, 0.25,
                               jax.random.key(0), steps=5, lr=0.05,
                               num_samples=4)
  x = test.images[:4]
  together = fn(x)
  alone = np.array([fn(x[i:i + 1])[0] for i in (3, 1)])
  np.testing.assert_allclose(together[[3, 1]], alone, rtol=1e-6)
  np.testing.assert_allclose(fn(x[::-1])[::-1], together, rtol=1e-6)


def test_optax_optimizer_of_a_config_compiles_once(trained):
  """The config's optimizer is built once, so several certification calls
  reuse one compiled ascent (counted by JAX's compile events)."""
  bundle, params, test = trained[:3]
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    x = test.images[:4]
    for call in range(3):
      opt = sigma_opt.make_optimizer("adam", 0.01)
      sigma_opt.optimize_sigma(bundle.apply_fn, params, x, 0.25,
                               jax.random.key(call), steps=3, num_samples=2,
                               optimizer=opt, examples_per_device=4)
      if call == 0:
        first = len(compiles)
    assert first >= 1
    assert len(compiles) == first  # calls 2 and 3 compiled nothing
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert sigma_opt.make_optimizer("adam", 0.01) is sigma_opt.make_optimizer(
      "adam", 0.01)
  assert sigma_opt.make_optimizer("ascent", 0.01) is None
