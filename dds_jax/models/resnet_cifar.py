"""ResNets of the published randomized-smoothing checkpoints.

Two architectures that `dds_jax.models.resnet` cannot express with its
attributes alone, written with the same blocks and parameter names so that
`dds_jax.convert` ports their PyTorch weights one tensor at a time:

* `CifarResNet110` / `CifarResNet20`: Cohen et al.'s CIFAR-10 models
  (locuslab/smoothing `code/archs/cifar_resnet.py`, itself from
  bearpaw/pytorch-classification): 3x3 stem conv (16) + BN + ReLU, three
  stages of BasicBlocks with 16 / 32 / 64 channels ((depth - 2) / 6 blocks
  each: 18 for depth 110, 3 for depth 20), a 1x1-conv + BN projection
  shortcut where the shape changes (the first block of stages 2 and 3),
  8x8 average pool (= global average pool on 32x32 inputs), `fc`. These are
  plain `ResNet`s with `width=16` and three stages; the aliases only fix the
  defaults, including Cohen's CIFAR-10 normalisation (std 0.2023, 0.1994,
  0.2010).
* `DdrsResNet18`: the CIFAR-10 model of the official DDRS code
  (MotasemAlfarra/Data_Dependent_Randomized_Smoothing, `CIFAR10/models/
  resnet.py`): torchvision's ImageNet ResNet-18 (7x7 stride-2 stem conv,
  3x3 stride-2 max-pool) with the stem BatchNorm removed ("Bibi: removed
  first batch norm") and a softmax after `fc`. Here the model returns the
  logits, like every dds_jax model: argmax is unchanged and
  `dds_jax.sigma_opt` applies the softmax itself, so its psi is the official
  one. The official normalisation, done inside `forward` with constants,
  is CIFAR-10 mean with Cohen's std.

Images come in NHWC in [0, 1]; the per-channel normalisation is the first op.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dds_jax import errors
from dds_jax.models import normalize as normalize_lib
from dds_jax.models.resnet import BasicBlock
from dds_jax.models.resnet import ResNet

# As in dds_jax.models.resnet (torchvision's kaiming_normal_, fan_out).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kernel // 2, kernel // 2),) * 2


class CifarResNet110(ResNet):
  """Cohen et al.'s CIFAR ResNet-110: 3 stages of 18 BasicBlocks, 16/32/64.

  Only 32x32 inputs reproduce the PyTorch model exactly: its `AvgPool2d(8)`
  is a global average pool only when the last stage is 8x8.
  """

  stage_sizes: Sequence[int] = (18, 18, 18)
  block_cls: type[nn.Module] = BasicBlock
  stem: str = 'cifar'
  width: int = 16
  mean: normalize_lib.Stats = normalize_lib.CIFAR10_MEAN
  std: normalize_lib.Stats = normalize_lib.COHEN_CIFAR10_STD


class CifarResNet20(CifarResNet110):
  """Cohen et al.'s CIFAR ResNet-20: 3 stages of 3 BasicBlocks, 16/32/64."""

  stage_sizes: Sequence[int] = (3, 3, 3)


class DdrsResNet18(ResNet):
  """The official DDRS CIFAR-10 ResNet-18 (ImageNet stem, no stem BN).

  Attributes (beyond `ResNet`'s):
    stem_bn: whether a BatchNorm follows the stem convolution. False (the
      DDRS model) leaves `conv1 -> relu -> max-pool`; True gives the plain
      torchvision layout, i.e. `ResNet18(stem='imagenet')`.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: type[nn.Module] = BasicBlock
  stem: str = 'imagenet'
  mean: normalize_lib.Stats = normalize_lib.CIFAR10_MEAN
  std: normalize_lib.Stats = normalize_lib.COHEN_CIFAR10_STD
  stem_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits of shape (N, num_classes).

    Args:
      x: images NHWC in [0, 1].
      train: BatchNorm on batch statistics (updating the running averages,
        so pass `mutable=['batch_stats']`) if True, else on the running
        averages.
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
    else:
      x = conv(self.width, (3, 3), padding=_pad(3), name='conv1')(x)
    if self.stem_bn:
      x = norm(name='bn1')(x)
    x = nn.relu(x)
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))

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
