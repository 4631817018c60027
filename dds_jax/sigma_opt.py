"""Per-input sigma: gradient ascent on the radius proxy (Alfarra et al.).

For an input x, the soft smoothed classifier at noise level s is estimated with
the reparameterisation trick, fresh noise each step:

  psi(s; x) = (1/m) sum_j softmax(f(x + s e_j)),  e_j ~ N(0, I)  (or U(-1, 1)),

and the radius proxy, with p1 >= p2 the two largest entries of psi (no label):

  gaussian (L2): R(s; x) = s/2 (Phi^-1(clip(p1)) - Phi^-1(clip(p2)))
  uniform  (L1): R(s; x) = s (clip(p1) - clip(p2))

`optimize_sigma` runs K steps of s <- max(s + lr dR/ds, sigma_min) per input,
the model frozen. A clipped probability passes no gradient. `ascent` is the
one implementation, used at certification and in training: a scan over the
steps, each a forward pass over all m copies of all examples of a device with
the value and derivative of every example's proxy (forward mode: sigma is a
scalar per example); examples are sharded over the `data` mesh axis like the
sampler. The noise of step k of an example depends only on (key, example
id, k), so the result does not depend on batching or device count. A step
whose gradient is NaN or infinite leaves that example's sigma unchanged and is
counted (`SigmaInfo.nonfinite_steps`) and logged, never propagated.

A second, certificate-aware way to choose sigma: `select_sigma_grid` counts
pilot draws (their own noise stream) at every sigma of a grid and takes the
one whose plug-in Cohen radius at the certification's N and alpha is largest
(the certificate that will be issued, not the proxy; QCRS's reference code,
ntuaislab/QCRS, likewise searches sigma on the Cohen radius itself).

References:
  Alfarra, Bibi, Torr, Ghanem. Data Dependent Randomized Smoothing. UAI 2022.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.scipy.stats import norm as jnorm
from jax.sharding import NamedSharding, PartitionSpec as P

from dds_jax import distributed
from dds_jax import noise as noise_lib
from dds_jax import sampler
from dds_jax import stats
from dds_jax import validate
from dds_jax.errors import InputError

DEFAULT_SIGMA_MIN = 0.01


@dataclasses.dataclass(frozen=True)
class SigmaInfo:
  """Details of an ascent, per example (numpy arrays).

  trajectory: [steps + 1, B] proxy value at each step's sigma (the last entry
    is evaluated with one more draw of fresh noise).
  sigmas: [steps + 1, B] sigma before each step, then the final sigma.
  nonfinite_steps: [B] steps skipped for a NaN or infinite gradient.
  """
  sigma: np.ndarray
  trajectory: np.ndarray
  sigmas: np.ndarray
  nonfinite_steps: np.ndarray


def proxy_from_probs(p_top2, sigma, kind: str = "gaussian"):
  """THE radius proxy, from the two largest (clipped) smoothed probabilities.

  Used by the sigma ascent (`proxy_batch`) and by the DDRS MACER loss
  (`losses.macer_loss`, variant 'ddrs').

  Args:
    p_top2: [B, 2] p1 >= p2, already clipped to (0, 1) (Phi^-1 of an
      unclipped 0 or 1 is infinite).
    sigma: [B] noise levels (or a scalar).
    kind: 'gaussian': sigma / 2 (Phi^-1(p1) - Phi^-1(p2)) (L2); 'uniform':
      sigma (p1 - p2) (L1).

  Returns:
    [B] proxy values.
  """
  if kind == "gaussian":
    return sigma / 2.0 * (jnorm.ppf(p_top2[:, 0]) - jnorm.ppf(p_top2[:, 1]))
  return sigma * (p_top2[:, 0] - p_top2[:, 1])


def proxy_batch(forward, x, sigma, eps, clip=(0.02, 0.98),
                kind: str = "gaussian"):
  """The proxy R(sigma_i; x_i) of a batch, in one forward pass.

  Args:
    forward: `forward(images) -> logits` (the model, its variables bound).
    x: [B, H, W, C] images.
    sigma: [B] noise levels.
    eps: [B, m, H, W, C] unit noise draws.
    clip: probabilities are clipped to this range (no gradient when clipped).
    kind: 'gaussian' (L2 proxy) or 'uniform' (L1 proxy).

  Returns:
    [B] proxy values.
  """
  b, m = eps.shape[:2]
  images = x[:, None] + sigma.reshape((b, 1) + (1,) * (x.ndim - 1)) * eps
  logits = forward(images.reshape((b * m,) + x.shape[1:])).reshape(b, m, -1)
  psi = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=1)
  p = jnp.clip(jax.lax.top_k(psi, 2)[0], clip[0], clip[1])
  return proxy_from_probs(p, sigma, kind)


def radius_proxy(apply_fn, params, x, sigma, eps, clip=(0.02, 0.98),
                 kind: str = "gaussian"):
  """The proxy R(sigma; x) for one example with noise draws eps [m, H, W, C]."""
  return proxy_batch(lambda im: apply_fn(params, im), x[None],
                     jnp.reshape(sigma, (1,)), eps[None], clip, kind)[0]


def _unit_noise(key, shape, kind):
  return noise_lib.draw(key, shape, jnp.float32(1.0), kind)


def ascent(forward, x, sigma0, key: jax.Array, example_ids, *, steps: int,
           lr, num_samples: int, clip=(0.02, 0.98), sigma_min=DEFAULT_SIGMA_MIN,
           kind: str = "gaussian", optimizer=None, coupled: bool = False,
           block_offset=0, purpose=noise_lib.Purpose.SIGMA_OPT):
  """K ascent steps on the proxy of a batch: the one implementation.

  Pure and jit-able: `optimize_sigma` runs it per device inside shard_map,
  training runs it inside the jitted train step on the batch's sigma table
  entries. Step k of example i draws noise keyed by (key, id_i, k +
  block_offset).

  Args:
    forward: `forward(images) -> logits`, the model frozen.
    x: [B, H, W, C] images; sigma0: [B] starting sigmas.
    key: PRNG key; example_ids: [B, 2] uint32 words of the 64-bit ids keying
      the noise (`noise.id_words`).
    steps, lr, num_samples, clip, sigma_min, kind, optimizer: see
      `optimize_sigma`.
    coupled: False when the examples do not interact (BatchNorm in inference
      mode): each derivative dR_i/ds_i comes from one forward-mode pass (jvp).
      True when they do (BatchNorm in train mode, as in the official scripts):
      the derivative is d(sum_j R_j)/ds_i, from one backward pass, as the
      official code's `radius.sum().backward()`.
    block_offset: added to the step index in the noise key (e.g. the epoch's
      offset in training, so that each epoch draws fresh noise).
    purpose: the noise stream (`Purpose.SIGMA_OPT` at certification,
      `Purpose.TRAIN_SIGMA` in training).

  Returns:
    (sigma [B], proxy values [B, steps + 1], sigmas [B, steps + 1],
     nonfinite step counts [B]).
  """
  image_shape = x.shape[1:]

  def proxy(s, k):
    eps = jax.vmap(lambda i: _unit_noise(
        noise_lib.block_key(key, purpose, i, k + block_offset),
        (num_samples,) + image_shape, kind))(example_ids)
    return proxy_batch(forward, x, s, eps, clip, kind)

  def value_and_deriv(s, k):
    if coupled:
      value, vjp = jax.vjp(lambda t: proxy(t, k), s)
      return value, vjp(jnp.ones_like(value))[0]
    # Inference mode: R_i depends on s_i alone, so one jvp with a tangent of
    # ones gives every dR_i/ds_i (about two forward passes, no stored
    # activations) instead of a backward pass.
    return jax.jvp(lambda t: proxy(t, k), (s,), (jnp.ones_like(s),))

  opt_state = optimizer.init(sigma0) if optimizer is not None else ()

  def keep_finite(finite, new, old):
    return jax.tree.map(
        lambda a, b: jnp.where(finite, a, b) if a.shape == finite.shape else a,
        new, old)

  def step(carry, k):
    s, opt_state, bad = carry
    value, g = value_and_deriv(s, k)
    finite = jnp.isfinite(g)
    g = jnp.where(finite, g, 0.0)
    if optimizer is None:
      new = s + lr * g
    else:
      updates, new_opt = optimizer.update(-g, opt_state, s)
      new = optax.apply_updates(s, updates)
      opt_state = keep_finite(finite, new_opt, opt_state)
    new = jnp.where(finite, jnp.maximum(new, sigma_min), s)
    return (new, opt_state, bad + (~finite)), (value, s)

  sigma0 = jnp.asarray(sigma0, jnp.float32)
  (s, _, bad), (values, sigmas) = jax.lax.scan(
      step, (sigma0, opt_state, jnp.zeros(sigma0.shape, jnp.int32)),
      jnp.arange(steps))
  final = proxy(s, steps)
  return (s, jnp.concatenate([values, final[None]]).T,
          jnp.concatenate([sigmas, s[None]]).T, bad)


@functools.lru_cache(maxsize=None)
def make_optimizer(name: str, lr: float) -> Optional[
    optax.GradientTransformation]:
  """The sigma optimizer of a config: None for the paper's plain ascent.

  Memoized: the same (name, lr) gives the same object, so the ascent's compile
  cache (keyed on it) hits across certification calls.
  """
  if name == "ascent":
    return None
  makers = {"sgd": optax.sgd, "adam": optax.adam}
  if name not in makers:
    raise InputError(f"sigma optimizer must be ascent, sgd or adam; got "
                     f"{name!r}")
  return makers[name](lr)


@functools.lru_cache(maxsize=32)
def _ascent_fn(apply_fn, mesh, steps, num_samples, clip, kind, optimizer):
  """The jitted ascent, examples sharded over the mesh's `data` axis."""

  def local(params, key, lr, sigma_min, x, sigma0, ids):
    return ascent(lambda im: apply_fn(params, im), x, sigma0, key, ids,
                  steps=steps, lr=lr, num_samples=num_samples, clip=clip,
                  sigma_min=sigma_min, kind=kind, optimizer=optimizer)

  data = P(distributed.DATA_AXIS)
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(), P(), P(), P(), data, data, data),
                     out_specs=(data, data, data, data),
                     check_vma=False)
  return jax.jit(fn)


