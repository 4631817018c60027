"""A small CNN for low-resolution inputs (8x8 to 32x32, any channel count).

It is meant to be cheap: certification runs on the order of 1e5 forward
passes per image, so there is no BatchNorm (nothing to track between train and
eval) and larger inputs are pooled early so that the expensive convolutions
run at 16x16 or below.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dds_jax.models import normalize as normalize_lib

# He initialisation suits the ReLU stack and trains faster than LeCun here.
_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class SmallCNN(nn.Module):
  """Three 3x3 convolutions, global average pool, two dense layers.

  Layout: conv3x3(32) -> relu -> [avg-pool 2x2 if H >= 32] -> conv3x3(64) ->
  relu -> [avg-pool 2x2 if H >= 16] -> conv3x3(64) -> relu -> global average
  pool -> dense(128) -> relu -> dense(num_classes), where H is the input
  height. So an 8x8 input is never pooled, 16x16 runs its last convolution at
  8x8 and 32x32 runs its second at 16x16 and its last at 8x8.

  Attributes:
    num_classes: number of output logits.
    mean: per-channel (or single) mean subtracted from the [0, 1] input.
    std: per-channel (or single) std the centred input is divided by.
    conv_features: output channels of the three convolutions.
    hidden: width of the penultimate dense layer.
    pool_min_sizes: a 2x2 average pool follows convolution i (from 0) when
      the input is at least `pool_min_sizes[i]` pixels high; convolutions
      past the end of this sequence are never followed by a pool.
    dtype: compute dtype; parameters stay float32, logits are float32.
  """

  num_classes: int
  mean: normalize_lib.Stats = normalize_lib.GENERIC_MEAN
  std: normalize_lib.Stats = normalize_lib.GENERIC_STD
  conv_features: Sequence[int] = (32, 64, 64)
  hidden: int = 128
  pool_min_sizes: Sequence[int] = (32, 16)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits of shape (N, num_classes).

    Args:
      x: images NHWC in [0, 1].
      train: unused (the model has no train-only behaviour); kept so every
        dds_jax model has the same signature.
    """
    del train
    height = x.shape[1]
    x = normalize_lib.normalize(x, self.mean, self.std, self.dtype)
    for i, features in enumerate(self.conv_features):
      x = nn.Conv(
          features, (3, 3), padding='SAME', dtype=self.dtype,
          kernel_init=_kernel_init, name=f'conv{i + 1}')(x)
      x = nn.relu(x)
      if i < len(self.pool_min_sizes) and height >= self.pool_min_sizes[i]:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_kernel_init,
                 name='fc1')(x)
    x = nn.relu(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_kernel_init,
                 name='head')(x)
    return x.astype(jnp.float32)
