"""Dual randomized smoothing (dds_jax.dual): soundness on closed forms,
invariance, targets, and clear errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from dds_jax import InputError
from dds_jax import dual
from dds_jax import stats
from dds_jax.configs import common
from dds_jax.configs import digits as digits_config
from dds_jax.errors import ConfigError
from tests import conftest

# Two features in [0, 1] as [B, 1, 1, 2] images. The classifier is class 1 iff
# w.x > b; the selector picks S[1] iff v.x > c. Smoothing a halfspace keeps
# its boundary (for any sigma), so the true distances from x to the smoothed
# classifier's and the smoothed selector's boundaries are |w.x - b| / |w| and
# |v.x - c| / |v|, and the true classes are the two signs.
W, B = np.array([1.0, 0.5]), 0.75   # both boundaries through (0.5, 0.5)
V, C = np.array([-0.3, 1.0]), 0.35
SIGMAS = (0.25, 0.5)


def _halfspace(params, x):
  z = x.reshape(x.shape[0], 2) @ params["w"] - params["b"]
  return jnp.stack([jnp.zeros_like(z), z], axis=-1)


CLF = {"w": jnp.asarray(W, jnp.float32), "b": jnp.float32(B)}
SEL = {"w": jnp.asarray(V, jnp.float32), "b": jnp.float32(C)}


def _inputs(num, seed=0):
  """Points in [0, 1] pixel space near both boundaries (distances < 0.4)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.2, 0.8, size=(num, 2))
  return x.reshape(num, 1, 1, 2).astype(np.float32)


def _truth(x):
  flat = x.reshape(-1, 2).astype(np.float64)
  zc, zs = flat @ W - B, flat @ V - C
  return ((zc > 0).astype(int), np.abs(zc) / np.linalg.norm(W),
          (zs > 0).astype(int), np.abs(zs) / np.linalg.norm(V))


def _cert(x, key, **kw):
  kw = {"n0": 20, "n": 200, "alpha": 0.2, "samples_per_block": 20,
        "batch_size": 400, **kw}
  return dual.certify_dual(_halfspace, CLF, _halfspace, SEL, x, SIGMAS, 0.5,
                           key, example_ids=np.arange(len(x)), **kw)


def test_failure_rates_are_at_most_alpha_on_closed_forms():
  x = _inputs(40)
  cls, d_c, idx, d_s = _truth(x)
  fails = {"selector": 0, "classifier": 0, "dual": 0, "max": 0}
  issued = 0
  trials = 60
  for t in range(trials):
    c = _cert(x, jax.random.key(1000 + t))
    sel_ok = c.sigma_index >= 0
    clf_ok = c.radius_c > 0
    fails["selector"] += int(np.sum(sel_ok & ((c.sigma_index != idx) |
                                              (c.radius_sigma > d_s))))
    fails["classifier"] += int(np.sum(clf_ok & (c.radius_c > d_c)))
    ok = c.pred >= 0
    issued += int(np.sum(ok))
    fails["dual"] += int(np.sum(ok & ((c.pred != cls) | (c.sigma_index != idx)
                                      | (c.radius > np.minimum(d_s, d_c)))))
    # What the minimum protects against: the larger radius alone.
    fails["max"] += int(np.sum(ok & (np.maximum(c.radius_sigma, c.radius_c)
                                     > np.minimum(d_s, d_c))))
  total = trials * len(x)
  tol = lambda a: a + 3 * np.sqrt(a * (1 - a) / total)
  assert fails["selector"] / total <= tol(0.1)   # alpha_sigma = 0.5 * 0.2
  assert fails["classifier"] / total <= tol(0.1)  # alpha_c
  assert fails["dual"] / total <= tol(0.2)
  assert issued > total / 2                        # not vacuous
  assert fails["max"] / total > 0.3                # the test has power


def test_radius_is_the_smaller_and_abstains_with_the_selector():
  x = _inputs(40, seed=1)
  c = _cert(x, jax.random.key(3))
  ok = c.pred >= 0
  np.testing.assert_array_equal(c.radius[ok],
                                np.minimum(c.radius_sigma, c.radius_c)[ok])
  assert np.all(c.radius[~ok] == 0)
  assert np.all(c.pred[c.sigma_index < 0] == stats.ABSTAIN)
  np.testing.assert_array_equal(
      c.sigma[c.sigma_index >= 0],
      np.asarray(SIGMAS, np.float32)[c.sigma_index[c.sigma_index >= 0]])
  # The selector's counts follow its closed form: P(v.(x + e) > c) at s_e.
  sel = dual.select(_halfspace, SEL, x, SIGMAS, 0.5, jax.random.key(3), 20,
                    4000, 0.1, samples_per_block=20,
                    example_ids=np.arange(len(x)))
  p1 = sps.norm.cdf((x.reshape(-1, 2) @ V - C) / (0.5 * np.linalg.norm(V)))
  np.testing.assert_allclose(sel.counts[:, 1] / 4000, p1, atol=0.04)


