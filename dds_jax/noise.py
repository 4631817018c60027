"""Where noise is drawn: keys and distributions of every random stream.

Every random draw of the library is a pure function of (key, purpose, global
example id, block index): `block_key` folds those in, never a device or
process index. Counts, radii, sigmas and training runs then do not change with
batch size, device count, host count or restart point.

Each use of randomness has its own `Purpose`, so no two uses ever share a
stream. Example ids are 64-bit: both 32-bit halves are folded in
(`id_words`). Without ids, an image's noise is keyed by a 64-bit hash of its
content (`content_ids`): the same image gets the same noise in any batch, and
two calls on different images draw different noise.

`NOISE_VERSION` names the scheme; results record it, and a resume across a
change of streams is refused.
"""

from __future__ import annotations

import enum
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from dds_jax.validate import NOISE_KINDS

# Version of the key derivation. 1: purpose and a 31-bit id folded in, init
# and training evaluation keyed by bare fold_in(key, 0/1). 2: every stream a
# Purpose, 64-bit ids (both halves folded in), content-hash default ids.
NOISE_VERSION = 2


class Purpose(enum.IntEnum):
  """Independent noise streams. Append only: a value is never reused."""
  SELECT = 0        # CERTIFY's n0 draws that pick the top class
  ESTIMATE = 1      # CERTIFY's n draws that bound its probability
  PREDICT = 2       # PREDICT's n draws
  SIGMA_OPT = 3     # the radius-proxy ascent over sigma at certification
  TRAIN = 4         # augmentation and noise of a training example
  INIT = 5          # model initialisation
  TRAIN_EVAL = 6    # the per-epoch noisy accuracy in training
  ATTACK = 7        # SmoothAdv's attack noise (per training example)
  TRAIN_SIGMA = 8   # the sigma ascent inside a training step
  PROXY_EVAL = 9    # `sigma_opt.evaluate_proxy`'s fixed draws
  PILOT = 10        # pilot draws of a certificate-aware sigma search
  SELECTOR_SELECT = 11    # dual RS: the smoothed sigma selector's n0 draws
  SELECTOR_ESTIMATE = 12  # dual RS: the selector's n draws
  BOUND = 13        # the randomized Clopper-Pearson bound's U(0, 1) per example


def id_words(example_ids) -> np.ndarray:
  """[B] int64 (or uint64) ids -> [B, 2] uint32 (low, high) words."""
  ids = np.asarray(example_ids)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"example ids must be integers; got {ids.dtype}")
  u = ids.astype(np.int64).astype(np.uint64)  # two's complement for negatives
  return np.stack([(u & np.uint64(0xFFFFFFFF)).astype(np.uint32),
                   (u >> np.uint64(32)).astype(np.uint32)], axis=-1)


def purpose_key(key: jax.Array, purpose: Purpose) -> jax.Array:
  """The root key of one purpose (for a stream without example ids)."""
  return jax.random.fold_in(key, int(purpose))


def block_key(key: jax.Array, purpose, example_id, block) -> jax.Array:
  """The key of one block of noise of one example.

  Args:
    key: the run's PRNG key (`jax.random.key(seed)`).
    purpose: a `Purpose` (may be traced).
    example_id: [2] uint32 words of a 64-bit id (`id_words`; traced is
      fine), or a Python int.
    block: the block index (may be traced).
  """
  if isinstance(example_id, (int, np.integer)):
    example_id = id_words(np.array([example_id]))[0]
  example_id = jnp.asarray(example_id, jnp.uint32)
  key = jax.random.fold_in(key, purpose)
  key = jax.random.fold_in(key, example_id[0])
  key = jax.random.fold_in(key, example_id[1])
  return jax.random.fold_in(key, block)


def content_ids(x) -> np.ndarray:
  """A 64-bit id per image from its bytes (float32): noise keyed by content.

  The same image gets the same id in any batch; different images get
  different ids (up to a 2^-64 collision chance per pair).
  """
  x = np.ascontiguousarray(np.asarray(x, np.float32))
  return np.array([int.from_bytes(hashlib.sha256(xi.tobytes()).digest()[:8],
                                  "little", signed=True) for xi in x],
                  np.int64)


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


def uniforms(key: jax.Array, purpose: Purpose, example_ids) -> np.ndarray:
  """One U(0, 1) per example (float64 on the host), keyed by (key, purpose,
  example id) like every other stream: the same whatever the batch."""
  words = id_words(np.asarray(example_ids))
  if words.shape[0] == 0:
    return np.zeros(0, np.float64)
  keys = jax.vmap(lambda w: block_key(key, int(purpose), w, 0))(
      jnp.asarray(words))
  return np.asarray(jax.vmap(lambda k: jax.random.uniform(
      k, (), jnp.float32))(keys), np.float64)
