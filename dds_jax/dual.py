"""Dual randomized smoothing: a sound input-dependent sigma without a memory.

The sigma of an input is chosen by a *selector*, a classifier over a finite
set of sigmas S (`dual.sigmas`). Smoothing the selector with noise of scale
s_e (`dual.selector_sigma`) makes its choice certifiable like any smoothed
classifier (Sun, Mao, Vechev, ICLR 2026):

  1. Cohen's CERTIFY of the smoothed selector at alpha_sigma gives (j,
     R_sigma): within R_sigma of x the smoothed selector picks S[j] too. If it
     abstains, so does the certificate.
  2. Cohen's CERTIFY of the classifier at sigma = S[j], on its own noise
     streams, at alpha_c gives (c_A, R_c).
  3. The certificate is (c_A, R = min(R_sigma, R_c)). Within R every input
     selects S[j] and the classifier smoothed at S[j] predicts c_A, so the
     end-to-end classifier x -> g_{S[j(x)]}(x) is constant on the ball. It
     fails only if one of the two bounds fails: probability at most
     alpha_sigma + alpha_c (a union bound; no independence needed), which is
     the config's `certify.alpha`, split by `dual.alpha_sigma_fraction`.

No state is kept between queries: certificates do not depend on the order
of the queries, and any number of servers can answer without sharing
anything (unlike the memory of `dds_jax.memory`).

The selector is trained like any model (`launch.train` with
`train.target = 'selector'`, see `selector_config`): its label for a
training image is the element of S nearest (in log sigma) to that image's
data-dependent sigma (`targets_from_sigmas`), read from a TSV (idx, sigma):
the per-sample sigma table that data-dependent training exports, or a
`sigma.tsv` of a sigma method run on the training split. It trains under
noise N(0, s_e^2) so that its smoothed version stays accurate.

Noise: the selector's draws are the streams `Purpose.SELECTOR_SELECT` and
`Purpose.SELECTOR_ESTIMATE`, never shared with the classifier's
`SELECT`/`ESTIMATE`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from dds_jax import checkpoint as ckpt_lib
from dds_jax import noise as noise_lib
from dds_jax import sampler
from dds_jax import stats
from dds_jax import validate
from dds_jax.certify import certify
from dds_jax.errors import ConfigError
from dds_jax.errors import InputError


def check_sigmas(sigmas: Sequence[float], what: str = "dual.sigmas"
                 ) -> np.ndarray:
  """The sigma set S as float64 [G]: non-empty, finite, > 0, no repeats."""
  try:
    s = np.asarray(tuple(sigmas), np.float64)
  except (TypeError, ValueError):
    raise InputError(f"{what}={sigmas!r} must be a list of numbers") from None
  if s.ndim != 1 or s.size == 0:
    raise InputError(f"{what} is empty: give at least one sigma")
  if not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise InputError(f"{what}={tuple(s.tolist())} must be sigmas > 0")
  if np.unique(s).size != s.size:
    raise InputError(f"{what}={tuple(s.tolist())} repeats a value")
  return s


def split_alpha(alpha: float, fraction: float) -> tuple[float, float]:
  """(alpha_sigma, alpha_c) = (fraction * alpha, (1 - fraction) * alpha)."""
  alpha = validate.check_alpha(alpha)
  if not 0 < fraction < 1:
    raise InputError(f"dual.alpha_sigma_fraction={fraction} must be in (0, 1)"
                     ": the selector and the classifier each need a share of "
                     "alpha")
  return alpha * fraction, alpha * (1.0 - fraction)


def selector_sigma(config: ml_collections.ConfigDict) -> float:
  """s_e: `dual.selector_sigma`, or max(S) when it is 0."""
  return float(config.dual.selector_sigma or max(config.dual.sigmas))


def targets_from_sigmas(sigma, sigmas) -> np.ndarray:
  """[B] index of the element of S nearest each sigma in log sigma."""
  s = check_sigmas(sigmas)
  sigma = np.asarray(sigma, np.float64)
  if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
    raise InputError("target sigmas must be finite and > 0")
  dist = np.abs(np.log(sigma)[:, None] - np.log(s)[None, :])
  return dist.argmin(axis=1).astype(np.int32)


def fallback_index(sigmas, sigma0: float) -> int:
  """The element of S nearest sigma0 (used where the selector abstains)."""
  return int(targets_from_sigmas(np.array([sigma0]), sigmas)[0])


@dataclasses.dataclass(frozen=True)
class Selection:
  """The smoothed selector's CERTIFY, per example (numpy arrays).

  index: [B] position in S, or `stats.ABSTAIN` (-1).
  radius: [B] R_sigma (0 where it abstains).
  p_lower: [B] lower confidence bound of the selected index's probability.
  counts0, counts: [B, G] the selector's selection and estimation counts.
  """
  index: np.ndarray
  radius: np.ndarray
  p_lower: np.ndarray
  counts0: np.ndarray
  counts: np.ndarray


def select(apply_fn: sampler.ApplyFn, params, x, sigmas, noise_sigma: float,
           key: jax.Array, n0: int, n: int, alpha: float, *,
           batch_size: int = sampler.DEFAULT_BATCH_SIZE,
           example_ids=None,
           samples_per_block: int = sampler.DEFAULT_SAMPLES_PER_BLOCK,
           noise: str = "gaussian",
           mesh: Optional[jax.sharding.Mesh] = None) -> Selection:
  """Cohen's CERTIFY of the selector smoothed at `noise_sigma` (s_e).

  Args:
    apply_fn, params: the selector (`apply_fn(params, images) -> [B, G]`
      logits, G = len(sigmas)).
    x: [B, H, W, C] images.
    sigmas: S.
    noise_sigma: s_e, the selector's smoothing noise.
    key: the run's key; the selector's streams are its own purposes.
    n0, n: the selector's selection and estimation draws.
    alpha: alpha_sigma.
    Others: see `dds_jax.sampler.sample_counts`.
  """
  s = check_sigmas(sigmas)
  counts0, counts = sampler.sample_streams(
      apply_fn, params, x, noise_sigma, key,
      ((noise_lib.Purpose.SELECTOR_SELECT, n0),
       (noise_lib.Purpose.SELECTOR_ESTIMATE, n)),
      num_classes=s.size, batch_size=batch_size, example_ids=example_ids,
      samples_per_block=samples_per_block, noise=noise, mesh=mesh)
  index, radius, p_lower = stats.certificate_from_counts(
      counts0, counts, noise_sigma, alpha, noise)
  return Selection(index=index, radius=radius, p_lower=p_lower,
                   counts0=counts0, counts=counts)


def sigma_of(selection: Selection, sigmas, fallback: int) -> np.ndarray:
  """[B] S[index], S[fallback] where the selector abstains."""
  s = check_sigmas(sigmas)
  index = np.where(selection.index >= 0, selection.index, fallback)
  return s[index]


def combine(selection: Selection, pred, radius_c) -> tuple[np.ndarray,
                                                           np.ndarray]:
  """The dual certificate: (pred, R = min(R_sigma, R_c)).

  Abstains (pred `stats.ABSTAIN`, radius 0) where the selector or the
  classifier abstains.
  """
  pred = np.asarray(pred, np.int64)
  ok = (selection.index >= 0) & (pred >= 0)
  radius = np.minimum(selection.radius, np.asarray(radius_c, np.float64))
  return (np.where(ok, pred, stats.ABSTAIN).astype(np.int64),
          np.where(ok, radius, 0.0))


@dataclasses.dataclass(frozen=True)
class DualCertificate:
  """Per-example result of `certify_dual` (numpy arrays over the batch).

  pred, radius: the issued certificate (R = min(R_sigma, R_c)).
  sigma: the classifier's sigma S[j] (S[fallback] where the selector
    abstained).
  sigma_index: j, or -1 where the selector abstained.
  radius_sigma, radius_c: the two radii.
  p_lower: the classifier's lower bound.
  """
  pred: np.ndarray
  radius: np.ndarray
  sigma: np.ndarray
  sigma_index: np.ndarray
  radius_sigma: np.ndarray
  radius_c: np.ndarray
  p_lower: np.ndarray


def certify_dual(apply_fn: sampler.ApplyFn, params,
                 selector_fn: sampler.ApplyFn, selector_params, x, sigmas,
                 noise_sigma: float, key: jax.Array, n0: int = 100,
                 n: int = 100_000, alpha: float = 0.001, *,
                 alpha_sigma_fraction: float = 0.5,
                 selector_n0: Optional[int] = None,
                 selector_n: Optional[int] = None,
                 sigma0: Optional[float] = None,
                 batch_size: int = sampler.DEFAULT_BATCH_SIZE,
                 num_classes: Optional[int] = None,
                 example_ids=None,
                 samples_per_block: int = sampler.DEFAULT_SAMPLES_PER_BLOCK,
                 noise: str = "gaussian",
                 mesh: Optional[jax.sharding.Mesh] = None) -> DualCertificate:
  """The dual randomized smoothing certificate of a batch (module docstring).

  Args:
    apply_fn, params: the classifier.
    selector_fn, selector_params: the selector over `sigmas`.
    x: [B, H, W, C] images.
    sigmas: S.
    noise_sigma: s_e.
    key: the run's key.
    n0, n: the classifier's draws.
    alpha: the total failure probability alpha_sigma + alpha_c.
    alpha_sigma_fraction: alpha_sigma / alpha.
    selector_n0, selector_n: the selector's draws (default: n0, n).
    sigma0: where the selector abstains, the classifier still runs at the
      element of S nearest sigma0 (default: S[0]), so that every call has
      the same shape; those certificates abstain.
    Others: see `dds_jax.sampler.sample_counts`.
  """
  s = check_sigmas(sigmas)
  alpha_sigma, alpha_c = split_alpha(alpha, alpha_sigma_fraction)
  if not (math.isfinite(noise_sigma) and noise_sigma > 0):
    raise InputError(f"the selector's sigma must be > 0; got {noise_sigma}")
  common = dict(batch_size=batch_size, example_ids=example_ids,
                samples_per_block=samples_per_block, noise=noise, mesh=mesh)
  sel = select(selector_fn, selector_params, x, s, noise_sigma, key,
               selector_n0 or n0, selector_n or n, alpha_sigma, **common)
  fallback = 0 if sigma0 is None else fallback_index(s, sigma0)
  sigma = sigma_of(sel, s, fallback)
  cert = certify(apply_fn, params, x, sigma, key, n0=n0, n=n, alpha=alpha_c,
                 num_classes=num_classes, **common)
  pred, radius = combine(sel, cert.pred, cert.radius)
  return DualCertificate(pred=pred, radius=radius, sigma=cert.sigma,
                         sigma_index=sel.index, radius_sigma=sel.radius,
                         radius_c=cert.radius, p_lower=cert.p_lower)


# ---------------------------------------------------------------------------
# Training the selector: a config and the relabelled training split.
# ---------------------------------------------------------------------------


def _selector_model(config: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """config with the selector's model: `dual.selector_model` (default
  `model.name`, its widths too) with len(S) outputs."""
  s = check_sigmas(config.dual.sigmas)
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.model.name = config.dual.selector_model or config.model.name
    if cfg.model.name != config.model.name:
      cfg.model.conv_features = ()
    cfg.model.num_classes = int(s.size)
  return cfg


def selector_config(config: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The config the selector trains with (`train.target = 'selector'`).

  The same data, seed and schedule, with the selector's model (len(S)
  outputs), Gaussian augmentation at s_e and no per-sample sigma.
  """
  if not config.dual.targets:
    raise ConfigError("train.target='selector' needs dual.targets: a TSV "
                      "(idx, sigma) of each training image's sigma, e.g. "
                      "<train_ds>/export/sigma_table.tsv or a sigma.tsv")
  cfg = _selector_model(config)
  with cfg.unlocked():
    cfg.noise.sigma = selector_sigma(config)
    cfg.train.ds.enabled = False
    cfg.train.ds.sigma_min = min(cfg.train.ds.sigma_min, cfg.noise.sigma)
    cfg.sigma_opt.sigma_min = min(cfg.sigma_opt.sigma_min, cfg.noise.sigma)
  return cfg


