"""Certificate-aware sigma (`sigma_opt.select_sigma_grid`): closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import dds_jax
from dds_jax import InputError
from dds_jax import noise
from dds_jax import sigma_opt
from dds_jax import stats

SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
W = np.ones(D) / np.sqrt(D)  # a unit direction
T = 0.5                       # slab half-width
GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2)
N, ALPHA = 10_000, 0.001


def slab_apply(params, x):
  """Class 1 iff |w.x - c| <= t, c = 0.5 * sum(w): the slab around the
  grey image. Class 0 outside."""
  del params
  z = x.reshape(x.shape[0], -1) @ jnp.asarray(W, jnp.float32) - 0.5 * W.sum()
  inside = jnp.abs(z) <= T
  return jnp.stack([jnp.where(inside, -1.0, 1.0),
                    jnp.where(inside, 1.0, -1.0)], -1)


def _image(u):
  """An image whose offset from the slab's centre along w is u."""
  return (np.full(SHAPE, 0.5) + u * W.reshape(SHAPE)).astype(np.float32)


def _p_inside(u, s):
  return sps.norm.cdf((T - u) / s) - sps.norm.cdf((-T - u) / s)


def _expected_radius(u, s):
  """Cohen's radius of class 1 (the slab) at N, alpha with its expected
  hits (0 where it would abstain)."""
  n_a = np.rint(_p_inside(u, s) * N)
  p_lower = stats.lower_confidence_bound(n_a, N, ALPHA)
  return float(stats.radius_from_p_lower(p_lower, s))


@pytest.mark.parametrize("u", [0.0, 0.2])
def test_chosen_sigma_is_near_the_best_of_the_grid_in_closed_form(u):
  x = _image(u)[None]
  choice = sigma_opt.select_sigma_grid(
      slab_apply, {}, x, jax.random.key(0), grid=GRID, pilot=1000, n=N,
      alpha=ALPHA, sigma0=0.2, batch_size=1000, example_ids=np.array([7]))
  exact = np.array([_expected_radius(u, s) for s in GRID])
  best = exact.max()
  # An interior optimum: either edge of the grid would fail the test below.
  assert exact[0] < 0.8 * best and exact[-1] < 0.8 * best
  chosen = _expected_radius(u, float(choice.sigma[0]))
  assert chosen >= 0.9 * best, (choice.sigma, exact)
  assert choice.forward_passes == len(GRID) * 1000
  # The plug-in radii it compared track the closed form where the slab's
  # class is on top (beyond, the top class is the other one: no candidate)
  # and below the cap (1,000 pilot draws cannot tell p = 0.999 from 1).
  inside = np.array([0.55 < _p_inside(u, s) < 0.995 for s in GRID])
  np.testing.assert_allclose(choice.expected_radius[0][inside],
                             exact[inside], atol=0.05)


def test_sigma_does_not_depend_on_labels_or_the_estimation_stream():
  rng = np.random.default_rng(0)
  x = np.stack([_image(u) for u in rng.uniform(-0.3, 0.3, 5)])
  kw = dict(grid=GRID, pilot=500, n=N, alpha=ALPHA, batch_size=1000,
            example_ids=np.arange(5))
  a = sigma_opt.select_sigma_grid(slab_apply, {}, x, jax.random.key(0), **kw)
  # Certifying (selection and estimation streams) in between changes nothing.
  dds_jax.certify(slab_apply, {}, x, a.sigma, jax.random.key(0), n0=100,
                  n=500, example_ids=np.arange(5))
  b = sigma_opt.select_sigma_grid(slab_apply, {}, x, jax.random.key(0), **kw)
  np.testing.assert_array_equal(a.sigma, b.sigma)
  np.testing.assert_array_equal(a.counts, b.counts)
  # The function takes no label; another key gives other pilot draws.
  c = sigma_opt.select_sigma_grid(slab_apply, {}, x, jax.random.key(1), **kw)
  assert not np.array_equal(a.counts, c.counts)


def test_pilot_draws_are_their_own_stream():
  """The pilot's counts differ from CERTIFY's selection and estimation counts
  drawn with the same key, ids and sigma."""
  x = _image(0.3)[None]
  ids = np.array([3])
  kw = dict(batch_size=1000, example_ids=ids, samples_per_block=100)
  counts = {p: dds_jax.sample_counts(slab_apply, {}, x, 0.4,
                                     jax.random.key(0), 2000, purpose=p, **kw)
            for p in (noise.Purpose.PILOT, noise.Purpose.SELECT,
                      noise.Purpose.ESTIMATE)}
  pilot = counts[noise.Purpose.PILOT]
  assert not np.array_equal(pilot, counts[noise.Purpose.SELECT])
  assert not np.array_equal(pilot, counts[noise.Purpose.ESTIMATE])


def test_all_abstaining_inputs_and_ties_go_to_sigma0():
  x = _image(1.9)[None]  # far outside the slab: class 0 at both sigmas
  far = sigma_opt.select_sigma_grid(slab_apply, {}, x, jax.random.key(0),
                                    grid=(0.1, 0.2), pilot=200, n=N,
                                    alpha=ALPHA, sigma0=0.1, batch_size=1000)
  # Both sigmas: every draw outside: the larger sigma has the larger radius.
  assert far.sigma[0] == 0.2
  radius = sigma_opt.plug_in_radius(np.array([[100, 60]]), 200,
                                    np.array([[0.1, 0.2]]), N, ALPHA)
  assert radius[0, 1] == 0.0 and radius[0, 0] == 0.0  # 0.5 and 0.3: abstain
  tie = sigma_opt.select_sigma_grid(
      lambda p, im: jnp.zeros((im.shape[0], 2)).at[:, 0].set(
          jnp.where(jnp.arange(im.shape[0]) % 2 == 0, 1.0, -1.0)),
      {}, x, jax.random.key(0), grid=(0.1, 0.2, 0.4), pilot=200, n=N,
      alpha=ALPHA, sigma0=0.4, batch_size=1000)
  assert tie.sigma[0] == 0.4  # 50/50 at every sigma: abstain; to sigma0


def test_bad_grid_is_a_clear_error():
  with pytest.raises(InputError, match="grid"):
    sigma_opt.select_sigma_grid(slab_apply, {}, _image(0)[None],
                                jax.random.key(0), grid=(0.1, -1.0))


def test_selection_cost_in_forward_passes():
  assert sigma_opt.selection_cost("grid", grid_size=4, pilot=1000) == 4000
  # Ascent: two passes per step's derivative plus the final evaluation.
  assert sigma_opt.selection_cost("ascent", steps=100, num_samples=16) == 3216
  assert sigma_opt.selection_cost("fixed", grid_size=4, pilot=1000) == 0
