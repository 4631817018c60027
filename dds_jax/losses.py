"""Training losses of the base methods, with one sigma per example.

Each training example i has its own noise level s_i (the data-dependent sigma
of DDRS); every loss here takes `sigma` of shape [B] (a scalar is broadcast)
and adds noise s_i e, e ~ N(0, I) (or U(-1, 1) for kind 'uniform'), to image
i in [0, 1] pixel space. The model enters as `forward(images) -> logits`, a
closure over its variables: the caller decides BatchNorm mode and collects any
updated statistics itself.

  * `gaussian_augmentation_loss` (Cohen et al.): cross-entropy of
    f(x_i + s_i e_ij) over m noisy copies of each example.
  * `smoothadv_attack` / `smoothadv_loss` (Salman et al., SmoothAdv): PGD-L2
    on the soft smoothed classifier -log((1/m) sum_j softmax(f(x' + s_i e_j))
    [y]), with the draws e_j fixed across the PGD steps, then cross-entropy of
    f(x_adv + s_i e'_j) on fresh draws; `smoothadv_epsilon` is the warm-up ramp
    of the attack radius.
  * `macer_loss` (Zhai et al., MACER): NLL of the soft smoothed classifier
    psi_i = (1/k) sum_j softmax(f(x_i + s_i e_ij)) plus lambda times a
    robustness term, either MACER's own (hinge on the inverse-temperature gap,
    variant 'macer') or the DDRS MACER script's (relu(gamma - R) on the radius
    proxy R, variant 'ddrs').

All functions are pure and jit-able; `eps`, `sigma` and `mask` may be traced.
`mask` ([B], bool or float weights; None for all) drops padding examples: a
masked-out example contributes to no term and no count, and an all-masked
batch gives a loss of 0.

References:
  Cohen, Rosenfeld, Kolter. Certified Adversarial Robustness via Randomized
    Smoothing. ICML 2019.
  Salman, Yang, Li, Zhang, Zhang, Razenshteyn, Bubeck. Provably Robust Deep
    Learning via Adversarially Trained Smoothed Classifiers. NeurIPS 2019.
  Zhai, Dan, He, Zhang, Gong, Hu, Wang, Wang. MACER: Attack-free and Scalable
    Robust Training via Maximizing Certified Radius. ICLR 2020.
  Alfarra, Bibi, Torr, Ghanem. Data Dependent Randomized Smoothing. UAI 2022.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm as jnorm

from dds_jax import noise as noise_lib
from dds_jax import sigma_opt
from dds_jax import validate
from dds_jax.errors import InputError

Forward = Callable[[jax.Array], jax.Array]

MACER_VARIANTS = ("macer", "ddrs")


def _weights(mask, batch: int) -> jax.Array:
  """Per-example float32 weights [B] from a mask (None: all ones)."""
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise InputError(f"mask must have shape [{batch}]; got {mask.shape}")
  return mask.astype(jnp.float32)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w v) / sum(w) over all entries, 0 when sum(w) == 0.

  `weights` has the leading shape of `values` and is broadcast over the rest.
  A value with weight 0 is never used, even when it is NaN.
  """
  w = jnp.broadcast_to(
      weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim)),
      values.shape)
  num = jnp.sum(jnp.where(w != 0, w * values, 0.0))
  den = jnp.sum(w)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _per_example_sigma(sigma, batch: int) -> jax.Array:
  """sigma as float32 [batch], checked by `validate.check_sigma`.

  A concrete sigma must also be finite and > 0; of a traced one (under jit,
  where the values are unknown) only the shape is checked.
  """
  if isinstance(sigma, jax.core.Tracer):
    validate.check_sigma(np.ones(jnp.shape(sigma)), batch)   # the shape only
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
  return jnp.asarray(validate.check_sigma(sigma, batch))


