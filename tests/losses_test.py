"""Training losses: formulas against numpy, the attack's constraints and effect.

Every function is run under jax.jit (traced eps, sigma, mask and MACER
hyper-parameters), with few distinct compilations to keep the file fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from dds_jax import InputError
from dds_jax import losses
from dds_jax import noise as noise_lib

B, H, W, C, K = 16, 6, 6, 3, 5
M = 3      # noise draws per example in the attack tests
STEPS = 4  # PGD steps in the attack tests

_W_LIN = (np.random.default_rng(7).normal(size=(H * W * C, K)) *
          0.3).astype(np.float32)


def _linear_apply(w, im):
  return im.reshape(im.shape[0], -1) @ w


def linear(im):
  """A fixed random linear classifier."""
  return _linear_apply(_W_LIN, im)


def _cnn_params(seed=2, features=8):
  rng = np.random.default_rng(seed)
  return {
      "w1": (rng.normal(size=(3, 3, C, features)) * 0.5).astype(np.float32),
      "b1": np.zeros((features,), np.float32),
      "w2": (rng.normal(size=(features * H * W, K)) * 0.1).astype(np.float32),
      "b2": (rng.normal(size=(K,)) * 0.1).astype(np.float32),
  }


_CNN = _cnn_params()


def cnn(im):
  """A small random CNN in plain jnp: conv 3x3, relu, dense."""
  h = jax.lax.conv_general_dilated(
      im, _CNN["w1"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + _CNN["b1"]
  h = jax.nn.relu(h).reshape(im.shape[0], -1)
  return h @ _CNN["w2"] + _CNN["b2"]


_attack = jax.jit(losses.smoothadv_attack,
                  static_argnames=("forward", "steps", "num_samples", "kind"))


def attack(forward, x, labels, sigma, key, *, eps, steps=STEPS,
           num_samples=M, kind="gaussian", **kw):
  """The jitted attack, eps always a traced float32 (one compile per model)."""
  return _attack(forward, x, labels, sigma, key, eps=np.float32(eps),
                 steps=steps, num_samples=num_samples, kind=kind, **kw)
augment = jax.jit(losses.gaussian_augmentation_loss,
                  static_argnames=("forward", "num_samples", "kind"))
macer = jax.jit(losses.macer_loss, static_argnames=("variant",))


@functools.partial(jax.jit, static_argnames=("forward", "m"))
def smoothed_nll(forward, x, labels, sigma, key, m=512):
  """-log psi[y] per example, psi from m fresh draws."""
  noisy = x[:, None] + losses.noise_like(key, x, sigma, m)
  logits = forward(noisy.reshape((-1,) + x.shape[1:])).reshape(len(x), m, -1)
  return -losses.smoothed_log_prob(logits, labels)


def _batch(seed=0, b=B):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (b, H, W, C)).astype(np.float32)
  x[:, 0] = 0.0   # pixels on the box's faces: clipping must act
  x[:, -1] = 1.0
  labels = rng.integers(0, K, b).astype(np.int32)
  sigma = rng.uniform(0.1, 0.5, b).astype(np.float32)
  return x, labels, sigma


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_ce(logits, labels):
  return -np.log(np.take_along_axis(_np_softmax(logits), labels[..., None],
                                    -1)[..., 0])


# ---------------------------------------------------------------- cross-entropy

def test_cross_entropy_mask_and_shapes():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 3, K)).astype(np.float32) * 3
  labels = rng.integers(0, K, 4)
  ce = _np_ce(logits, np.broadcast_to(labels[:, None], (4, 3)))
  jitted = jax.jit(losses.cross_entropy)
  np.testing.assert_allclose(jitted(logits, labels), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(jitted(logits[:, 0], labels), ce[:, 0].mean(),
                             rtol=1e-5)
  mask = np.array([True, False, True, False])
  np.testing.assert_allclose(jitted(logits, labels, mask), ce[mask].mean(),
                             rtol=1e-5)
  weights = np.array([1.0, 0.0, 0.5, 0.0], np.float32)
  np.testing.assert_allclose(
      jitted(logits, labels, weights),
      (ce.mean(1) * weights).sum() / weights.sum(), rtol=1e-5)
  assert float(jitted(logits, labels, np.zeros(4, bool))) == 0.0
  with pytest.raises(InputError):
    losses.cross_entropy(logits, labels, np.ones(3, bool))


# ------------------------------------------------------- Gaussian augmentation

@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_gaussian_augmentation_equals_hand_computed_ce(kind):
  x, labels, sigma = _batch()
  key = jax.random.key(3)
  m = M
  mask = np.ones(B, bool)
  loss, logits = augment(linear, x, labels, sigma, key, num_samples=m,
                         kind=kind, mask=mask)
  assert logits.shape == (B, m, K)
  # The noise by hand: unit draws of shape [B, m, H, W, C] times sigma_i.
  unit = np.asarray(noise_lib.draw(key, (B, m, H, W, C), 1.0, kind),
                    np.float64)
  noisy = (np.asarray(x, np.float64)[:, None] +
           np.asarray(sigma, np.float64)[:, None, None, None, None] * unit)
  hand_logits = noisy.reshape(B, m, -1) @ _W_LIN.astype(np.float64)
  np.testing.assert_allclose(logits, hand_logits, rtol=1e-4, atol=1e-4)
  ce = _np_ce(hand_logits, np.broadcast_to(np.asarray(labels)[:, None],
                                           (B, m)))
  np.testing.assert_allclose(loss, ce.mean(), rtol=1e-4)
  mask = np.arange(B) < 5
  loss_m, _ = augment(linear, x, labels, sigma, key, num_samples=m, kind=kind,
                      mask=mask)
  np.testing.assert_allclose(loss_m, ce[mask].mean(), rtol=1e-4)


# ---------------------------------------------------------------- SmoothAdv

def test_smoothadv_epsilon_ramp():
  assert losses.smoothadv_epsilon(0, 0.25, 1) == 0.25  # official DDRS setting
  assert losses.smoothadv_epsilon(0, 0.5, 10) == pytest.approx(0.05)
  assert losses.smoothadv_epsilon(4, 0.5, 10) == pytest.approx(0.25)
  assert losses.smoothadv_epsilon(9, 0.5, 10) == pytest.approx(0.5)
  assert losses.smoothadv_epsilon(30, 0.5, 10) == pytest.approx(0.5)
  assert losses.smoothadv_epsilon(0, 0.5, 0) == 0.5
  ramp = jax.jit(lambda e: losses.smoothadv_epsilon(e, 0.5, 10))
  np.testing.assert_allclose([ramp(e) for e in (0, 4, 30)], [0.05, 0.25, 0.5],
                             rtol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_attack_stays_in_the_ball_and_the_box(kind):
  x, labels, sigma = _batch()
  for eps in [0.05, 0.5, 3.0]:
    x_adv = attack(linear, x, labels, sigma, jax.random.key(1), eps=eps,
                   steps=STEPS, num_samples=M, kind=kind)
    assert x_adv.shape == x.shape
    norms = np.linalg.norm((np.asarray(x_adv) - x).reshape(B, -1), axis=1)
    assert np.all(norms <= eps + 1e-5), (eps, norms)
    assert np.all(norms > 0.5 * eps)  # it moved
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  if kind == "gaussian":
    # A step size of its own (larger than the radius): still projected.
    x_adv = attack(linear, x, labels, sigma, jax.random.key(1), eps=0.3,
                   steps=STEPS, num_samples=M, kind=kind, step_size=1.0)
    norms = np.linalg.norm((np.asarray(x_adv) - x).reshape(B, -1), axis=1)
    assert np.all(norms <= 0.3 + 1e-5)
    assert np.all(norms > 0.15)


def test_attack_with_eps_zero_returns_x():
  x, labels, sigma = _batch()
  for eps in (0.0, jnp.float32(0.0)):
    x_adv = attack(linear, x, labels, sigma, jax.random.key(1), eps=eps,
                   steps=STEPS, num_samples=M, kind="gaussian")
    np.testing.assert_array_equal(x_adv, x)
  x_adv = losses.smoothadv_attack(linear, x, labels, sigma, jax.random.key(1),
                                  eps=0.5, steps=0)
  np.testing.assert_array_equal(x_adv, x)


@pytest.mark.parametrize("forward", [cnn, linear], ids=["cnn", "linear"])
def test_attack_increases_the_smoothed_loss(forward):
  x, labels, sigma = _batch(seed=5)
  eval_key = jax.random.key(99)  # fresh draws, the same at x and at x_adv
  before = np.asarray(smoothed_nll(forward, x, labels, sigma, eval_key))
  means = []
  for eps in (0.5, 2.0):
    x_adv = attack(forward, x, labels, sigma, jax.random.key(1), eps=eps,
                   steps=STEPS, num_samples=M)
    after = np.asarray(smoothed_nll(forward, x_adv, labels, sigma, eval_key))
    assert after.mean() > before.mean() + 0.25, (eps, before.mean(),
                                                 after.mean())
    assert np.mean(after > before) >= 0.9
    means.append(after.mean())
  assert means[1] > means[0]  # a larger radius does more damage


def test_one_attack_step_is_the_normalised_gradient_of_the_soft_loss():
  # steps = 1: a step of 2 eps along g / ||g||, projected back to eps, clipped.
  x, labels, sigma = _batch(seed=3)
  key = jax.random.key(8)
  eps = 0.4
  x_adv = np.asarray(attack(linear, x, labels, sigma, key, eps=eps, steps=1))

  @jax.jit
  def soft_grad(x):
    noise = noise_lib.draw(key, (B, M, H, W, C), 1.0, "gaussian")
    noise = sigma[:, None, None, None, None] * noise
    def nll(z):
      logits = linear((z[:, None] + noise).reshape(B * M, H, W, C))
      p = jax.nn.softmax(logits.reshape(B, M, K), -1).mean(1)
      return -jnp.sum(jnp.log(p[jnp.arange(B), labels]))
    return jax.grad(nll)(x)
  g = np.asarray(soft_grad(x), np.float64)
  g /= np.linalg.norm(g.reshape(B, -1), axis=1)[:, None, None, None]
  np.testing.assert_allclose(x_adv, np.clip(x + eps * g, 0, 1), atol=1e-5)


def test_smoothadv_loss_is_ce_at_x_adv_and_the_attack_passes_no_gradient():
  x, labels, sigma = _batch()
  key = jax.random.key(4)
  w = jnp.asarray(_W_LIN)
  mask = np.arange(B) < 6

  @jax.jit
  def attack_grad(w):
    return jax.grad(lambda v: jnp.sum(losses.smoothadv_attack(
        functools.partial(_linear_apply, v), x, labels, sigma, key, eps=0.5,
        steps=STEPS, num_samples=M)))(w)
  assert float(jnp.abs(attack_grad(w)).max()) == 0.0

  @functools.partial(jax.jit, static_argnames=("adv",))
  def value_and_grad(w, x_in, k, adv):
    def loss(v):
      f = functools.partial(_linear_apply, v)
      if adv:
        out = losses.smoothadv_loss(f, x_in, labels, sigma, k, eps=0.5,
                                    steps=STEPS, num_samples=M, mask=mask)
        return out[0], out[1:]
      out = losses.gaussian_augmentation_loss(f, x_in, labels, sigma, k,
                                              num_samples=M, mask=mask)
      return out[0], (out[1], x_in)
    return jax.value_and_grad(loss, has_aux=True)(w)

  (loss, (logits, x_adv)), g = value_and_grad(w, x, key, True)
  assert logits.shape == (B, M, K)
  attack_key, train_key = jax.random.split(key)
  np.testing.assert_allclose(
      x_adv, attack(linear, x, labels, sigma, attack_key, eps=0.5,
                    steps=STEPS, num_samples=M), atol=1e-6)
  (ref, _), g_ref = value_and_grad(w, x_adv, train_key, False)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-7)


def test_smoothadv_loss_jits_with_the_ramp_traced():
  x, labels, sigma = _batch()
  key = jax.random.key(2)
  mask = np.arange(B) < 5

  @jax.jit
  def step(epoch, s, k, msk):
    return losses.smoothadv_loss(linear, x, labels, s, k, steps=STEPS,
                                 num_samples=M, mask=msk,
                                 eps=losses.smoothadv_epsilon(epoch, 0.5, 4))
  loss, logits, x_adv = step(jnp.int32(1), sigma, key, mask)
  attack_key, train_key = jax.random.split(key)
  np.testing.assert_allclose(
      x_adv, attack(linear, x, labels, sigma, attack_key, eps=0.25,
                    steps=STEPS, num_samples=M), atol=1e-6)
  ref, ref_logits = augment(linear, x_adv, labels, sigma, train_key,
                            num_samples=M, kind="gaussian", mask=mask)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MACER

MB, MK = 12, 8  # MACER test batch: examples, noise draws


def _np_macer(logits, labels, sigma, lbd=12.0, gamma=8.0, beta=16.0,
              variant="macer", clip=(0.02, 0.98), mask=None):
  """The formulas of the spec in float64 with loops; also the count used."""
  logits = np.asarray(logits, np.float64)
  b = logits.shape[0]
  keep = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
  psi = _np_softmax(logits).mean(1)
  nll = [-np.log(psi[i, labels[i]] + 1e-10) for i in range(b) if keep[i]]
  if variant == "macer":
    bpsi = _np_softmax(beta * logits).mean(1)
    rob, used = 0.0, 0
    for i in range(b):
      if not keep[i]:
        continue
      order = np.argsort(-bpsi[i], kind="stable")
      p1, p2 = bpsi[i, order[0]], bpsi[i, order[1]]
      if order[0] != labels[i]:
        continue
      with np.errstate(divide="ignore"):
        gap = sps.norm.ppf(p1) - sps.norm.ppf(p2)
      if not np.isfinite(gap) or abs(gap) > gamma:
        continue
      used += 1
      rob += (gamma - gap) * sigma[i] / 2
    return (np.sum(nll) + lbd * rob) / keep.sum(), used
  rs = []
  for i in range(b):
    if not keep[i]:
      continue
    order = np.argsort(-psi[i], kind="stable")
    if order[0] != labels[i]:
      continue
    p1, p2 = np.clip(psi[i, order[:2]], *clip)
    r = sigma[i] / 2 * (sps.norm.ppf(p1) - sps.norm.ppf(p2))
    rs.append(max(gamma - r, 0.0))
  return np.mean(nll) + lbd * (np.mean(rs) if rs else 0.0), len(rs)


def _macer_inputs(seed, scale):
  rng = np.random.default_rng(seed)
  class_means = rng.normal(size=(MB, 1, K)) * 2 * scale
  logits = class_means + rng.normal(size=(MB, MK, K)) * scale
  labels = rng.integers(0, K, MB)
  # Half the labels follow the mean's argmax, so that some are correct.
  labels[: MB // 2] = class_means[: MB // 2, 0].argmax(-1)
  sigma = rng.uniform(0.12, 1.0, MB)
  return (logits.astype(np.float32), labels.astype(np.int32),
          sigma.astype(np.float32))


def _macer(logits, labels, sigma, variant, mask=None, **kw):
  """The jitted loss, every hyper-parameter traced (one compile a variant)."""
  kw = {"lbd": 12.0, "gamma": 8.0, "beta": 16.0, "clip": (0.02, 0.98), **kw}
  kw = {k: jax.tree.map(np.float32, v) for k, v in kw.items()}
  mask = np.ones(len(labels), bool) if mask is None else mask
  return macer(logits, labels, sigma, variant=variant, mask=mask, **kw)


macer_grad = jax.jit(
    jax.grad(lambda z, y, s, v: losses.macer_loss(z, y, s, variant=v)[0],
             argnums=(0, 2)), static_argnames=("v",))


@pytest.mark.parametrize("variant", ["macer", "ddrs"])
def test_macer_matches_numpy(variant):
  for seed, scale in [(0, 0.15), (1, 0.3), (2, 1.0)]:
    logits, labels, sigma = _macer_inputs(seed, scale)
    loss, aux = _macer(logits, labels, sigma, variant)
    ref, used = _np_macer(logits, labels, sigma, variant=variant)
    np.testing.assert_allclose(loss, ref, rtol=1e-4)
    np.testing.assert_allclose(loss, aux["classification"] + 12.0 *
                               aux["robustness"], rtol=1e-5)
    assert 0 < aux["num_correct"] < MB  # some right, some wrong
    if variant == "macer" and seed == 2:
      assert 0 < used < aux["num_correct"]  # and the hinge drops some gaps
    # With a mask: padding rows are garbage (NaN) and excluded everywhere.
    mask = np.arange(MB) % 3 != 0
    bad = logits.copy()
    bad[~mask] = np.nan
    loss_m, aux_m = _macer(bad, labels, sigma, variant, mask=mask)
    ref_m, _ = _np_macer(logits, labels, sigma, variant=variant, mask=mask)
    np.testing.assert_allclose(loss_m, ref_m, rtol=1e-4)
    assert aux_m["num_correct"] <= mask.sum()
  # Other hyper-parameters, traced.
  logits, labels, sigma = _macer_inputs(3, 0.5)
  kw = dict(lbd=3.0, gamma=2.0, beta=4.0, clip=(0.01, 0.99))
  np.testing.assert_allclose(
      _macer(logits, labels, sigma, variant, **kw)[0],
      _np_macer(logits, labels, sigma, variant=variant, **kw)[0], rtol=1e-4)


@pytest.mark.parametrize("variant", ["macer", "ddrs"])
def test_macer_with_no_correct_example(variant):
  logits, _, sigma = _macer_inputs(4, 1.0)
  labels = np.argmin(logits.mean(1), -1).astype(np.int32)  # all wrong
  loss, aux = _macer(logits, labels, sigma, variant)
  ref, used = _np_macer(logits, labels, sigma, variant=variant)
  assert used == 0 and float(aux["num_correct"]) == 0
  assert float(aux["robustness"]) == 0.0
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(loss, aux["classification"], rtol=1e-6)
  g, _ = macer_grad(logits, labels, sigma, v=variant)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("variant", ["macer", "ddrs"])
def test_macer_extreme_logits_give_finite_loss_and_gradients(variant):
  logits, labels, sigma = _macer_inputs(5, 1.0)
  other = (labels + 1) % K
  logits[0] = 0.0
  logits[0, :, labels[0]] = 1e4      # saturated, correct: p1 = 1, p2 = 0
  logits[1] = 0.0
  logits[1, :, other[1]] = 1e4       # saturated, wrong: psi[y] = 0
  logits[2] = -1e4
  logits[2, :4, labels[2]] = 1e4     # two classes split the draws
  logits[2, 4:, other[2]] = 1e4
  logits[3] *= 1e3                   # large but not one-hot
  logits[4] = 0.0                    # all classes tied
  logits[5] = -1e4                   # p1 = 1 - 1e-4: a gap of 7.4 is kept
  logits[5, :, labels[5]] = 0.0
  logits[5, 0, other[5]] = np.log(MK * 1e-4) / 16.0
  loss, aux = _macer(logits, labels, sigma, variant)
  ref, _ = _np_macer(logits, labels, sigma, variant=variant)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, ref, rtol=1e-4)
  g_logits, g_sigma = macer_grad(logits, labels, sigma, v=variant)
  assert np.all(np.isfinite(np.asarray(g_logits)))
  assert np.all(np.isfinite(np.asarray(g_sigma)))


@pytest.mark.parametrize("variant", ["macer", "ddrs"])
def test_macer_gradient_matches_finite_differences(variant):
  # Central differences of the float64 numpy reference, along a direction.
  logits, labels, sigma = _macer_inputs(2, 1.0)
  g_logits, g_sigma = macer_grad(logits, labels, sigma, v=variant)
  rng = np.random.default_rng(0)
  d_logits, d_sigma = rng.normal(size=logits.shape), rng.normal(size=MB)
  h = 1e-5
  f = lambda t: _np_macer(logits + t * d_logits, labels, sigma + t * d_sigma,
                          variant=variant)[0]
  fd = (f(h) - f(-h)) / (2 * h)
  got = (np.sum(np.asarray(g_logits, np.float64) * d_logits) +
         np.sum(np.asarray(g_sigma, np.float64) * d_sigma))
  np.testing.assert_allclose(got, fd, rtol=1e-3)


def test_macer_rejects_bad_input():
  logits, labels, sigma = _macer_inputs(0, 0.5)
  with pytest.raises(InputError):
    losses.macer_loss(logits, labels, sigma, variant="cohen")
  with pytest.raises(InputError):
    losses.macer_loss(logits[:, 0], labels, sigma)


def test_sigma_and_counts_are_checked_as_everywhere_else():
  """`validate`'s checks and messages: values when concrete, shape when traced."""
  logits, labels, sigma = _macer_inputs(0, 0.5)
  for bad in (np.zeros_like(sigma), np.full_like(sigma, np.nan), -1.0):
    with pytest.raises(InputError, match="sigma must be finite and > 0"):
      losses.macer_loss(logits, labels, bad)
  with pytest.raises(InputError, match=r"sigma must be a scalar or have shape"):
    jax.jit(lambda s: losses.macer_loss(logits, labels, s)[0])(sigma[:-1])
  # Under jit the values are unknown: a traced sigma of the right shape passes.
  jax.jit(lambda s: losses.macer_loss(logits, labels, s)[0])(sigma)
  x, labels, sigma = _batch()
  for m in (0, 1.5, True):
    with pytest.raises(InputError, match="num_samples must be an integer >= 1"):
      losses.gaussian_augmentation_loss(linear, x, labels, sigma,
                                        jax.random.key(0), num_samples=m)
    with pytest.raises(InputError, match="num_samples must be an integer >= 1"):
      losses.noise_like(jax.random.key(0), x, sigma, m)


def test_macer_vmaps_over_stacked_batches():
  logits, labels, sigma = _macer_inputs(0, 0.5)

  @jax.jit
  def both(z, s):
    return [jax.vmap(lambda a, b, v=v: losses.macer_loss(
        a, labels, b, variant=v)[0])(z, s) for v in ("macer", "ddrs")]
  out = both(np.stack([logits, 2 * logits]), np.stack([sigma, sigma]))
  for variant, stacked in zip(("macer", "ddrs"), out):
    np.testing.assert_allclose(
        stacked, [_np_macer(logits, labels, sigma, variant=variant)[0],
                  _np_macer(2 * logits, labels, sigma, variant=variant)[0]],
        rtol=1e-4)
