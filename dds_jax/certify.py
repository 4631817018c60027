"""CERTIFY and PREDICT of the smoothed classifier (Cohen et al.).

g(x) = argmax_c P_e[argmax f(x + e) = c], e ~ N(0, sigma^2 I) (or U(-s, s)
per coordinate for L1). `certify` draws n0 copies to pick the top class c_A
and n fresh copies to lower-bound its probability; `predict` runs the binomial
test on the top two counts. Sampling is `dds_jax.sampler`; counts become a
radius in `dds_jax.stats`.

References:
  Cohen, Rosenfeld, Kolter. Certified Adversarial Robustness via Randomized
  Smoothing. ICML 2019.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from dds_jax import noise as noise_lib
from dds_jax import sampler
from dds_jax import stats
from dds_jax import validate


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
  pred, radius, p_lower = stats.certificate_from_counts(counts0, counts, sigma,
                                                        alpha, noise)
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