def noise_like(key: jax.Array, x: jax.Array, sigma, num_samples: int,
               kind: str = "gaussian") -> jax.Array:
  """The noise the losses add: [B, m, H, W, C], example i scaled by sigma_i.

  With one key: `noise.draw(key, (B, m) + x.shape[1:], 1.0, kind)` times
  sigma_i, so a test can recompute it. With one key per example ([B] keys,
  e.g. `noise.block_key` of each example id, as training uses): example i's
  draws are `noise.draw(key_i, (m,) + x.shape[1:], 1.0, kind)`, so they do
  not depend on what else is in the batch.

  Args:
    key: a PRNG key, or [B] keys (one per example).
    x: [B, ...] images.
    sigma: [B] (or scalar) noise levels.
    num_samples: m draws per example.
    kind: 'gaussian' or 'uniform' (sigma is the half-width of U(-s, s)).

  Returns:
    float32 [B, m, ...] noise.
  """
  b = x.shape[0]
  sigma = _per_example_sigma(sigma, b)
  num_samples = validate.check_count(num_samples, "num_samples")
  if key.ndim == 1:  # one key per example
    if key.shape[0] != b:
      raise InputError(f"got {key.shape[0]} keys for {b} examples")
    unit = jax.vmap(lambda k: noise_lib.draw(
        k, (num_samples,) + tuple(x.shape[1:]), jnp.float32(1.0), kind))(key)
  else:
    unit = noise_lib.draw(key, (b, num_samples) + tuple(x.shape[1:]),
                          jnp.float32(1.0), kind)
  return sigma.reshape((b,) + (1,) * (unit.ndim - 1)) * unit


