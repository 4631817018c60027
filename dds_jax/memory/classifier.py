"""The memory classifier: certify each query, then answer through the memory.

`MemoryClassifier.predict(x)` runs Cohen's CERTIFY on x (with a per-input
sigma from `sigma_fn` when given), then `MemoryStore.insert`, and returns the
memory-adjusted certificate. This is the canonical memory classifier (see
docs/method.md, "The memory"): a batch gives what one-at-a-time processing
gives.

Noise is keyed by the id the query will get in the store (`store.next_id`,
...), so answers are a deterministic function of the store's state, the key
and the inputs. (If another process inserts between this process's CERTIFY and
its insert, the stored id differs from the noise key; the `example_id` column
keeps the key that was used.)

Consequences to know, not hide: answers depend on query order; the memory
grows with every query; each stored certificate holds with probability
1 - alpha, so with k stored the chance that any fails is up to k * alpha
(`store.summary()`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from dds_jax import validate
from dds_jax.certify import certify
from dds_jax.errors import InputError
from dds_jax.memory.store import MemoryStore


@dataclasses.dataclass(frozen=True)
class MemoryPrediction:
  """Per-query details of `MemoryClassifier.predict_details` (arrays [B]).

  served: answered by `MemoryStore.lookup` without sampling (then raw_pred is
  -1, raw_radius and sigma are NaN, id and example_id are 0).
  """
  pred: np.ndarray
  radius: np.ndarray
  raw_pred: np.ndarray
  raw_radius: np.ndarray
  sigma: np.ndarray
  changed: np.ndarray
  served: np.ndarray
  id: np.ndarray
  example_id: np.ndarray


class MemoryClassifier:
  """A smoothed classifier with data-dependent sigma, made sound by a memory.

  Example::

    store = MemoryStore.open(path, input_shape=(32, 32, 3), dataset="cifar10",
                             model_fingerprint=fp, alpha=0.001)
    clf = MemoryClassifier(store, apply_fn, params, sigma=0.25,
                           key=jax.random.key(0), sigma_fn=my_sigma_fn)
    pred, radius = clf.predict(image)          # or a batch [B, H, W, C]
  """

  def __init__(self, store: MemoryStore, apply_fn, params, *, sigma=None,
               key: jax.Array, n0: int = 100, n: int = 100_000,
               alpha: float = 0.001,
               sigma_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               batch_size: int = 1000, samples_per_block: int = 100,
               noise: str = "gaussian", serve_from_memory: bool = False,
               num_classes: Optional[int] = None,
               mesh: Optional[jax.sharding.Mesh] = None):
    """Wraps a model and a store.

    Args:
      store: the memory (an open `MemoryStore`).
      apply_fn: `apply_fn(params, images) -> logits`.
      params: the model's variables.
      sigma: constant noise level, used when sigma_fn is None.
      key: PRNG key of the noise.
      n0, n, alpha: CERTIFY's selection draws, estimation draws and failure
        probability per certificate.
      sigma_fn: `sigma_fn(x_batch [B, H, W, C]) -> sigma [B]`, the
        data-dependent noise level; it must treat inputs independently for a
        batch to equal one at a time.
      batch_size, samples_per_block, num_classes, mesh: passed to `certify`.
      noise: 'gaussian' (needs an L2 store) or 'uniform' (an L1 store).
      serve_from_memory: answer queries inside a stored ball with
        `MemoryStore.lookup` (no sampling, nothing stored) instead of the
        canonical certify-then-insert.
    """
    if not isinstance(store, MemoryStore):
      raise InputError(f"store must be a MemoryStore; got {type(store)}")
    want_norm = validate.norm_of(noise)
    alpha = validate.check_alpha(alpha)
    if store.norm != want_norm:
      raise InputError(f"{noise} noise certifies L{want_norm} radii but the "
                       f"store holds L{store.norm} balls")
    if store.alpha is not None and store.alpha != alpha:
      raise InputError(f"alpha={alpha} but the store was made for "
                       f"alpha={store.alpha}")
    if sigma_fn is None and sigma is None:
      raise InputError("give sigma (a constant) or sigma_fn")
    self.store = store
    self.apply_fn = apply_fn
    self.params = params
    self.sigma = sigma
    self.sigma_fn = sigma_fn
    self.key = key
    self.serve_from_memory = bool(serve_from_memory)
    self._certify_kw = dict(n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                            samples_per_block=samples_per_block, noise=noise,
                            num_classes=num_classes, mesh=mesh)

  def _sigmas(self, xb: np.ndarray) -> np.ndarray:
    if self.sigma_fn is None:
      return np.broadcast_to(np.asarray(self.sigma, np.float64),
                             (len(xb),)).copy()
    s = np.asarray(self.sigma_fn(xb), np.float64)
    if s.shape != (len(xb),):
      raise InputError(f"sigma_fn must return [{len(xb)}] values; got shape "
                       f"{s.shape}")
    return s

  def predict(self, x):
    """(pred, radius) for one input [H, W, C] or arrays [B] for a batch.

    The batch is processed in order (later queries see earlier ones).
    """
    single = np.ndim(x) == len(self.store.input_shape)
    det = self.predict_details(x)
    if single:
      return int(det.pred[0]), float(det.radius[0])
    return det.pred, det.radius

  def predict_details(self, x) -> MemoryPrediction:
    """`predict` with the raw certificates and ids (always batched)."""
    x = np.asarray(x)
    shape = self.store.input_shape
    if x.shape == shape:
      x = x[None]
    if x.shape[1:] != shape or x.shape[0] == 0:
      raise InputError(f"x must be one input {shape} or a batch [B, *{shape}];"
                       f" got shape {x.shape}")
    b = len(x)
    pred = np.zeros(b, np.int64)
    radius = np.zeros(b)
    raw_pred = np.full(b, -1, np.int64)
    raw_radius = np.full(b, np.nan)
    sigma = np.full(b, np.nan)
    changed = np.zeros(b, bool)
    served = np.zeros(b, bool)
    ids = np.zeros(b, np.int64)
    example_ids = np.zeros(b, np.int64)

    def serve(j: int) -> bool:
      hit = self.store.lookup(x[j]) if self.serve_from_memory else None
      if hit is None:
        return False
      pred[j], radius[j] = hit
      served[j] = True
      return True

    pos = 0
    while pos < b:
      # Queries that the memory cannot serve now are certified together,
      # keyed by the ids they will get if nothing else is served first.
      misses = [j for j in range(pos, b)
                if not (self.serve_from_memory and
                        self.store.lookup(x[j]) is not None)]
      if not misses:
        while pos < b:
          if not serve(pos):
            raise AssertionError("a served query stopped being served")
          pos += 1
        break
      key_ids = self.store.next_id + np.arange(len(misses), dtype=np.int64)
      sig = self._sigmas(x[misses])
      cert = certify(self.apply_fn, self.params, x[misses], sig, self.key,
                     example_ids=key_ids, **self._certify_kw)
      if not self.serve_from_memory:
        res = self.store.insert_many(x[misses], cert.pred, cert.radius,
                                     example_ids=key_ids)
        pred[misses], radius[misses] = res.preds, res.radii
        changed[misses], ids[misses] = res.changed, res.ids
        raw_pred[misses], raw_radius[misses] = cert.pred, cert.radius
        sigma[misses], example_ids[misses] = sig, key_ids
        break
      for t, j in enumerate(misses):
        while pos < j:     # served before, still served (memory only grows)
          if not serve(pos):
            raise AssertionError("a served query stopped being served")
          pos += 1
        if serve(j):       # inside a ball stored earlier in this batch:
          pos = j + 1      # certify the rest again with the right ids
          break
        res = self.store.insert(x[j], int(cert.pred[t]),
                                float(cert.radius[t]),
                                example_id=int(key_ids[t]))
        pred[j], radius[j], changed[j], ids[j] = res
        raw_pred[j], raw_radius[j] = cert.pred[t], cert.radius[t]
        sigma[j], example_ids[j] = sig[t], key_ids[t]
        pos = j + 1
    return MemoryPrediction(pred=pred, radius=radius, raw_pred=raw_pred,
                            raw_radius=raw_radius, sigma=sigma,
                            changed=changed, served=served, id=ids,
                            example_id=example_ids)