def optimize_sigma(apply_fn, params, x, sigma0, key: jax.Array, *,
                   steps: int = 100, lr: float = 1e-4, num_samples: int = 1,
                   clip: tuple[float, float] = (0.02, 0.98),
                   sigma_min: float = DEFAULT_SIGMA_MIN,
                   noise: str = "gaussian",
                   optimizer: Optional[optax.GradientTransformation] = None,
                   example_ids=None,
                   examples_per_device: int = 8,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   return_info: bool = False):
  """Per-example sigma maximising the radius proxy by gradient ascent.

  Args:
    apply_fn: `apply_fn(params, images) -> logits` (inference mode).
    params: the model's variables (frozen).
    x: [B, H, W, C] images in [0, 1].
    sigma0: scalar or [B] starting sigma (the model's training sigma).
    key: PRNG key; step k of example i uses noise keyed by (key, id_i, k).
    steps: K ascent steps (paper: 100 at certification).
    lr: step size of the plain ascent (paper: 1e-4).
    num_samples: m noise draws per step (paper: 1 on ImageNet, 64 in the
      CIFAR MACER script).
    clip: probabilities are clipped to this range (paper: (0.02, 0.98)).
    sigma_min: floor of sigma (> 0); the official code has none.
    noise: 'gaussian' (L2 proxy) or 'uniform' (L1 proxy, s the half-width).
    optimizer: an optax optimizer to use instead of the plain ascent (it is
      given -dR/ds, so it maximises R); None for the paper's ascent. Build it
      once (`make_optimizer`) and reuse it: the compiled ascent is cached on
      the object.
    example_ids: [B] 64-bit ids keying the noise (default: a hash of each
      image's content, `noise.content_ids`).
    examples_per_device: examples per device per call (fixes the compiled
      shape; the forward batch is examples_per_device * num_samples).
    mesh: a mesh with a `data` axis (default: all devices).
    return_info: also return a `SigmaInfo` with the trajectory.

  Multi-host: every process passes its own examples (any number, also none)
  and gets their sigmas; the calls of all processes run together.

  Returns:
    float64 [B] sigma, or (sigma, SigmaInfo) when return_info.
  """
  x = validate.check_images(x, allow_empty=jax.process_count() > 1)
  b = x.shape[0]
  sigma0 = validate.check_sigma(sigma0, b)
  steps = int(steps)
  if steps < 0:
    raise InputError(f"steps must be >= 0; got {steps}")
  num_samples = validate.check_count(num_samples, "num_samples")
  examples_per_device = validate.check_count(examples_per_device,
                                             "examples_per_device")
  if not (math.isfinite(lr) and lr > 0):
    raise InputError(f"lr must be finite and > 0; got {lr}")
  lo, hi = (float(c) for c in clip)
  if not 0.0 < lo < hi < 1.0:
    raise InputError(f"clip must satisfy 0 < lo < hi < 1; got {clip}")
  if not (math.isfinite(sigma_min) and sigma_min > 0):
    raise InputError(f"sigma_min must be finite and > 0; got {sigma_min}")
  if np.any(sigma0 < sigma_min):
    raise InputError(f"sigma0 ({sigma0.min():.4g}) is below sigma_min "
                     f"({sigma_min:.4g})")
  validate.check_noise(noise)
  sampler.num_classes_of(apply_fn, params, x)  # a clear error for bad shapes
  example_ids = sampler.check_example_ids(example_ids, x)
  mesh = mesh or distributed.make_mesh()
  # Each process brings its own examples (see dds_jax.distributed); the
  # global call holds examples_per_device of them per device.
  chunk = examples_per_device * len(distributed.local_devices(mesh))
  global_chunk = examples_per_device * mesh.shape[distributed.DATA_AXIS]
  fn = _ascent_fn(apply_fn, mesh, steps, num_samples, (lo, hi), noise,
                  optimizer)
  sharding = NamedSharding(mesh, P(distributed.DATA_AXIS))
  params, key = distributed.replicate((params, key), mesh)
  if b == 0:  # no examples of our own: run padding with a blank image
    x, sigma0 = np.zeros((1,) + x.shape[1:], np.float32), np.ones(1, np.float32)
    example_ids = np.zeros(1, np.int64)
  ncalls = distributed.max_over_processes(math.ceil(b / chunk))

  outs = []
  for start in range(0, ncalls * chunk, chunk):
    idx = np.arange(start, min(start + chunk, b))
    take = np.concatenate([idx, np.zeros(chunk - idx.size, np.int64)])
    args = (x[take], sigma0[take], noise_lib.id_words(example_ids[take]))
    args = [distributed.to_global(a, sharding, global_chunk) for a in args]
    outs.append((idx.size, fn(params, key, jnp.float32(lr),
                              jnp.float32(sigma_min), *args)))
  parts = [[distributed.host_rows(o)[:n] for o in out] for n, out in outs]
  if not parts:
    parts = [[np.zeros((0,)), np.zeros((0, steps + 1)),
              np.zeros((0, steps + 1)), np.zeros((0,), np.int32)]]
  sigma, traj, sigmas, bad = (np.concatenate(z) for z in zip(*parts))
  traj, sigmas = traj.T, sigmas.T  # [steps + 1, B]
  if bad.any():
    logging.warning("optimize_sigma: %d example(s) had NaN/inf gradients in "
                    "%d step(s) in total; those steps were skipped",
                    int((bad > 0).sum()), int(bad.sum()))
  sigma = sigma.astype(np.float64)
  if not return_info:
    return sigma
  return sigma, SigmaInfo(sigma=sigma, trajectory=traj.astype(np.float64),
                          sigmas=sigmas.astype(np.float64),
                          nonfinite_steps=bad.astype(np.int64))


