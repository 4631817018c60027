"""Where noise is drawn: keys and distributions of the smoothing noise.

The noise of an example is a pure function of (key, purpose, global example id,
block index): `block_key` folds those in, never a device or process index.
Counts and radii then do not change with batch size, device count, host count
or restart point.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

NOISE_KINDS = ("gaussian", "uniform")


class Purpose(enum.IntEnum):
  """Independent noise streams: each use of noise gets fresh draws."""
  SELECT = 0     # CERTIFY's n0 draws that pick the top class
  ESTIMATE = 1   # CERTIFY's n draws that bound its probability
  PREDICT = 2    # PREDICT's n draws
  SIGMA_OPT = 3  # the radius-proxy ascent over sigma
  TRAIN = 4      # noise augmentation in training


def block_key(key: jax.Array, purpose, example_id, block) -> jax.Array:
  """The key of one block of noise of one example."""
  key = jax.random.fold_in(key, purpose)
  key = jax.random.fold_in(key, example_id)
  return jax.random.fold_in(key, block)


def draw(key: jax.Array, shape, sigma, kind: str = "gaussian",
         dtype=jnp.float32) -> jax.Array:
  """Noise of scale sigma.

  Args:
    key: a PRNG key.
    shape: output shape.
    sigma: scalar (traced is fine): the standard deviation for 'gaussian', the
      half-width s of U(-s, s) per coordinate for 'uniform' (L1 smoothing).
    kind: 'gaussian' or 'uniform'.
    dtype: output dtype.

  Returns:
    An array of `shape`.
  """
  if kind == "gaussian":
    return sigma * jax.random.normal(key, shape, dtype)
  if kind == "uniform":
    return sigma * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
  raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
