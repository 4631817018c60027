"""Classifiers for randomized smoothing, and the one boundary to them.

The rest of dds_jax sees a model only through

    apply_fn(variables, x) -> logits

where `variables` is the full flax variables dict ({'params': ...} plus
{'batch_stats': ...} for BatchNorm models), `x` is a batch of images NHWC in
[0, 1] pixel space (noise is added in that space before the model) and the
logits are float32 of shape (N, num_classes). `apply_fn` runs in inference
mode and is a pure function: it can be jitted, vmapped and used in shard_map.

Example:

  bundle = models.build('resnet18', num_classes=10, input_shape=(32, 32, 3))
  variables = bundle.init(jax.random.key(0))
  logits = jax.jit(bundle.apply_fn)(variables, images)
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dds_jax import errors
from dds_jax.models import normalize as normalize_lib
from dds_jax.models.cnn import SmallCNN
from dds_jax.models.normalize import CIFAR10_MEAN
from dds_jax.models.normalize import CIFAR10_STD
from dds_jax.models.normalize import COHEN_CIFAR10_STD
from dds_jax.models.normalize import default_stats
from dds_jax.models.normalize import GENERIC_MEAN
from dds_jax.models.normalize import GENERIC_STD
from dds_jax.models.normalize import IMAGENET_MEAN
from dds_jax.models.normalize import IMAGENET_STD
from dds_jax.models.resnet import ResNet
from dds_jax.models.resnet import ResNet18
from dds_jax.models.resnet import ResNet50
from dds_jax.models.resnet_cifar import CifarResNet110
from dds_jax.models.resnet_cifar import CifarResNet20
from dds_jax.models.resnet_cifar import DdrsResNet18

Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, jax.Array], jax.Array]

_REGISTRY: dict[str, type[nn.Module]] = {
    'small_cnn': SmallCNN,
    'resnet18': ResNet18,
    'resnet50': ResNet50,
    # Architectures of published smoothing checkpoints (see dds_jax.convert).
    'cifar_resnet110': CifarResNet110,
    'cifar_resnet20': CifarResNet20,
    'ddrs_resnet18': DdrsResNet18,
}
_COHEN_STATS = ('cifar_resnet110', 'cifar_resnet20')
MODEL_NAMES = tuple(sorted(_REGISTRY))


def make_apply_fn(module: nn.Module) -> ApplyFn:
  """Returns the pure inference function `apply_fn(variables, x) -> logits`.

  Args:
    module: any dds_jax model (a flax module whose `__call__` takes
      `(x, train)`).

  Returns:
    A function mapping the full variables dict and a batch NHWC in [0, 1] to
    float32 logits, with BatchNorm (if any) on its running averages.
  """

  def apply_fn(variables: Variables, x: jax.Array) -> jax.Array:
    return module.apply(variables, x, train=False).astype(jnp.float32)

  return apply_fn


def count_params(variables: Variables) -> int:
  """Number of trainable parameters.

  Args:
    variables: a full variables dict (only its 'params' collection is
      counted, so BatchNorm running statistics are not) or a bare params tree.

  Returns:
    The total number of scalars.
  """
  if isinstance(variables, Mapping) and 'params' in variables:
    variables = variables['params']
  return int(sum(x.size for x in jax.tree.leaves(variables)))


def fingerprint(variables: Variables, name: str = '') -> str:
  """sha256 of a model's name and all its variables (names, shapes, bytes).

  Identifies "this architecture with these weights", e.g. for a memory store
  of certificates, which is only valid for the model that issued them.
  """
  h = hashlib.sha256(name.encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f'{arr.dtype.str}{arr.shape}'.encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelBundle:
  """A model together with the shapes it was built for.

  Attributes:
    module: the flax module.
    name: registry name, e.g. 'resnet18'.
    num_classes: number of logits.
    input_shape: (H, W, C) of one image.
  """

  module: nn.Module
  name: str
  num_classes: int
  input_shape: tuple[int, int, int]

  def init(self, key: jax.Array | int) -> dict[str, Any]:
    """Initialises the variables on a zeros batch of `input_shape`.

    Args:
      key: a PRNG key, or an int seed.

    Returns:
      A dict {'params': ...} plus {'batch_stats': ...} for BatchNorm models.
      Works under `jax.eval_shape` to get shapes without allocating.
    """
    if isinstance(key, int):
      key = jax.random.key(key)
    x = jnp.zeros((1, *self.input_shape), jnp.float32)
    # Eager on purpose: a one-off init is cheaper op by op than compiled.
    return dict(self.module.init(key, x, train=False))

  def apply_fn(self, variables: Variables, x: jax.Array) -> jax.Array:
    """float32 logits in inference mode; pure, so jit / vmap / shard_map it."""
    return self.module.apply(variables, x, train=False).astype(jnp.float32)

  def apply_train(
      self,
      variables: Variables,
      x: jax.Array,
      *,
      mutable: Sequence[str] = ('batch_stats',),
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Train-mode forward pass.

    Args:
      variables: the full variables dict.
      x: images NHWC in [0, 1].
      mutable: collections the forward pass may update. Collections the
        model does not have are ignored, so the default works for models
        with and without BatchNorm.

    Returns:
      (logits, new_state): float32 logits and the updated mutable
      collections as flax returns them, i.e. {'batch_stats': ...} for
      BatchNorm models and {} for models without any. Merge it back with
      `variables = {**variables, **new_state}` either way.
    """
    mutable = [c for c in mutable if c in variables]
    if not mutable:
      logits = self.module.apply(variables, x, train=True)
      return logits.astype(jnp.float32), {}
    logits, new_state = self.module.apply(
        variables, x, train=True, mutable=mutable)
    return logits.astype(jnp.float32), dict(new_state)

  @property
  def has_batch_stats(self) -> bool:
    """Whether the model carries BatchNorm running statistics."""
    return isinstance(self.module, ResNet)