@functools.lru_cache(maxsize=32)
def _proxy_fn(apply_fn, num_samples, clip, noise):
  """Jitted proxy evaluation, compiled once per model and setting."""

  @jax.jit
  def run(params, key, xs, ss, ids):
    def one(xi, si, idi):
      k = noise_lib.block_key(key, noise_lib.Purpose.PROXY_EVAL, idi, 0)
      eps = _unit_noise(k, (num_samples,) + xi.shape, noise)
      return radius_proxy(apply_fn, params, xi, si, eps, clip, noise)
    return jax.lax.map(lambda a: one(*a), (xs, ss, ids))
  return run


def evaluate_proxy(apply_fn, params, x, sigma, key: jax.Array, *,
                   num_samples: int = 256,
                   clip: tuple[float, float] = (0.02, 0.98),
                   noise: str = "gaussian", example_ids=None) -> np.ndarray:
  """The radius proxy at given sigmas, with the same noise for any sigma.

  The draws e_j of an example depend only on (key, example id), so comparing
  sigma0 with the optimized sigma compares the proxy, not the noise.

  Returns:
    float64 [B] proxy values.
  """
  x = validate.check_images(x)
  sigma = validate.check_sigma(sigma, x.shape[0])
  num_samples = validate.check_count(num_samples, "num_samples")
  ids = sampler.check_example_ids(example_ids, x)

  run = _proxy_fn(apply_fn, num_samples, tuple(float(c) for c in clip), noise)
  return np.asarray(run(params, key, x, sigma, noise_lib.id_words(ids)),
                    np.float64)