def relabel(ds, sigma_by_id: dict, sigmas, what: str):
  """`ds` with label = `targets_from_sigmas` of each example's sigma."""
  missing = [int(i) for i in ds.example_ids if int(i) not in sigma_by_id]
  if missing:
    raise ConfigError(f"{what} has no sigma for example ids "
                      f"{missing[:10]}{'...' if len(missing) > 10 else ''}")
  s = check_sigmas(sigmas)
  sig = np.array([sigma_by_id[int(i)] for i in ds.example_ids], np.float64)
  return ds.with_labels(targets_from_sigmas(sig, s),
                        tuple(f"sigma={v:g}" for v in s))


def load_selector(config: ml_collections.ConfigDict, image_shape, mesh=None):
  """The trained selector of `dual.selector`: (ModelBundle, variables).

  `dual.selector` is the selector's training workdir (its `export/` when
  there is one, else its orbax checkpoints) or an export directory. It must
  have been trained as a selector over this config's `dual.sigmas`, on
  images of `image_shape`.
  """
  path = config.dual.selector
  if not path:
    raise ConfigError("dual.selector is empty: give the selector's training "
                      "workdir or export (train it with train.target=selector)")
  cfg = _selector_model(config)
  export = None
  for d in (path, os.path.join(path, "export")):
    if os.path.isfile(os.path.join(d, ckpt_lib.EXPORT_PARAMS)):
      export = d
      break
  if export is None and not os.path.isdir(os.path.join(path, "checkpoints")):
    raise ConfigError(f"dual.selector={path} holds neither an export "
                      f"({ckpt_lib.EXPORT_PARAMS}) nor checkpoints/")
  with cfg.unlocked():
    cfg.certify.checkpoint = export or ""
  if export:
    with open(os.path.join(export, ckpt_lib.EXPORT_META)) as f:
      meta = json.load(f)
  else:
    ckpt = ckpt_lib.Checkpointer(path, create=False)
    meta = ckpt.read_meta()
    ckpt.close()
  if meta.get("target") != "selector":
    raise ConfigError(f"dual.selector={path} is not a sigma selector (its "
                      f"target is {meta.get('target', 'label')!r}); train one "
                      "with train.target=selector")
  want = [float(v) for v in config.dual.sigmas]
  if [float(v) for v in meta.get("sigmas", ())] != want:
    raise ConfigError(f"the selector in {path} chooses among sigmas "
                      f"{meta.get('sigmas')}, not dual.sigmas={tuple(want)}")
  bundle, params, _ = ckpt_lib.restore_params_and_meta(cfg, path, image_shape,
                                                       mesh)
  return bundle, params