def _check_build_args(
    name: str, num_classes: int, input_shape: Sequence[int]
) -> tuple[int, int, int]:
  if name not in _REGISTRY:
    raise errors.ConfigError(
        f'unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}')
  return check_classes_and_shape(num_classes, input_shape)


def check_classes_and_shape(num_classes: int,
                            input_shape: Sequence[int]) -> tuple[int, int, int]:
  """A positive int number of classes and an (H, W, C) shape, or ConfigError."""
  if (isinstance(num_classes, bool) or not isinstance(num_classes, int)
      or num_classes < 1):
    raise errors.ConfigError(
        f'num_classes must be a positive int, got {num_classes!r}')
  try:
    shape = tuple(int(d) for d in input_shape)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(
        f'input_shape must be (H, W, C), got {input_shape!r}') from e
  if len(shape) != 3 or min(shape) < 1:
    raise errors.ConfigError(
        f'input_shape must be (H, W, C) of positive ints, got {input_shape!r}')
  return shape


def build(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    *,
    mean: normalize_lib.Stats | None = None,
    std: normalize_lib.Stats | None = None,
    dtype: Any = jnp.float32,
    **module_kwargs: Any,
) -> ModelBundle:
  """Builds a model by name.

  Args:
    name: one of 'small_cnn', 'resnet18', 'resnet50'.
    num_classes: number of logits.
    input_shape: (H, W, C) of one image.
    mean: normalisation mean (one value or one per channel). Defaults to the
      ImageNet statistics for 'resnet50' and for three-channel inputs at least
      64 pixels high, CIFAR-10 for smaller three-channel inputs and 0.5
      otherwise.
    std: normalisation std, defaulted the same way as `mean` (note: CIFAR-10
      std is (0.2470, 0.2435, 0.2616); Cohen et al.'s checkpoints use
      `COHEN_CIFAR10_STD`).
    dtype: compute dtype, e.g. jnp.bfloat16 as an opt-in. Parameters stay
      float32 and logits are returned as float32.
    **module_kwargs: extra attributes of the module, e.g. `stem='imagenet'`
      for 'resnet18', `width`, `zero_init_residual`, `bn_axis_name`.

  Returns:
    A `ModelBundle`.

  Raises:
    ConfigError: for an unknown name, bad num_classes / input_shape / mean /
      std, or a keyword the module does not have.
  """
  shape = _check_build_args(name, num_classes, input_shape)
  channels = shape[-1]
  if name == 'resnet50' and channels == 3:
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
  elif name in _COHEN_STATS:
    if shape != (32, 32, 3):
      raise errors.ConfigError(f'{name} takes 32x32x3 inputs (its 8x8 average '
                               f'pool is global only there); got {shape}')
    default_mean, default_std = CIFAR10_MEAN, COHEN_CIFAR10_STD
  else:
    default_mean, default_std = default_stats(shape)
  mean = normalize_lib.as_stats(default_mean if mean is None else mean, 'mean')
  std = normalize_lib.as_stats(default_std if std is None else std, 'std')
  for what, values in (('mean', mean), ('std', std)):
    if len(values) not in (1, channels):
      raise errors.ConfigError(
          f'{what} has {len(values)} values but input_shape {shape} has '
          f'{channels} channels; give one value or one per channel')
  try:
    module = _REGISTRY[name](
        num_classes=num_classes, mean=mean, std=std, dtype=dtype,
        **module_kwargs)
  except TypeError as e:
    raise errors.ConfigError(f'bad arguments for model {name!r}: {e}') from e
  if getattr(module, 'stem', 'cifar') not in ('cifar', 'imagenet'):
    raise errors.ConfigError(
        f"stem must be 'cifar' or 'imagenet', got {module.stem!r}")
  return ModelBundle(
      module=module, name=name, num_classes=num_classes, input_shape=shape)


__all__ = [
    'ApplyFn',
    'CIFAR10_MEAN',
    'CIFAR10_STD',
    'COHEN_CIFAR10_STD',
    'GENERIC_MEAN',
    'GENERIC_STD',
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'MODEL_NAMES',
    'ModelBundle',
    'ResNet',
    'ResNet18',
    'ResNet50',
    'SmallCNN',
    'Variables',
    'build',
    'build_from_config',
    'count_params',
    'default_stats',
    'make_apply_fn',
]


def build_from_config(config, image_shape: Sequence[int],
                      training: bool = False) -> ModelBundle:
  """The model of a dds_jax config (`config.model.*`).

  The compute dtype is `config.train.dtype` in training and
  `config.certify.dtype` otherwise (certification, sigma selection,
  evaluation); parameters stay float32 either way.
  """
  kwargs = {}
  dtype = config.train.dtype if training else config.certify.get(
      'dtype', 'float32')
  if dtype == 'bfloat16':
    kwargs['dtype'] = jnp.bfloat16
  if config.model.conv_features:
    kwargs['conv_features'] = tuple(config.model.conv_features)
  return build(config.model.name, config.model.num_classes,
               tuple(image_shape), **kwargs)
