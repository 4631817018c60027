"""Noise streams: every use of randomness has its own Purpose and stream."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dds_jax
from dds_jax import noise
from tests import conftest

# The values in use. Append-only: a value once used is never given to another
# purpose, so changing or reusing one fails here.
PURPOSES = {"SELECT": 0, "ESTIMATE": 1, "PREDICT": 2, "SIGMA_OPT": 3,
            "TRAIN": 4, "INIT": 5, "TRAIN_EVAL": 6, "ATTACK": 7,
            "TRAIN_SIGMA": 8, "PROXY_EVAL": 9, "PILOT": 10}


def test_purpose_values_are_append_only_and_distinct():
  have = {p.name: int(p) for p in noise.Purpose}
  for name, value in PURPOSES.items():
    assert have[name] == value, name
  assert len(set(have.values())) == len(have)


def _key_bits(key):
  return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_no_two_purposes_share_a_stream():
  key = jax.random.key(0)
  ids = noise.id_words(np.array([0, 1, 2, 2**32, -1, 12345678901]))
  seen = {}
  for p in noise.Purpose:
    for w in ids:
      for block in (0, 1, 5, 1 << 20):
        bits = _key_bits(noise.block_key(key, p, w, block))
        assert bits not in seen, (p, w, block, seen.get(bits))
        seen[bits] = (p, tuple(w), block)
    root = _key_bits(noise.purpose_key(key, p))
    assert root not in seen
    seen[root] = (p, "root")


def test_every_key_is_derived_in_noise_py():
  """No module folds keys by hand (that is how streams came to coincide)."""
  pkg = os.path.join(conftest.REPO, "dds_jax")
  offenders = []
  for root, _, files in os.walk(pkg):
    for f in files:
      if f.endswith(".py") and f != "noise.py":
        text = open(os.path.join(root, f)).read()
        if re.search(r"random\.(fold_in|split)\(key,\s*\d", text):
          offenders.append(f)
  assert not offenders


def test_64_bit_ids_fold_in_both_halves():
  words = noise.id_words(np.array([5, 5 + 2**32, 5 + 2**31, -5]))
  assert words.dtype == np.uint32 and words.shape == (4, 2)
  keys = {_key_bits(noise.block_key(jax.random.key(0), 1, w, 0))
          for w in words}
  assert len(keys) == 4
  # An int and its words give the same key, inside jit too.
  a = noise.block_key(jax.random.key(0), 1, 5 + 2**32, 3)
  b = jax.jit(lambda w: noise.block_key(jax.random.key(0), 1, w, 3))(
      words[1])
  assert _key_bits(a) == _key_bits(b)


def test_content_ids_are_64_bit_and_follow_content():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
  ids = noise.content_ids(x)
  assert ids.dtype == np.int64 and len(set(ids.tolist())) == 6
  np.testing.assert_array_equal(noise.content_ids(x[::-1]), ids[::-1])
  assert np.any(np.abs(ids) >= 2**32)  # both halves are used


def _noise_only_model():
  """Logits that depend on the noise only: x minus its own mean pixel, so a
  constant image contributes nothing; 7 classes from a fixed projection."""
  w = np.random.default_rng(1).normal(size=(16, 7)).astype(np.float32)

  def apply_fn(params, x):
    del params
    z = x.reshape(x.shape[0], -1)
    z = z - jnp.mean(z, axis=1, keepdims=True)
    return z @ w
  return apply_fn


def test_calls_without_ids_on_different_images_draw_different_noise():
  apply_fn = _noise_only_model()
  a = np.full((3, 4, 4, 1), 0.3, np.float32)
  b = np.full((3, 4, 4, 1), 0.6, np.float32)
  kw = dict(num_samples=200, batch_size=200, samples_per_block=50)
  ca = dds_jax.sample_counts(apply_fn, {}, a[:1], 0.5, jax.random.key(0), **kw)
  cb = dds_jax.sample_counts(apply_fn, {}, b[:1], 0.5, jax.random.key(0), **kw)
  # The model sees only the noise, so equal counts would mean equal noise.
  assert not np.array_equal(ca, cb)
  # The same image draws the same noise in any batch, at any position.
  mixed = np.concatenate([b[:1], a[:1]])
  both = dds_jax.sample_counts(apply_fn, {}, mixed, 0.5, jax.random.key(0),
                               **kw)
  np.testing.assert_array_equal(both[1], ca[0])
  np.testing.assert_array_equal(both[0], cb[0])


def test_explicit_ids_above_2_31_are_not_folded_together():
  apply_fn = _noise_only_model()
  x = np.full((1, 4, 4, 1), 0.5, np.float32)
  kw = dict(num_samples=200, batch_size=200, samples_per_block=50)
  c = [dds_jax.sample_counts(apply_fn, {}, x, 0.5, jax.random.key(0),
                             example_ids=np.array([i]), **kw)
       for i in (7, 7 + 2**31, 7 + 2**32)]
  assert not np.array_equal(c[0], c[1])
  assert not np.array_equal(c[0], c[2])


def test_smoothadv_attack_noise_is_per_example_id():
  """Training's attack noise of an example does not depend on its batch."""
  from dds_jax import losses
  x = np.random.default_rng(0).uniform(size=(4, 4, 4, 1)).astype(np.float32)
  words = noise.id_words(np.arange(10, 14))
  keys = jax.vmap(lambda w: noise.block_key(
      jax.random.key(0), noise.Purpose.ATTACK, w, 0))(words)
  full = losses.noise_like(keys, x, 0.5, 3)
  half = losses.noise_like(keys[2:], x[2:], 0.5, 3)
  np.testing.assert_array_equal(full[2:], half)
  assert not np.array_equal(full[0], full[1])