def test_the_same_rows_in_any_order_and_batch_size():
  x = _inputs(12, seed=2)
  ids = np.arange(500, 512)
  key = jax.random.key(5)
  kw = dict(n0=20, n=300, alpha=0.01, samples_per_block=20)
  ref = dual.certify_dual(_halfspace, CLF, _halfspace, SEL, x, SIGMAS, 0.5,
                          key, example_ids=ids, batch_size=400, **kw)
  perm = np.random.default_rng(0).permutation(12)
  other = dual.certify_dual(_halfspace, CLF, _halfspace, SEL, x[perm], SIGMAS,
                            0.5, key, example_ids=ids[perm], batch_size=60,
                            **kw)
  for name in ("pred", "radius", "sigma_index", "radius_sigma", "radius_c"):
    np.testing.assert_array_equal(getattr(other, name),
                                  getattr(ref, name)[perm], err_msg=name)


_CHILD = r"""
import json, jax, numpy as np
import dds_jax
from dds_jax import dual
from tests import dual_test as t
assert len(jax.devices()) == 2, jax.devices()
x = t._inputs(9, seed=4)
out = {}
for ndev in (1, 2):
  c = dual.certify_dual(t._halfspace, t.CLF, t._halfspace, t.SEL, x, t.SIGMAS,
                        0.5, jax.random.key(9), n0=20, n=300, alpha=0.01,
                        samples_per_block=20, batch_size=100,
                        example_ids=np.arange(9), mesh=dds_jax.make_mesh(ndev))
  out[ndev] = {"radius": c.radius.tolist(), "pred": c.pred.tolist(),
               "index": c.sigma_index.tolist()}
print(json.dumps(out))
"""


def test_one_and_two_devices_give_identical_certificates():
  res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True,
                       text=True, env=conftest.subprocess_env(2), timeout=300,
                       cwd=conftest.REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["1"] == out["2"]
  here = dual.certify_dual(_halfspace, CLF, _halfspace, SEL, _inputs(9, 4),
                           SIGMAS, 0.5, jax.random.key(9), n0=20, n=300,
                           alpha=0.01, samples_per_block=20, batch_size=100,
                           example_ids=np.arange(9))
  assert out["1"]["radius"] == here.radius.tolist()


def test_targets_are_the_nearest_sigma_in_log():
  s = (0.15, 0.2, 0.25, 0.3)
  # The log midpoint of 0.15 and 0.2 is sqrt(0.03) = 0.1732.
  got = dual.targets_from_sigmas([0.01, 0.17, 0.175, 0.226, 0.2235, 0.9], s)
  np.testing.assert_array_equal(got, [0, 0, 1, 2, 1, 3])
  assert dual.fallback_index(s, 0.25) == 2


@pytest.mark.parametrize("sigmas,what", [
    ((), "empty"), ((0.25, 0.0), "> 0"), ((0.25, 0.25), "repeats"),
    ((0.2, float("nan")), "> 0")])
def test_bad_sigma_sets_are_clear_errors(sigmas, what):
  with pytest.raises(InputError, match=what):
    dual.check_sigmas(sigmas)
  c = digits_config.get_config("small")
  c.dual.sigmas = sigmas
  with pytest.raises(ConfigError, match=what):
    common.validate(c)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_alpha_split_outside_zero_one_is_a_clear_error(fraction):
  with pytest.raises(InputError, match="alpha_sigma_fraction"):
    dual.split_alpha(0.001, fraction)
  c = digits_config.get_config("small")
  c.dual.alpha_sigma_fraction = fraction
  with pytest.raises(ConfigError, match="alpha_sigma_fraction"):
    common.validate(c)
  assert dual.split_alpha(0.001, 0.25) == pytest.approx((0.00025, 0.00075))


def test_dual_needs_the_selector_method_and_a_selector():
  c = digits_config.get_config("small")
  c.certify.soundness = "dual"
  c.certify.sigma_method = "grid"
  with pytest.raises(ConfigError, match="sigma_method='selector'"):
    common.validate(c)
  c.certify.sigma_method = "selector"
  with pytest.raises(ConfigError, match="dual.selector"):
    common.validate(c)
  c.dual.selector = "/nonexistent/selector"
  common.validate(c)
  with pytest.raises(ConfigError, match="neither an export"):
    dual.load_selector(c, (8, 8, 1))
  c.dual.selector = ""
  with pytest.raises(ConfigError, match="dual.selector is empty"):
    dual.load_selector(c, (8, 8, 1))