def selection_cost(method: str, *, grid_size: int = 0, pilot: int = 0,
                   steps: int = 0, num_samples: int = 0,
                   selector_draws: int = 0) -> int:
  """Forward passes per example spent on choosing sigma.

  grid: every candidate's pilot draws (grid_size * pilot); ascent: each
  step's forward-mode derivative costs about two forward passes of its
  num_samples draws, plus the final proxy evaluation; selector: the smoothed
  selector's n0 + n draws (`dds_jax.dual`; passes of the selector network,
  not of the classifier); any other method (fixed, a sigma file): none.
  """
  if method == "grid":
    return int(grid_size) * int(pilot)
  if method == "ascent":
    return (2 * int(steps) + 1) * int(num_samples)
  if method == "selector":
    return int(selector_draws)
  return 0


@dataclasses.dataclass(frozen=True)
class GridChoice:
  """What `select_sigma_grid` saw, per example (numpy arrays).

  sigma: [B] the chosen sigma.
  expected_radius: [B, G] plug-in Cohen radius of each grid sigma at the
    target N (0 where it would abstain).
  counts: [B, G] pilot hits of each grid sigma's top class (the expected
    radius is of that class; candidates are the sigmas whose top class is
    the one predicted nearest sigma0).
  forward_passes: pilot forward passes per example (G * pilot).
  """
  sigma: np.ndarray
  expected_radius: np.ndarray
  counts: np.ndarray
  forward_passes: int


