"""Validation of user input, one definition each: images, sigma, counts, alpha.

Every public entry point (`dds_jax.certify`, the sampler, the sigma ascent,
the losses, the memory store, the configs) checks its arguments with these,
so a mistake gives the same one-line `InputError` wherever it is made.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from dds_jax.errors import InputError

NOISE_KINDS = ("gaussian", "uniform")
# The norm of the certified radius for each kind of noise: Gaussian noise
# certifies an L2 ball, uniform noise U(-s, s) per coordinate an L1 ball.
NORM_OF_NOISE = {"gaussian": 2, "uniform": 1}


def check_images(x, name: str = "x", allow_empty: bool = False) -> np.ndarray:
  """A batch of images as float32: float NHWC, finite, in [0, 1].

  allow_empty: accept zero images (a process with no examples of its own in
  a multi-host call).
  """
  x = np.asarray(x)
  if x.ndim != 4:
    raise InputError(f"{name} must be a batch of images [B, H, W, C]; got "
                     f"shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise InputError(f"{name} must hold floats in [0, 1]; got dtype {x.dtype} "
                     "(divide uint8 images by 255)")
  if x.shape[0] == 0:
    if allow_empty:
      return x.astype(np.float32, copy=False)
    raise InputError(f"{name} is empty")
  if not np.all(np.isfinite(x)):
    raise InputError(f"{name} contains NaN or infinite pixels")
  lo, hi = float(x.min()), float(x.max())
  if lo < 0.0 or hi > 1.0:
    raise InputError(f"{name} must be in [0, 1] pixel space (noise is added "
                     f"before the model normalises); got range [{lo:.4g}, "
                     f"{hi:.4g}]")
  return x.astype(np.float32, copy=False)


def check_sigma(sigma, batch: int) -> np.ndarray:
  """sigma (scalar or one per example), finite and > 0, as float32 [B]."""
  sigma = np.asarray(sigma, np.float64)
  if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != batch):
    raise InputError(f"sigma must be a scalar or have shape [{batch}]; got "
                     f"shape {sigma.shape}")
  if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
    raise InputError(f"sigma must be finite and > 0; got {sigma}")
  return np.broadcast_to(sigma, (batch,)).astype(np.float32)


def check_count(value, name: str) -> int:
  """An integer >= 1 (a number of samples, steps, examples, ...)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
      not math.isfinite(value) or int(value) != value or value < 1):
    raise InputError(f"{name} must be an integer >= 1; got {value!r}")
  return int(value)


def check_alpha(alpha, name: str = "alpha") -> float:
  """A failure probability in (0, 1)."""
  if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and
          0.0 < alpha < 1.0):
    raise InputError(f"{name} must be in (0, 1); got {alpha!r}")
  return float(alpha)


def check_noise(kind: str) -> str:
  """A noise kind: 'gaussian' (L2) or 'uniform' (L1)."""
  if kind not in NOISE_KINDS:
    raise InputError(f"noise must be one of {NOISE_KINDS}; got {kind!r}")
  return kind


def norm_of(kind: str) -> int:
  """The norm (2 or 1) of the radius that noise of this kind certifies."""
  return NORM_OF_NOISE[check_noise(kind)]
