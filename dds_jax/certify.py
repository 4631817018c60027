"""CERTIFY and PREDICT of the smoothed classifier (Cohen et al.).

g(x) = argmax_c P_e[argmax f(x + e) = c], e ~ N(0, sigma^2 I) (or U(-s, s)
per coordinate for L1). `certify` draws n0 copies to pick the top class c_A
and n fresh copies to lower-bound its probability; `predict` runs the binomial
test on the top two counts; `certify_at` answers "certified at radius r?"
with as few draws as an anytime-valid confidence sequence needs. Sampling is
`dds_jax.sampler`; counts become a radius in `dds_jax.stats`.

References:
  Cohen, Rosenfeld, Kolter. Certified Adversarial Robustness via Randomized
  Smoothing. ICML 2019.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional

import jax
import numpy as np

from dds_jax import distributed
from dds_jax import noise as noise_lib
from dds_jax import sampler
from dds_jax import stats
from dds_jax import validate
from dds_jax.errors import InputError


BOUNDS = ("clopper_pearson", "randomized")


@dataclasses.dataclass(frozen=True)
class Certificate:
  """Per-example result of `certify` (numpy arrays over the batch).

  pred is `stats.ABSTAIN` (-1) with radius 0 where p_lower < 1/2.
  """
  pred: np.ndarray
  radius: np.ndarray
  p_lower: np.ndarray
  sigma: np.ndarray
  counts0: np.ndarray
  counts: np.ndarray


def certify(apply_fn: sampler.ApplyFn, params, x, sigma, key: jax.Array,
            n0: int = 100, n: int = 100_000, alpha: float = 0.001, *,
            batch_size: int = sampler.DEFAULT_BATCH_SIZE,
            num_classes: Optional[int] = None,
            example_ids=None,
            samples_per_block: int = sampler.DEFAULT_SAMPLES_PER_BLOCK,
            noise: str = "gaussian",
            mesh: Optional[jax.sharding.Mesh] = None,
            progress: Optional[Callable[[int, int], None]] = None,
            bound: str = "clopper_pearson",
            ) -> Certificate:
  """Cohen's CERTIFY for a batch of examples, each with its own sigma.

  Args:
    apply_fn: `apply_fn(params, images) -> logits`.
    params: the model's variables.
    x: [B, H, W, C] images in [0, 1].
    sigma: scalar or [B] noise level (> 0).
    key: PRNG key; selection and estimation use independent streams of it.
      Without example_ids each image's noise is keyed by a hash of its
      content, so separate calls on different images draw different noise.
    n0: draws to select the top class.
    n: draws to estimate its probability.
    alpha: failure probability of each certificate.
    batch_size, num_classes, example_ids, samples_per_block, noise, mesh:
      see `dds_jax.sampler.sample_counts`.
    progress: called as progress(samples_done, samples_total).
    bound: 'clopper_pearson' (Cohen's) or 'randomized' (the randomized
      Clopper-Pearson bound, `stats.randomized_lower_bound`, with one U(0, 1)
      per example from its own stream `Purpose.BOUND`: exact coverage 1 -
      alpha, never below the plain bound).

  Returns:
    A `Certificate`; radius is an L2 radius for gaussian noise, L1 for uniform.
  """
  n0 = validate.check_count(n0, "n0")
  n = validate.check_count(n, "n")
  alpha = validate.check_alpha(alpha)
  x = validate.check_images(x, allow_empty=jax.process_count() > 1)
  sigma = validate.check_sigma(sigma, x.shape[0])
  # Selection (n0) and estimation (n) draws are independent noise streams;
  # one sampler pass packs both into the same device batches.
  counts0, counts = sampler.sample_streams(
      apply_fn, params, x, sigma, key,
      ((noise_lib.Purpose.SELECT, n0), (noise_lib.Purpose.ESTIMATE, n)),
      num_classes, batch_size, example_ids=example_ids,
      samples_per_block=samples_per_block, noise=noise, mesh=mesh,
      progress=progress)
  if bound not in BOUNDS:
    raise InputError(f"unknown bound {bound!r}; expected one of {BOUNDS}")
  w = None
  if bound == "randomized":
    w = noise_lib.uniforms(key, noise_lib.Purpose.BOUND,
                           sampler.check_example_ids(example_ids, x))
  pred, radius, p_lower = stats.certificate_from_counts(counts0, counts, sigma,
                                                        alpha, noise, w=w)
  return Certificate(pred=pred, radius=radius, p_lower=p_lower,
                     sigma=sigma.astype(np.float64), counts0=counts0,
                     counts=counts)


def predict(apply_fn: sampler.ApplyFn, params, x, sigma, key: jax.Array,
            n: int = 100_000, alpha: float = 0.001, *,
            batch_size: int = sampler.DEFAULT_BATCH_SIZE,
            num_classes: Optional[int] = None,
            example_ids=None,
            samples_per_block: int = sampler.DEFAULT_SAMPLES_PER_BLOCK,
            noise: str = "gaussian",
            mesh: Optional[jax.sharding.Mesh] = None) -> np.ndarray:
  """Cohen's PREDICT: [B] classes, `stats.ABSTAIN` where the test fails.

  The top class is returned when the two-sided binomial test of n1 out of
  n1 + n2 at p = 1/2 has p-value <= alpha (n1 >= n2 the top two counts).
  """
  n = validate.check_count(n, "n")
  alpha = validate.check_alpha(alpha)
  counts = sampler.sample_counts(
      apply_fn, params, x, sigma, key, n, num_classes=num_classes,
      batch_size=batch_size, example_ids=example_ids,
      purpose=noise_lib.Purpose.PREDICT, samples_per_block=samples_per_block,
      noise=noise, mesh=mesh)
  return stats.prediction_from_counts(counts, alpha)


@dataclasses.dataclass(frozen=True)
class Decision:
  """Per-example result of `certify_at` (numpy arrays over the batch).

  pred: c_A where certified at the radius, else `stats.ABSTAIN`.
  certified: whether the smoothed classifier is certified at the radius.
  radius: the radius where certified, else 0.
  samples: draws used, n0 + estimation draws (at most n0 + max_samples).
  hits, draws: c_A's hits in the estimation draws, and their number.
  sigma: the noise level of each example.
  """
  pred: np.ndarray
  certified: np.ndarray
  radius: np.ndarray
  samples: np.ndarray
  hits: np.ndarray
  draws: np.ndarray
  sigma: np.ndarray


def round_ends(max_samples: int, first: int, samples_per_block: int,
               growth: float = 2.0) -> list[int]:
  """Cumulative estimation draws after each round: about first * growth^k.

  Every end but the last is a whole number of blocks (at least one block
  more than the previous end), so every round starts on a block boundary;
  the last ends at max_samples. growth = 2 gives the union-bound sequence's
  checkpoints T_0 2^k.
  """
  if not growth > 1:
    raise InputError(f"round growth must be > 1; got {growth}")
  block = samples_per_block
  t = block * max(1, math.ceil(first / block))
  ends = []
  while t < max_samples:
    ends.append(t)
    t = max(t + block, block * math.ceil(t * growth / block))
  return ends + [max_samples]


# Round growth per sequence: the union bound's checkpoints double (its
# levels alpha / (k (k + 1)) are spent per checkpoint); the betting sequence
# is valid at every draw, so it looks more often.
ROUND_GROWTH = {"union": 2.0, "betting": 1.25}


def certify_at(apply_fn: sampler.ApplyFn, params, x, sigma, key: jax.Array,
               radius: float, alpha: float = 0.001, *, n0: int = 100,
               max_samples: int = 100_000, sequence: str = "betting",
               first_round: Optional[int] = None,
               batch_size: int = sampler.DEFAULT_BATCH_SIZE,
               num_classes: Optional[int] = None,
               example_ids=None,
               samples_per_block: int = sampler.DEFAULT_SAMPLES_PER_BLOCK,
               noise: str = "gaussian",
               mesh: Optional[jax.sharding.Mesh] = None) -> Decision:
  """Sequential certification at one radius with an anytime-valid sequence.

  n0 draws (`Purpose.SELECT`) pick c_A. Then estimation draws
  (`Purpose.ESTIMATE`) come in rounds of growing size (`round_ends`: the
  first of `first_round` draws, default one block, then growing by
  `ROUND_GROWTH[sequence]`); round k draws blocks no earlier round drew.
  After each round an example stops as soon as the confidence sequence
  (`stats.sequence_decision`: 'betting' or 'union') puts p_A above
  `stats.p_threshold(radius, sigma)` (certified) or below it (not
  certified); stopped examples leave the later rounds, so
  device batches hold only examples still running. At max_samples the
  undecided are not certified. A certified decision is wrong with
  probability at most alpha, whenever the example stopped.

  Args:
    radius: the radius r >= 0 to certify at.
    alpha: failure probability of a certified decision.
    n0: selection draws.
    max_samples: the most estimation draws per example.
    sequence: 'betting', 'union' or 'adaptive' (the Horvath-style
      reference, stages `stats.ADAPTIVE_STAGES`).
    first_round: draws of the first round (default samples_per_block).
    Others: see `certify`.

  Returns:
    A `Decision`.
  """
  if not (isinstance(radius, numbers.Real) and math.isfinite(radius)
          and radius >= 0):
    raise InputError(f"radius must be a number >= 0; got {radius!r}")
  n0 = validate.check_count(n0, "n0")
  max_samples = validate.check_count(max_samples, "max_samples")
  alpha = validate.check_alpha(alpha)
  if sequence not in stats.SEQUENCES:
    raise InputError(f"unknown confidence sequence {sequence!r}; expected "
                     f"one of {stats.SEQUENCES}")
  x = validate.check_images(x, allow_empty=jax.process_count() > 1)
  b = x.shape[0]
  sigma = validate.check_sigma(sigma, b)
  example_ids = sampler.check_example_ids(example_ids, x)
  common = dict(num_classes=num_classes, batch_size=batch_size,
                samples_per_block=samples_per_block, noise=noise, mesh=mesh)
  counts0 = sampler.sample_counts(apply_fn, params, x, sigma, key, n0,
                                  example_ids=example_ids,
                                  purpose=noise_lib.Purpose.SELECT, **common)
  c_a = counts0.argmax(axis=1) if b else np.zeros(0, np.int64)
  threshold = stats.p_threshold(radius, sigma.astype(np.float64), noise)
  hits = np.zeros(b, np.int64)
  draws = np.zeros(b, np.int64)
  decision = np.full(b, stats.UNDECIDED, np.int64)
  if sequence == "adaptive":  # the reference's fixed stages
    ends = [t for t in stats.ADAPTIVE_STAGES if t < max_samples] + [
        max_samples]
  else:
    ends = round_ends(max_samples, first_round or samples_per_block,
                      samples_per_block, ROUND_GROWTH[sequence])
  done = 0
  for k, end in enumerate(ends, start=1):
    run = np.nonzero(decision == stats.UNDECIDED)[0]
    # Every process runs the same rounds (the sampler is collective).
    if distributed.max_over_processes(run.size) == 0:
      break
    if run.size or jax.process_count() > 1:
      counts = sampler.sample_counts(
          apply_fn, params, x[run], sigma[run], key, end - done,
          example_ids=example_ids[run], purpose=noise_lib.Purpose.ESTIMATE,
          start_block=done // samples_per_block, **common)
      hits[run] += counts[np.arange(run.size), c_a[run]]
      draws[run] = end
      decision[run] = stats.sequence_decision(
          sequence, hits[run], draws[run], threshold[run], alpha,
          checkpoint=k)
    done = end
  certified = decision == stats.CERTIFIED
  return Decision(
      pred=np.where(certified, c_a, stats.ABSTAIN).astype(np.int64),
      certified=certified, radius=np.where(certified, float(radius), 0.0),
      samples=n0 + draws, hits=hits, draws=draws,
      sigma=sigma.astype(np.float64))