def plug_in_radius(top_counts, num_draws: int, sigma, n: int, alpha: float,
                   noise: str = "gaussian") -> np.ndarray:
  """Cohen's radius at n draws if the top class kept the pilot's frequency.

  p_hat = top_counts / num_draws; the radius of a certificate with
  round(p_hat * n) hits out of n (Clopper-Pearson at alpha), 0 where it
  would abstain. The certificate that will actually be issued, estimated.
  """
  p_hat = np.asarray(top_counts, np.float64) / num_draws
  n_a = np.rint(p_hat * n).astype(np.int64)
  p_lower = stats.lower_confidence_bound(n_a, n, alpha)
  return stats.radius_from_p_lower(p_lower, sigma, noise)


def select_sigma_grid(apply_fn, params, x, key: jax.Array, *, grid,
                      pilot: int = 1000, n: int = 10_000,
                      alpha: float = 0.001, sigma0: Optional[float] = None,
                      noise: str = "gaussian", example_ids=None,
                      batch_size: int = sampler.DEFAULT_BATCH_SIZE,
                      samples_per_block: int = sampler.DEFAULT_SAMPLES_PER_BLOCK,
                      mesh: Optional[jax.sharding.Mesh] = None,
                      ) -> GridChoice:
  """Certificate-aware sigma: the grid sigma with the largest expected radius.

  For every sigma s of the grid, `pilot` draws of their own noise stream
  (`Purpose.PILOT`, never used for CERTIFY's selection or estimation) count
  the classes of f(x + s e); the top class's frequency gives the plug-in Cohen
  radius at the certification's n and alpha (`plug_in_radius`). Among the
  sigmas whose pilot top class is the one predicted at the grid sigma nearest
  sigma0, the one with the largest radius is chosen. No label is used. Ties,
  and inputs where every candidate would abstain, go to the grid sigma
  closest to sigma0 (in log sigma; default the grid's median). The same unit draws serve every
  grid sigma (common random numbers), so the comparison is between sigmas,
  not noise. Certifying at the chosen sigma is data-dependent: make it sound
  with the memory (`certify.soundness = "memory"`).

  Args:
    apply_fn, params: the model.
    x: [B, H, W, C] images in [0, 1].
    key: PRNG key (the run's; the pilot stream is its own purpose of it).
    grid: the candidate sigmas (> 0).
    pilot: draws per grid sigma per example.
    n, alpha: the certification's N and alpha (the radius to maximise).
    sigma0: where ties go (default: the grid's median).
    noise, example_ids, batch_size, samples_per_block, mesh: see
      `dds_jax.sampler.sample_counts`.

  Returns:
    A `GridChoice`; its forward_passes is the pilot's cost per example, to
    compare with CERTIFY's n0 + n.
  """
  grid = np.asarray(sorted(float(g) for g in grid), np.float64)
  if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
    raise InputError(f"grid must hold sigmas > 0; got {grid}")
  pilot = validate.check_count(pilot, "pilot")
  n = validate.check_count(n, "n")
  alpha = validate.check_alpha(alpha)
  x = validate.check_images(x, allow_empty=jax.process_count() > 1)
  b, g = x.shape[0], grid.size
  example_ids = sampler.check_example_ids(example_ids, x)
  # Every (example, grid sigma) pair is one row; a row's noise is keyed by
  # the example's id, so all sigmas of an example scale the same unit draws.
  rows = np.repeat(np.arange(b), g)
  counts = sampler.sample_counts(
      apply_fn, params, x[rows], np.tile(grid, b), key, pilot,
      batch_size=batch_size, example_ids=example_ids[rows],
      purpose=noise_lib.Purpose.PILOT, samples_per_block=samples_per_block,
      noise=noise, mesh=mesh)
  counts = counts.reshape(b, g, counts.shape[-1])  # b may be 0 on a process
  top = counts.max(axis=2)
  radius = plug_in_radius(top, pilot, grid[None, :], n, alpha, noise)
  center = float(np.median(grid)) if sigma0 is None else float(sigma0)
  closeness = -np.abs(np.log(grid) - np.log(center))
  # The class is the one predicted at the grid sigma nearest sigma0: a sigma
  # whose pilot prefers another class (e.g. the class that large noise makes
  # of any input) is no candidate, however large its radius.
  top_class = counts.argmax(axis=2)
  keep = top_class == top_class[:, [int(np.argmax(closeness))]]
  score = np.where(keep, radius, -1.0)
  # Largest radius; among equal ones the sigma closest to sigma0.
  order = np.lexsort((np.broadcast_to(closeness, radius.shape), score),
                     axis=1)
  choice = order[:, -1] if b else np.zeros(0, np.int64)
  return GridChoice(sigma=grid[choice], expected_radius=radius,
                    counts=top,
                    forward_passes=selection_cost("grid", grid_size=g,
                                                  pilot=pilot))


def make_sigma_fn(apply_fn, params, sigma0, key: jax.Array, **kwargs):
  """`sigma_fn(x_batch) -> sigma [B]` for `dds_jax.memory.MemoryClassifier`.

  Noise is keyed by each image's content (`noise.content_ids`, the default
  of `optimize_sigma`), so an image gets the same sigma alone or in any
  batch. kwargs go to `optimize_sigma`.
  """
  def sigma_fn(x):
    return optimize_sigma(apply_fn, params, x, sigma0, key, **kwargs)
  return sigma_fn