def _forward_noisy(forward: Forward, x: jax.Array,
                   noise: jax.Array) -> jax.Array:
  """Logits [B, m, K] of f(x_i + noise_ij), one forward on B * m images."""
  b, m = noise.shape[:2]
  images = (x[:, None] + noise).reshape((b * m,) + tuple(x.shape[1:]))
  return forward(images).astype(jnp.float32).reshape(b, m, -1)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean cross-entropy of integer labels, over the examples of the mask.

  Args:
    logits: [B, ..., K] logits (e.g. [B, K] or [B, m, K]).
    labels: [B] int labels, broadcast over the middle axes of logits.
    mask: [B] bool or float weights (None: all examples).

  Returns:
    Scalar float32: sum over kept entries of w_i CE / sum of the weights (0
    when every weight is 0).

  References:
    Cohen, Rosenfeld, Kolter. ICML 2019.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  b = logits.shape[0]
  labels = jnp.broadcast_to(
      labels.reshape(labels.shape + (1,) * (logits.ndim - 1 - labels.ndim)),
      logits.shape[:-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return _weighted_mean(ce, _weights(mask, b))


def gaussian_augmentation_loss(forward: Forward, x: jax.Array,
                               labels: jax.Array, sigma, key: jax.Array, *,
                               num_samples: int = 1, kind: str = "gaussian",
                               mask: Optional[jax.Array] = None):
  """Cohen et al.'s noise augmentation with per-example sigma.

  Cross-entropy of f(x_i + sigma_i e_ij), j = 1..m, averaged over all B * m
  copies (the noise is `noise_like(key, x, sigma, m, kind)`).

  Args:
    forward: `forward(images) -> logits`.
    x: [B, H, W, C] float32 images in [0, 1].
    labels: [B] int labels.
    sigma: [B] noise levels (a scalar is broadcast; traced is fine).
    key: PRNG key of the noise, or [B] keys, one per example (`noise_like`).
    num_samples: m noisy copies per example.
    kind: 'gaussian' or 'uniform'.
    mask: [B] bool/float weights of the examples (None: all).

  Returns:
    (loss, logits [B, m, K]).

  References:
    Cohen, Rosenfeld, Kolter. Certified Adversarial Robustness via Randomized
    Smoothing. ICML 2019.
  """
  num_samples = validate.check_count(num_samples, "num_samples")
  x = jnp.asarray(x, jnp.float32)
  noise = noise_like(key, x, sigma, num_samples, kind)
  logits = _forward_noisy(forward, x, noise)
  return cross_entropy(logits, labels, mask), logits


def smoothadv_epsilon(epoch, eps: float, warmup_epochs: int):
  """Salman et al.'s warm-up ramp of the attack radius.

  min(eps, (epoch + 1) * eps / warmup_epochs) when warmup_epochs > 0, else
  eps. Epochs count from 0, so with warmup_epochs = 1 (the official DDRS
  setting) epoch 0 already attacks at the full eps.

  Args:
    epoch: the 0-based epoch (a Python number, or a traced array).
    eps: the final L2 radius.
    warmup_epochs: epochs of the ramp (0 or less: no ramp).

  Returns:
    A Python float for Python inputs, else a float32 array.

  References:
    Salman et al. Provably Robust Deep Learning via Adversarially Trained
    Smoothed Classifiers. NeurIPS 2019 (code: train_pgd.py, --warmup).
  """
  if warmup_epochs <= 0:
    return eps
  ramp = (epoch + 1) * eps / warmup_epochs
  if isinstance(epoch, numbers.Number) and isinstance(eps, numbers.Number):
    return float(min(eps, ramp))
  return jnp.minimum(jnp.asarray(eps, jnp.float32), ramp)


def _l2_per_example(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1))


def _per_example(scale: jax.Array, like: jax.Array) -> jax.Array:
  return scale.reshape((-1,) + (1,) * (like.ndim - 1))


def smoothed_log_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log psi_i[y_i], psi_i = (1/m) sum_j softmax(logits_ij), stably.

  Computed as logsumexp_j log_softmax(logits_ij)[y_i] - log m, finite and
  with non-vanishing gradients where psi_i[y_i] underflows.

  Args:
    logits: [B, m, K].
    labels: [B] int.

  Returns:
    float32 [B].
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  idx = jnp.broadcast_to(jnp.asarray(labels, jnp.int32)[:, None, None],
                         logits.shape[:2] + (1,))
  logp_y = jnp.take_along_axis(logp, idx, axis=-1)[..., 0]
  return jax.nn.logsumexp(logp_y, axis=1) - math.log(logits.shape[1])


def smoothadv_attack(forward: Forward, x: jax.Array, labels: jax.Array, sigma,
                     key: jax.Array, *, eps, steps: int = 2,
                     num_samples: int = 1, kind: str = "gaussian",
                     step_size=None) -> jax.Array:
  """PGD-L2 on the soft smoothed classifier (SmoothAdv).

  Maximises, per example, -log((1/m) sum_j softmax(f(x_adv + sigma_i e_j))[y])
  with the m draws e_j drawn once from `key` and reused at every step, as
  Salman et al.'s code does. From delta = 0, each step is

    delta += step_size * g / ||g||_2      (no move where g = 0)
    delta *= min(1, eps / ||delta||_2)    (onto the L2 ball of radius eps)
    delta = clip(x + delta, 0, 1) - x     (clipping only shrinks ||delta||)

  per example, so ||x_adv - x||_2 <= eps and x_adv is in [0, 1]. The official
  code clips before projecting (both orders keep both constraints), moves a
  zero-gradient example in a random direction, and clamps psi[y] at 1e-20
  before the log; here the log-probability is a logsumexp
  (`smoothed_log_prob`), exact where psi[y] underflows.

  Args:
    forward: `forward(images) -> logits` (Salman et al.'s code attacks with
      the model in eval mode).
    x: [B, H, W, C] float32 images in [0, 1].
    labels: [B] int labels.
    sigma: [B] noise levels (a scalar is broadcast; traced is fine).
    key: PRNG key of the attack's noise draws, or [B] keys, one per example
      (`noise_like`).
    eps: L2 radius (a scalar, traced is fine, e.g. `smoothadv_epsilon`);
      eps = 0 returns x.
    steps: PGD steps (static; official DDRS/SmoothAdv setting 2).
    num_samples: m noise draws averaged in the soft classifier.
    kind: 'gaussian' or 'uniform'.
    step_size: L2 length of a step; default 2 * eps / steps (Salman et al.).

  Returns:
    x_adv [B, H, W, C], with stop_gradient: no gradient flows through the
    attack to x, sigma or the model's variables.

  References:
    Salman et al. Provably Robust Deep Learning via Adversarially Trained
    Smoothed Classifiers. NeurIPS 2019 (code: attacks.py, PGD_L2).
  """
  steps = int(steps)
  if steps < 0:
    raise InputError(f"steps must be >= 0; got {steps}")
  num_samples = validate.check_count(num_samples, "num_samples")
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  sigma = jax.lax.stop_gradient(_per_example_sigma(sigma, x.shape[0]))
  labels = jnp.asarray(labels, jnp.int32)
  if steps == 0:
    return x
  eps = jax.lax.stop_gradient(jnp.asarray(eps, jnp.float32))
  step_size = (2.0 * eps / steps if step_size is None
               else jnp.asarray(step_size, jnp.float32))
  noise = noise_like(key, x, sigma, num_samples, kind)

  def objective(delta):
    logits = _forward_noisy(forward, x + delta, noise)
    return -jnp.sum(smoothed_log_prob(logits, labels))

  grad_fn = jax.grad(objective)

  def step(delta, _):
    g = grad_fn(delta)
    g_norm = _l2_per_example(g)
    g = g / _per_example(jnp.where(g_norm > 0, g_norm, 1.0), g)
    delta = delta + step_size * g
    norm = _l2_per_example(delta)
    scale = jnp.where(norm > eps, eps / jnp.where(norm > eps, norm, 1.0), 1.0)
    delta = delta * _per_example(scale, delta)
    delta = jnp.clip(x + delta, 0.0, 1.0) - x
    return delta, None

  delta, _ = jax.lax.scan(step, jnp.zeros_like(x), None, length=steps)
  return jax.lax.stop_gradient(jnp.clip(x + delta, 0.0, 1.0))


def smoothadv_loss(forward: Forward, x: jax.Array, labels: jax.Array, sigma,
                   key: jax.Array, *, eps, steps: int = 2,
                   num_samples: int = 1, kind: str = "gaussian",
                   mask: Optional[jax.Array] = None):
  """SmoothAdv training loss: attack, then noise augmentation at x_adv.

  `key` is split in two: the first half keys the attack's draws
  (`smoothadv_attack`), the second the m fresh draws e'_j of the
  cross-entropy of f(x_adv + sigma_i e'_j) (`gaussian_augmentation_loss`).
  (Salman et al.'s train_pgd.py reuses the attack's noise for the training
  step; here the draws are independent.)

  Args:
    forward: `forward(images) -> logits` (the same closure serves the attack
      and the loss; pass different modes by calling `smoothadv_attack` and
      `gaussian_augmentation_loss` yourself).
    x, labels, sigma, eps, steps, num_samples, kind: see `smoothadv_attack`.
    key: PRNG key.
    mask: [B] bool/float weights of the examples (None: all).

  Returns:
    (loss, logits [B, m, K] at x_adv + noise, x_adv [B, H, W, C]).

  References:
    Salman et al. Provably Robust Deep Learning via Adversarially Trained
    Smoothed Classifiers. NeurIPS 2019.
  """
  attack_key, train_key = jax.random.split(key)
  x_adv = smoothadv_attack(forward, x, labels, sigma, attack_key, eps=eps,
                           steps=steps, num_samples=num_samples, kind=kind)
  loss, logits = gaussian_augmentation_loss(
      forward, x_adv, labels, sigma, train_key, num_samples=num_samples,
      kind=kind, mask=mask)
  return loss, logits, x_adv


def _safe_ppf(p: jax.Array, use: jax.Array) -> jax.Array:
  """Phi^-1(p) where `use`, Phi^-1(0.5) = 0 elsewhere, with clean gradients.

  The input itself is replaced (not just the output), so an unused p = 0 or 1
  passes neither an infinite value nor a NaN gradient.
  """
  return jnp.where(use, jnorm.ppf(jnp.where(use, p, 0.5)), 0.0)


def macer_loss(logits: jax.Array, labels: jax.Array, sigma, *,
               lbd: float = 12.0, gamma: float = 8.0, beta: float = 16.0,
               variant: str = "macer", clip: tuple[float, float] = (0.02, 0.98),
               mask: Optional[jax.Array] = None):
  """MACER loss from the logits of k noisy copies per example.

  With psi_i = (1/k) sum_j softmax(logits_ij), the classification term is
  mean_i NLL_i, NLL_i = -log(psi_i[y_i] + 1e-10) (MACER's code). Then:

  variant 'macer' (Zhai et al.'s code): with beta_psi_i = (1/k) sum_j
  softmax(beta logits_ij), its top two entries p1 >= p2 and the index of p1;
  the examples with that index == y_i, p1 and p2 in (0, 1) (a finite gap) and
  |gap_i| <= gamma, gap_i = Phi^-1(p1) - Phi^-1(p2), are kept, and

    loss = (sum_i NLL_i + lbd * sum_kept (gamma - gap_i) sigma_i / 2) / B.

  variant 'ddrs' (the DDRS MACER script): with p1 >= p2 the top two of psi_i
  clipped to `clip` (a clipped probability passes no gradient),
  R_i = sigma_i / 2 (Phi^-1(p1) - Phi^-1(p2)) (`sigma_opt.proxy_from_probs`,
  the proxy of the sigma ascent) and C the examples with
  argmax psi_i == y_i,

    loss = mean_i NLL_i + lbd * mean_{i in C} relu(gamma - R_i)   (0 if C = {}).

  With the default clip R_i <= 2.054 sigma_i, so for gamma = 8 and sigma < 3.9
  the hinge never binds: a linear reward on R.

  In both, loss = aux['classification'] + lbd * aux['robustness']; with a mask,
  B and the means run over the kept examples (weighted by a float mask). The
  loss and its gradient are finite for saturated softmaxes (p1 = 1, p2 = 0):
  such examples are dropped (as the official code drops inf/NaN gaps) and
  Phi^-1 never sees them.

  Args:
    logits: [B, k, K] logits of f(x_i + sigma_i e_ij) (the caller runs the
      forward; any float dtype, computed in float32).
    labels: [B] int labels.
    sigma: [B] noise levels of the copies (a scalar is broadcast).
    lbd: lambda, weight of the robustness term (MACER and DDRS: 12).
    gamma: hinge threshold (8 in both).
    beta: inverse temperature of the 'macer' variant (16); unused by 'ddrs'.
    variant: 'macer' or 'ddrs'.
    clip: probability clip of the 'ddrs' proxy; unused by 'macer'.
    mask: [B] bool/float weights of the examples (None: all).

  Returns:
    (loss, aux) with aux = {'classification': mean NLL, 'robustness': the
    term lbd multiplies, 'num_correct': (weighted) count of correctly
    classified examples ('macer': by beta_psi, its G_theta; 'ddrs': by psi)}.

  References:
    Zhai et al. MACER: Attack-free and Scalable Robust Training via Maximizing
    Certified Radius. ICLR 2020 (code: macer.py, macer_train).
    Alfarra et al. Data Dependent Randomized Smoothing. UAI 2022.
  """
  if variant not in MACER_VARIANTS:
    raise InputError(f"variant must be one of {MACER_VARIANTS}; got "
                     f"{variant!r}")
  logits = jnp.asarray(logits).astype(jnp.float32)
  if logits.ndim != 3:
    raise InputError(f"logits must have shape [B, k, K]; got {logits.shape}")
  b = logits.shape[0]
  labels = jnp.asarray(labels, jnp.int32)
  sigma = _per_example_sigma(sigma, b)
  w = _weights(mask, b)
  kept = w != 0

  psi = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
  psi_y = jnp.take_along_axis(psi, labels[:, None], axis=-1)[:, 0]
  classification = _weighted_mean(-jnp.log(psi_y + 1e-10), w)

  if variant == "macer":
    beta_psi = jnp.mean(jax.nn.softmax(beta * logits, axis=-1), axis=1)
    top, idx = jax.lax.top_k(beta_psi, 2)
    p1, p2 = top[:, 0], top[:, 1]
    correct = idx[:, 0] == labels
    finite = (p1 > 0) & (p1 < 1) & (p2 > 0) & (p2 < 1)
    candidate = kept & correct & finite
    # Selection on values only; the kept examples' gap is then recomputed
    # with gradients, Phi^-1 seeing only them.
    gap_value = jax.lax.stop_gradient(
        _safe_ppf(p1, candidate) - _safe_ppf(p2, candidate))
    use = candidate & jnp.isfinite(gap_value) & (jnp.abs(gap_value) <= gamma)
    gap = _safe_ppf(p1, use) - _safe_ppf(p2, use)
    terms = jnp.where(use, (gamma - gap) * sigma / 2.0, 0.0)
    robustness = _weighted_mean(terms, w)
  else:
    top, idx = jax.lax.top_k(psi, 2)
    p = jnp.clip(top, clip[0], clip[1])
    radius = sigma_opt.proxy_from_probs(p, sigma, "gaussian")
    correct = idx[:, 0] == labels
    hinge = jax.nn.relu(gamma - radius)
    robustness = _weighted_mean(hinge, w * correct.astype(jnp.float32))

  loss = classification + lbd * robustness
  aux = {
      "classification": classification,
      "robustness": robustness,
      "num_correct": jnp.sum(jnp.where(correct, w, 0.0)),
  }
  return loss, aux
