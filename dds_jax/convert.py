"""Bring your PyTorch model: published smoothing checkpoints as dds_jax models.

`load_torch_state_dict` turns a PyTorch `state_dict` (or a checkpoint dict
holding one under 'state_dict', as `torch.load` returns it) into a
`dds_jax.models.ModelBundle` and its flax variables; `to_torch_state_dict`
goes the other way. Torch itself is never imported here: tensors are read
with `.detach().cpu().numpy()`, plain numpy arrays work as well, and the
export returns numpy arrays (`torch.from_numpy` them, or pass
`as_torch=True`).

Architectures (`ARCHS`) and the checkpoints they read:

* 'cifar_resnet110' (and 'cifar_resnet20'): Cohen et al.'s CIFAR-10 models
  (locuslab/smoothing, `code/archs/cifar_resnet.py`: BasicBlocks, 3 stages
  of (depth - 2) / 6 blocks, widths 16/32/64, 3x3 stem conv + BN + ReLU,
  1x1-conv + BN projection shortcut where the shape changes, `AvgPool2d(8)`,
  `fc`). `code/architectures.py` wraps the model as
  `torch.nn.Sequential(NormalizeLayer(mean, std), model)`, so the keys are
  `1.conv1.weight`, `1.bn1.running_mean`, `1.layer1.0.conv1.weight`,
  `1.layer2.0.downsample.0.weight` (the 1x1 conv), `...downsample.1.weight`
  (its BN), ..., `1.fc.weight`; `NormalizeLayer` keeps its statistics as
  plain tensor attributes, so `0.` has no keys. Normalisation: CIFAR-10 mean
  (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010). 32x32 inputs only
  (`AvgPool2d(8)` is a global pool only there).
* 'resnet50': Cohen et al.'s ImageNet model, torchvision's `resnet50`
  (v1.5: stride on the 3x3 conv) wrapped as
  `Sequential(NormalizeLayer, DataParallel(resnet50()))`: keys
  `1.module.conv1.weight`, `1.module.layer1.0.downsample.0.weight`, ...
  (`1.conv1.weight` without the DataParallel; both load). ImageNet mean and
  std. Any input size works (adaptive average pool).
* 'ddrs_resnet18': the official DDRS CIFAR-10 model
  (MotasemAlfarra/Data_Dependent_Randomized_Smoothing,
  `CIFAR10/models/resnet.py`): torchvision's ImageNet-style ResNet-18 (7x7
  stride-2 stem, max-pool) with no stem BatchNorm and a softmax after `fc`,
  normalising inside `forward` with constants (CIFAR-10 mean, Cohen's std).
  Not wrapped: keys `conv1.weight`, `layer1.0.conv1.weight`, ...,
  `fc.weight`, no `bn1`. The imported model returns the logits (before the
  softmax); see `dds_jax.models.resnet_cifar.DdrsResNet18`.
* 'resnet18' and 'small_cnn': dds_jax's own models (as `models.build`
  makes them; `stem='imagenet'` etc. as keyword arguments), in the layout
  `to_torch_state_dict` writes.

Any of the wrappers above is recognised on any architecture: a leading
`module.` (DataParallel) and a `Sequential(normalize, model)` wrapper (`0.` /
`1.` prefixes) are stripped. If the normalize layer stored its statistics as
buffers (`0.means` / `0.sds`, or `0.mean` / `0.std`), those are used.

Name and layout mapping (the same for every architecture): flax module
`layer{i}_{j}` is torch `layer{i}.{j}`, `downsample_conv` / `downsample_bn`
are `downsample.0` / `downsample.1`, other names are equal; conv kernels are
HWIO in flax and OIHW in torch, dense kernels [in, out] vs torch's
[out, in]; BatchNorm `scale`, `bias` are `weight`, `bias`, and its
batch_stats `mean`, `var` are `running_mean`, `running_var`. PyTorch's
running variance is the unbiased batch variance and flax's the biased one,
but both are used the same way at inference, so the value is copied as is.
`num_batches_tracked` is ignored on import and written as 0 on export.

Example:

  ckpt = torch.load('noise_0.25/checkpoint.pth.tar', map_location='cpu')
  bundle, variables = convert.load_torch_state_dict(ckpt, 'cifar_resnet110')
  cert = certify.certify(bundle.apply_fn, variables, images, 0.25, key)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dds_jax import errors
from dds_jax import models
from dds_jax.models import normalize as normalize_lib
from dds_jax.models import resnet_cifar

# Architecture name -> (flax module class or None for models.build, defaults).
_ARCH_MODULES = {
    'cifar_resnet110': resnet_cifar.CifarResNet110,
    'cifar_resnet20': resnet_cifar.CifarResNet20,
    'ddrs_resnet18': resnet_cifar.DdrsResNet18,
    'resnet50': None,
    'resnet18': None,
    'small_cnn': None,
}
ARCHS = tuple(sorted(_ARCH_MODULES))
_DEFAULT_INPUT_SHAPE = {'resnet50': (224, 224, 3)}
_CIFAR_ONLY = ('cifar_resnet110', 'cifar_resnet20')
_NORMALIZE_MEAN_NAMES = ('means', 'mean')
_NORMALIZE_STD_NAMES = ('sds', 'std', 'stds')
_MAX_LISTED = 5

StateDict = Mapping[str, Any]


def build_arch(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int] | None = None,
    *,
    mean: normalize_lib.Stats | None = None,
    std: normalize_lib.Stats | None = None,
    **module_kwargs: Any,
) -> models.ModelBundle:
  """A `ModelBundle` (random weights) for one of `ARCHS`.

  Args:
    arch: one of `ARCHS`.
    num_classes: number of logits.
    input_shape: (H, W, C); defaults to (224, 224, 3) for 'resnet50' and
      (32, 32, 3) otherwise.
    mean: normalisation mean; defaults to the checkpoint's (see the module
      docstring) or, for 'resnet18' / 'small_cnn', to `models.build`'s.
    std: normalisation std, defaulted the same way.
    **module_kwargs: further module attributes (e.g. `stem='imagenet'` for
      'resnet18', `dtype=jnp.bfloat16`).

  Returns:
    The bundle; its `name` is `arch`.

  Raises:
    ConfigError: for an unknown arch, a non-32x32 input for Cohen's CIFAR
      ResNets, or arguments the module does not take.
  """
  if arch not in _ARCH_MODULES:
    raise errors.ConfigError(
        f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')
  if input_shape is None:
    input_shape = _DEFAULT_INPUT_SHAPE.get(arch, (32, 32, 3))
  module_cls = _ARCH_MODULES[arch]
  if module_cls is None:
    return models.build(arch, num_classes, input_shape, mean=mean, std=std,
                        **module_kwargs)
  shape = models.check_classes_and_shape(num_classes, input_shape)
  if arch in _CIFAR_ONLY and shape[:2] != (32, 32):
    raise errors.ConfigError(
        f'{arch} reproduces the PyTorch model on 32x32 inputs only (its '
        f'AvgPool2d(8) is a global pool there); got input_shape {shape}')
  kwargs = dict(module_kwargs)
  if mean is not None:
    kwargs['mean'] = normalize_lib.as_stats(mean, 'mean')
  if std is not None:
    kwargs['std'] = normalize_lib.as_stats(std, 'std')
  try:
    module = module_cls(num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise errors.ConfigError(f'bad arguments for arch {arch!r}: {e}') from e
  for what in ('mean', 'std'):
    values = normalize_lib.as_stats(getattr(module, what), what)
    if len(values) not in (1, shape[-1]):
      raise errors.ConfigError(
          f'{what} has {len(values)} values but input_shape {shape} has '
          f'{shape[-1]} channels')
  return models.ModelBundle(module=module, name=arch, num_classes=num_classes,
                            input_shape=shape)


def _torch_module_name(name: str) -> str:
  m = re.fullmatch(r'layer(\d+)_(\d+)', name)
  if m:
    return f'layer{m.group(1)}.{m.group(2)}'
  return {'downsample_conv': 'downsample.0',
          'downsample_bn': 'downsample.1'}.get(name, name)


_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'bias'): 'bias',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _flatten(tree: Mapping[str, Any], prefix=()) -> list[tuple[tuple, Any]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.extend(_flatten(v, prefix + (k,)))
    else:
      out.append((prefix + (k,), v))
  return out


def _key_map(variables: Mapping[str, Any]) -> dict[tuple, str]:
  """(collection, *flax path) -> torch key, for every leaf of `variables`."""
  keys = {}
  for collection in variables:
    for path, _ in _flatten(variables[collection]):
      *modules, leaf = path
      if (collection, leaf) not in _LEAF_NAMES:
        raise errors.CheckpointError(
            f'no PyTorch name for {collection}/{"/".join(path)}')
      keys[(collection, *path)] = '.'.join(
          [_torch_module_name(m) for m in modules] +
          [_LEAF_NAMES[(collection, leaf)]])
  return keys


def _to_torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == 'kernel' and value.ndim == 4:  # HWIO -> OIHW
    return np.transpose(value, (3, 2, 0, 1))
  if leaf_name == 'kernel' and value.ndim == 2:  # [in, out] -> [out, in]
    return value.T
  return value


def _from_torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == 'kernel' and value.ndim == 4:  # OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if leaf_name == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _torch_shape(leaf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf_name == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf_name == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _as_numpy(value: Any, key: str) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    try:
      value = value.numpy()
    except TypeError:  # bfloat16 and other dtypes numpy lacks
      value = value.float().numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(
        f'{key}: cannot read {type(value).__name__} as an array: {e}') from e


def _unwrap(state_dict: StateDict) -> tuple[dict[str, Any], dict[str, Any],
                                            list[str]]:
  """Strips DataParallel / Sequential(normalize, model) prefixes.

  Returns:
    (model entries, normalize-layer entries, stripped prefixes).
  """
  if 'state_dict' in state_dict and isinstance(state_dict['state_dict'],
                                               Mapping):
    state_dict = state_dict['state_dict']
  entries = {str(k): v for k, v in state_dict.items()}
  if not entries:
    raise errors.CheckpointError('the state_dict is empty')
  normalize_entries = {}
  stripped = []
  while True:
    keys = list(entries)
    if all(k.startswith('module.') for k in keys):
      entries = {k[len('module.'):]: v for k, v in entries.items()}
      stripped.append('module.')
      continue
    if (any(k.startswith('1.') for k in keys) and
        all(k.startswith(('0.', '1.')) for k in keys)):
      normalize_entries.update(
          {k[2:]: v for k, v in entries.items() if k.startswith('0.')})
      entries = {k[2:]: v for k, v in entries.items() if k.startswith('1.')}
      stripped.append('1.')
      continue
    break
  return entries, normalize_entries, stripped


def _stored_stats(normalize_entries: dict[str, Any],
                  ) -> tuple[tuple | None, tuple | None]:
  """(mean, std) a normalize layer stored as buffers, else (None, None)."""
  if not normalize_entries:
    return None, None
  found = {}
  unknown = []
  for name, value in normalize_entries.items():
    if name in _NORMALIZE_MEAN_NAMES:
      found['mean'] = value
    elif name in _NORMALIZE_STD_NAMES:
      found['std'] = value
    else:
      unknown.append(name)
  if unknown or set(found) != {'mean', 'std'}:
    raise errors.CheckpointError(
        'the normalize layer (keys 0.*) has entries '
        f'{sorted(normalize_entries)}; expected none, or a mean '
        f'({"/".join(_NORMALIZE_MEAN_NAMES)}) and a std '
        f'({"/".join(_NORMALIZE_STD_NAMES)})')
  return tuple(
      tuple(float(v) for v in _as_numpy(found[w], f'0.{w}').reshape(-1))
      for w in ('mean', 'std'))


def _pick_stats(what: str, given, stored):
  if stored is None:
    return given
  if given is not None and not np.allclose(
      np.broadcast_to(normalize_lib.as_stats(given, what), (len(stored),)),
      stored, rtol=1e-6, atol=1e-7):
    raise errors.CheckpointError(
        f'the checkpoint normalises with {what} {stored} but {what}='
        f'{tuple(normalize_lib.as_stats(given, what))} was given')
  return stored


def _listed(items: list[str]) -> str:
  more = len(items) - _MAX_LISTED
  return ', '.join(items[:_MAX_LISTED]) + (f', ... ({more} more)'
                                           if more > 0 else '')


def load_torch_state_dict(
    state_dict: StateDict,
    arch: str,
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    mean: normalize_lib.Stats | None = None,
    std: normalize_lib.Stats | None = None,
    **module_kwargs: Any,
) -> tuple[models.ModelBundle, dict[str, Any]]:
  """Imports a PyTorch state_dict into the matching dds_jax model.

  Args:
    state_dict: a mapping name -> torch.Tensor or numpy array, or a
      checkpoint dict with one under 'state_dict' (Cohen's and DDRS's
      `.pth.tar` files as `torch.load` returns them).
    arch: one of `ARCHS` (see the module docstring for the key layouts).
    num_classes: number of logits; inferred from the last layer if None.
    input_shape: (H, W, C); defaults to (224, 224, 3) for 'resnet50' and
      (32, 32, 3) otherwise.
    mean: normalisation mean; defaults to what the checkpoint stores, else
      to the architecture's published value (module docstring).
    std: normalisation std, defaulted the same way.
    **module_kwargs: further module attributes, e.g. `stem='imagenet'` for
      'resnet18', `dtype=jnp.bfloat16`.

  Returns:
    (bundle, variables): `bundle.apply_fn(variables, x)` computes the
    PyTorch model's logits (in eval mode) on NHWC images in [0, 1].

  Raises:
    CheckpointError: missing or unexpected keys, shape mismatches or values
      that are not arrays (a few of each are listed).
    ConfigError: a bad `arch`, `input_shape` or module argument.
  """
  if arch not in _ARCH_MODULES:
    raise errors.ConfigError(
        f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')
  if not isinstance(state_dict, Mapping):
    raise errors.CheckpointError(
        f'expected a state_dict (a mapping name -> tensor), got '
        f'{type(state_dict).__name__}')
  entries, normalize_entries, stripped = _unwrap(state_dict)
  entries = {k: v for k, v in entries.items()
             if not k.endswith('num_batches_tracked')}
  stored_mean, stored_std = _stored_stats(normalize_entries)
  mean = _pick_stats('mean', mean, stored_mean)
  std = _pick_stats('std', std, stored_std)

  if num_classes is None:
    last = 'head.weight' if arch == 'small_cnn' else 'fc.weight'
    if last not in entries:
      raise errors.CheckpointError(
          f'cannot infer num_classes: no {last!r} in the state_dict (keys '
          f'after stripping {"".join(stripped) or "nothing"}: '
          f'{_listed(sorted(entries))}); pass num_classes')
    num_classes = int(np.shape(entries[last])[0])
  bundle = build_arch(arch, num_classes, input_shape, mean=mean, std=std,
                      **module_kwargs)
  abstract = jax.eval_shape(lambda: bundle.init(0))
  key_map = _key_map(abstract)

  expected = {torch_key: path for path, torch_key in key_map.items()}
  missing = sorted(set(expected) - set(entries))
  unexpected = sorted(set(entries) - set(expected))
  arrays, mismatched = {}, []
  for torch_key, path in expected.items():
    if torch_key not in entries:
      continue
    value = _as_numpy(entries[torch_key], torch_key)
    leaf = abstract[path[0]]
    for p in path[1:]:
      leaf = leaf[p]
    want = _torch_shape(path[-1], leaf.shape)
    if tuple(value.shape) != want:
      mismatched.append(f'{torch_key}: checkpoint {tuple(value.shape)}, '
                        f'model {want}')
      continue
    if not np.issubdtype(value.dtype, np.floating):
      mismatched.append(f'{torch_key}: dtype {value.dtype}, expected floats')
      continue
    arrays[path] = jnp.asarray(_from_torch_layout(path[-1], value),
                               dtype=leaf.dtype)
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing key(s): {_listed(missing)}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected key(s): '
                   f'{_listed(unexpected)}')
    if mismatched:
      parts.append(f'{len(mismatched)} mismatch(es): {_listed(mismatched)}')
    raise errors.CheckpointError(
        f'the state_dict does not fit arch {arch!r} '
        f'(num_classes={num_classes}, input_shape={bundle.input_shape}; '
        f'prefixes stripped: {"".join(stripped) or "none"}): '
        + '; '.join(parts))

  variables: dict[str, Any] = {}
  for path, value in arrays.items():
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return bundle, variables


def to_torch_state_dict(
    variables: Mapping[str, Any],
    *,
    prefix: str = '',
    num_batches_tracked: bool = True,
    as_torch: bool = False,
) -> dict[str, Any]:
  """dds_jax variables in the PyTorch layout `load_torch_state_dict` reads.

  Works for every dds_jax ResNet and the small CNN: the PyTorch module with
  the same attribute names (`conv1`, `bn1`, `layer1` as a Sequential of
  blocks with `conv1`, `bn1`, ..., `downsample` = Sequential(conv, bn),
  `fc`; `conv1`..`conv3`, `fc1`, `head` for the small CNN) then loads it with
  `load_state_dict(..., strict=True)` and computes the same function.

  Args:
    variables: the full variables dict ({'params': ...} and, for BatchNorm
      models, {'batch_stats': ...}).
    prefix: prepended to every key, e.g. '1.' for a
      `Sequential(NormalizeLayer, model)` wrapper.
    num_batches_tracked: also write each BatchNorm's `num_batches_tracked`
      (0), which `load_state_dict(strict=True)` expects.
    as_torch: return torch tensors (imports torch) instead of numpy arrays.

  Returns:
    An insertion-ordered dict key -> float32 array (int64 for
    num_batches_tracked).
  """
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise errors.CheckpointError(
        "expected the full variables dict with a 'params' collection")
  out = {}
  for path, torch_key in _key_map(variables).items():
    leaf = variables[path[0]]
    for p in path[1:]:
      leaf = leaf[p]
    value = np.array(jax.device_get(leaf), dtype=np.float32)
    out[prefix + torch_key] = np.ascontiguousarray(
        _to_torch_layout(path[-1], value))
    if (num_batches_tracked and path[0] == 'batch_stats' and
        path[-1] == 'var'):
      module = torch_key[:-len('running_var')]
      out[prefix + module + 'num_batches_tracked'] = np.zeros((), np.int64)
  if as_torch:
    import torch  # pylint: disable=g-import-not-at-top
    out = {k: torch.from_numpy(v) for k, v in out.items()}
  return out


__all__ = [
    'ARCHS',
    'build_arch',
    'load_torch_state_dict',
    'to_torch_state_dict',
]
