"""Per-channel input normalisation done inside the models.

Every dds_jax model takes images in [0, 1] pixel space, because that is the
space in which randomized smoothing adds its Gaussian noise. The first thing a
model does is `(x - mean) / std` with per-channel statistics stored as module
attributes, so a checkpoint and its normalisation always travel together.
"""

from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp

from dds_jax import errors

Stats = float | Sequence[float]

# CIFAR-10 training-set statistics (the common "correct" per-pixel std).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The std Cohen et al. (2019) use in their CIFAR-10 checkpoints. Pass it
# explicitly when loading those weights; it is not the default.
COHEN_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Channel-agnostic default: maps [0, 1] to [-1, 1]. Used for grayscale inputs
# (sklearn digits, MNIST) and any channel count other than 3.
GENERIC_MEAN = (0.5,)
GENERIC_STD = (0.5,)

# Inputs at least this tall are treated as ImageNet-like for default stats.
_IMAGENET_MIN_SIZE = 64


def as_stats(value: Stats, what: str) -> tuple[float, ...]:
  """Turns a float or a sequence of floats into a hashable tuple.

  Args:
    value: a single value (applied to every channel) or one value per channel.
    what: name used in error messages, e.g. "mean".

  Returns:
    A non-empty tuple of Python floats.

  Raises:
    ConfigError: if `value` is empty, not numeric or not finite, or (for
      "std") not strictly positive.
  """
  if isinstance(value, (int, float)):
    values = (float(value),)
  else:
    try:
      values = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
      raise errors.ConfigError(
          f'{what} must be a float or a sequence of floats, got {value!r}'
      ) from e
  if not values:
    raise errors.ConfigError(f'{what} must not be empty')
  if not all(math.isfinite(v) for v in values):
    raise errors.ConfigError(f'{what} must be finite, got {values}')
  if what == 'std' and not all(v > 0 for v in values):
    raise errors.ConfigError(f'std must be > 0, got {values}')
  return values


def default_stats(
    input_shape: Sequence[int],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Default (mean, std) for an input of shape (H, W, C).

  Three-channel inputs of at least 64 pixels high get the ImageNet statistics,
  smaller three-channel inputs the CIFAR-10 ones, and anything else the
  generic 0.5 / 0.5.

  Args:
    input_shape: (H, W, C) of one image.

  Returns:
    (mean, std) as tuples.
  """
  height, _, channels = input_shape
  if channels == 3:
    if height >= _IMAGENET_MIN_SIZE:
      return IMAGENET_MEAN, IMAGENET_STD
    return CIFAR10_MEAN, CIFAR10_STD
  return GENERIC_MEAN, GENERIC_STD


def normalize(
    x: jax.Array, mean: Stats, std: Stats, dtype: Any = jnp.float32
) -> jax.Array:
  """Returns `(x - mean) / std` over the last (channel) axis, cast to `dtype`.

  The arithmetic is done in float32 whatever `dtype` is, so a bfloat16 model
  sees the same normalised values rounded once.

  Args:
    x: images, NHWC, in [0, 1].
    mean: one value, or one per channel.
    std: one value, or one per channel.
    dtype: dtype of the result (the model's compute dtype).

  Returns:
    The normalised images, same shape as `x`.

  Raises:
    InputError: if `x` is not rank 4.
    ConfigError: if `mean` or `std` has neither 1 nor C entries.
  """
  if x.ndim != 4:
    raise errors.InputError(
        f'models take a batch of images NHWC (rank 4), got shape {x.shape}'
    )
  channels = x.shape[-1]
  mean = as_stats(mean, 'mean')
  std = as_stats(std, 'std')
  for what, values in (('mean', mean), ('std', std)):
    if len(values) not in (1, channels):
      raise errors.ConfigError(
          f'{what} has {len(values)} values but the input has {channels} '
          'channels; give one value or one per channel'
      )
  mean_arr = jnp.asarray(mean, jnp.float32)
  inv_std = 1.0 / jnp.asarray(std, jnp.float32)
  y = (x.astype(jnp.float32) - mean_arr) * inv_std
  return y.astype(dtype)
