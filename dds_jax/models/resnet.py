"""ResNet-18 (CIFAR or ImageNet stem) and ResNet-50 (torchvision v1.5 layout).

The layouts, paddings and parameter names follow PyTorch so that published
checkpoints (kuangliu-style CIFAR ResNets, torchvision ResNet-50 as used by
Cohen et al.) can be ported one tensor at a time:

* stem: `conv1`, `bn1`; stages: `layer{1..4}_{block}`; head: `fc`;
* inside a block: `conv1`, `bn1`, `conv2`, `bn2`[, `conv3`, `bn3`] and, when
  the shape changes, `downsample_conv`, `downsample_bn`;
* convolutions have no bias, explicit symmetric padding (k // 2) like
  PyTorch, and the stride of a Bottleneck sits on its 3x3 convolution;
* BatchNorm uses momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5. One
  difference remains: flax tracks the biased batch variance, PyTorch the
  unbiased one, which only matters for running statistics of tiny batches.

Images come in NHWC in [0, 1]; the per-channel normalisation is the first op.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dds_jax import errors
from dds_jax.models import normalize as normalize_lib

ModuleDef = Callable[..., nn.Module]

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kernel // 2, kernel // 2),) * 2


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or projection shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3), (self.strides,) * 2,
                  padding=_pad(3), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=_pad(3), name='conv2')(y)
    y = self.norm(
        name='bn2',
        scale_init=(nn.initializers.zeros_init() if self.zero_init_residual
                    else nn.initializers.ones_init()))(y)
    residual = x
    if x.shape != y.shape:
      residual = self.conv(self.features, (1, 1), (self.strides,) * 2,
                           padding='VALID', name='downsample_conv')(x)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(residual + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 with a shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_features = self.features * self.expansion
    y = self.conv(self.features, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), (self.strides,) * 2,
                  padding=_pad(3), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(out_features, (1, 1), padding='VALID', name='conv3')(y)
    y = self.norm(
        name='bn3',
        scale_init=(nn.initializers.zeros_init() if self.zero_init_residual
                    else nn.initializers.ones_init()))(y)
    residual = x
    if x.shape != y.shape:
      residual = self.conv(out_features, (1, 1), (self.strides,) * 2,
                           padding='VALID', name='downsample_conv')(x)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """Generic ResNet; use the `ResNet18` / `ResNet50` aliases below.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2).
    block_cls: `BasicBlock` or `Bottleneck`.
    stem: 'cifar' (3x3 stride-1 conv, no pooling) or 'imagenet' (7x7
      stride-2 conv then 3x3 stride-2 max-pool).
    mean: per-channel (or single) mean subtracted from the [0, 1] input.
    std: per-channel (or single) std the centred input is divided by.
    width: channels of the stem and of the first stage (doubled per stage).
    zero_init_residual: initialise the last BatchNorm scale of each block to
      zero (off by default, like torchvision).
    bn_axis_name: mapped axis name over which BatchNorm averages batch
      statistics in train mode (for pmap / shard_map data parallelism).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32,
      logits are float32.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  stem: str = 'cifar'
  mean: normalize_lib.Stats = normalize_lib.CIFAR10_MEAN
  std: normalize_lib.Stats = normalize_lib.CIFAR10_STD
  width: int = 64
  zero_init_residual: bool = False
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits of shape (N, num_classes).

    Args:
      x: images NHWC in [0, 1].
      train: if True, BatchNorm normalises with batch statistics and updates
        its running averages (call `apply` with `mutable=['batch_stats']`);
        if False it uses the running averages and mutates nothing.
    """
    if self.stem not in ('cifar', 'imagenet'):
      raise errors.ConfigError(
          f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype, axis_name=self.bn_axis_name)

    x = normalize_lib.normalize(x, self.mean, self.std, self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    else:
      x = conv(self.width, (3, 3), padding=_pad(3), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
            features=self.width * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            conv=conv,
            norm=norm,
            zero_init_residual=self.zero_init_residual,
            name=f'layer{i + 1}_{j}')(x)

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


class ResNet18(ResNet):
  """ResNet-18: BasicBlocks [2, 2, 2, 2], widths 64/128/256/512.

  Defaults to the CIFAR stem (3x3 stride-1 conv, no max-pool) and CIFAR-10
  statistics; `stem='imagenet'` gives the torchvision layout.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: type[nn.Module] = BasicBlock
  stem: str = 'cifar'
  mean: normalize_lib.Stats = normalize_lib.CIFAR10_MEAN
  std: normalize_lib.Stats = normalize_lib.CIFAR10_STD


class ResNet50(ResNet):
  """ResNet-50 (torchvision v1.5): Bottlenecks [3, 4, 6, 3], expansion 4.

  Defaults to the ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max-pool)
  and ImageNet statistics.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_cls: type[nn.Module] = Bottleneck
  stem: str = 'imagenet'
  mean: normalize_lib.Stats = normalize_lib.IMAGENET_MEAN
  std: normalize_lib.Stats = normalize_lib.IMAGENET_STD
