"""Datasets for dds_jax: loading, Cohen's selection and batching.

Usage:

  from dds_jax import data

  ds = data.load('imagefolder:/path/to/cifar10-jpeg-q75.zip', 'test')
  ds = data.select(ds, skip=20)             # Cohen et al.'s 500 test images.
  for batch in data.iterate_batches(ds, 100):
    ...  # batch['images'], ['labels'], ['example_ids'], ['mask']

Spec strings for `load`:

- 'digits': scikit-learn's bundled 8x8 digits (see `dds_jax.data.digits`).
- 'imagefolder:<directory or .zip>': ImageFolder layout
  `<split>/<class>/<image>`, decoded once and cached (see
  `dds_jax.data.imagefolder`).
- 'tfds:<name>': a TFDS dataset prepared in array_record format (see
  `dds_jax.data.tfds_source`).

Two pipelines (`config.data.pipeline`):

- 'memory' (the default): the split decoded once into host RAM (`Dataset`),
  batches by `iterate_batches`. Fastest for digits and CIFAR-10.
- 'grain': the split read lazily (`dds_jax.data.records.LazyDataset`, one
  record decoded at a time, with ImageNet's resize and crops), training
  batches streamed through grain (`dds_jax.data.pipeline`). Memory does not
  grow with the dataset. On a dataset both can read, the two give the same
  batches (order, example ids, images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dds_jax import errors
from dds_jax.data import digits
from dds_jax.data import imagefolder
from dds_jax.data import records
from dds_jax.data import tfds_source
from dds_jax.data.dataset import Dataset
from dds_jax.data.dataset import iterate_batches
from dds_jax.data.dataset import select
from dds_jax.data.imagefolder import default_cache_dir
from dds_jax.data.imagefolder import load_uint8 as load_imagefolder_uint8
from dds_jax.data.imagefolder import RawSplit
from dds_jax.data.records import LazyDataset
from dds_jax.data.records import Preprocess

__all__ = [
    'Dataset',
    'HOLDOUT_SPLIT',
    'LazyDataset',
    'PIPELINES',
    'Preprocess',
    'RawSplit',
    'SPEC_FORMATS',
    'default_cache_dir',
    'holdout_positions',
    'check_fits',
    'iterate_batches',
    'load',
    'load_split',
    'load_imagefolder_uint8',
    'select',
]

PIPELINES = ('memory', 'grain')

SPEC_FORMATS = (
    'digits',
    'imagefolder:<directory or .zip file>',
    'tfds:<name>',
)


def load(spec: str,
         split: str,
         *,
         cache_dir: str | None = None,
         class_names: Sequence[str] | None = None,
         data_dir: str | None = None,
         decode_processes: int = 1) -> Dataset:
  """Loads a split of a dataset named by a spec string.

  Args:
    spec: 'digits', 'imagefolder:<directory or .zip>' or 'tfds:<name>'.
    split: Split name, e.g. 'train' or 'test'.
    cache_dir: imagefolder only: where decoded splits are cached; default
      `$DDS_JAX_CACHE`, else `~/.cache/dds_jax`.
    class_names: imagefolder: the class list (label = position in it) instead
      of the class folders sorted by name. digits and tfds have fixed classes;
      if given, it must equal them.
    data_dir: tfds only: the TFDS data directory.
    decode_processes: imagefolder only: processes decoding a split that is not
      cached (1 = serial, 0 = one per CPU; `config.data.decode_processes`).

  Arguments a source does not use are ignored, so callers can pass the same
  ones for every spec.

  Returns:
    The split, with float32 NHWC images in [0, 1].

  Raises:
    ConfigError: bad spec string or arguments.
    DataError: data that cannot be found or read.
  """
  if not isinstance(spec, str):
    raise errors.ConfigError(
        f'Dataset spec must be a string, got {type(spec).__name__}.')
  kind, sep, rest = spec.partition(':')
  if kind == 'digits' and not sep:
    return digits.load(split, class_names=class_names)
  if kind == 'imagefolder' and sep:
    return imagefolder.load(
        rest, split, cache_dir=cache_dir, class_names=class_names,
        processes=decode_processes)
  if kind == 'tfds' and sep:
    return tfds_source.load(
        rest, split, data_dir=data_dir, class_names=class_names)
  raise errors.ConfigError(
      f'Unknown dataset spec {spec!r}. Valid forms: '
      f'{", ".join(repr(f) for f in SPEC_FORMATS)}.')



# The split name of the examples `config.data.holdout` takes out of training.
HOLDOUT_SPLIT = 'holdout'
# Fixed (not the config's seed): the held-out set is the same for every run.
_HOLDOUT_SEED = 20221


def holdout_positions(num_train: int, holdout: int) -> np.ndarray:
  """Positions (sorted) of the `holdout` training examples held out.

  A fixed random subset of the training split, the same for every seed, so
  that models trained without it can be tuned on it (e.g. the sigma grid)
  without touching the test images.
  """
  if not 0 <= holdout < num_train:
    raise errors.ConfigError(
        f'data.holdout={holdout} must be in [0, {num_train}): the training '
        f'split has {num_train} examples.')
  perm = np.random.default_rng(_HOLDOUT_SEED).permutation(num_train)
  return np.sort(perm[:holdout])


def load_split(config, split: str) -> Dataset:
  """The split of a dds_jax config's dataset (`config.data.*`).

  With `config.data.holdout = k > 0`, `k` fixed random examples of the
  training split (`holdout_positions`) are removed from it and form the split
  'holdout' (they keep their training-split example ids).
  """
  dc = config.data
  k = int(dc.get('holdout', 0))
  source = dc.train_split if split == HOLDOUT_SPLIT else split
  if split == HOLDOUT_SPLIT and k <= 0:
    raise errors.ConfigError(
        "The split 'holdout' needs data.holdout > 0 (the number of training "
        'examples to hold out).')
  pipeline = dc.get('pipeline', 'memory')
  if pipeline not in PIPELINES:
    raise errors.ConfigError(
        f'data.pipeline={pipeline!r}; use one of {PIPELINES}.')
  class_names = tuple(dc.class_names) or None
  decode_processes = int(dc.get('decode_processes', 1))
  if pipeline == 'grain':
    in_memory = None
    if dc.name == 'digits':  # no lazy reader needed: 1,797 tiny images
      in_memory = digits.load(source, class_names=class_names)
    ds = records.load(dc.name, source, class_names=class_names,
                      data_dir=dc.data_dir or None, preprocess=preprocess(dc),
                      in_memory=in_memory, in_ram=bool(dc.get('in_ram')),
                      cache_dir=dc.cache_dir or None,
                      decode_processes=decode_processes)
  else:
    if dc.get('preprocess', 'none') != 'none':
      raise errors.ConfigError(
          f"data.preprocess={dc.preprocess!r} needs data.pipeline='grain' "
          '(images are resized and cropped one at a time as they are read).')
    ds = load(dc.name, source, cache_dir=dc.cache_dir or None,
              class_names=class_names, data_dir=dc.data_dir or None,
              decode_processes=decode_processes)
  if k > 0 and source == dc.train_split:
    held = np.zeros(len(ds), bool)
    held[holdout_positions(len(ds), k)] = True
    ds = ds.take(held if split == HOLDOUT_SPLIT else ~held)
    if split == HOLDOUT_SPLIT:
      ds = ds.with_split(HOLDOUT_SPLIT)
  return ds


def preprocess(data_config) -> Preprocess:
  """The `Preprocess` of `config.data` (preprocess, image_size, resize)."""
  return Preprocess(kind=data_config.get('preprocess', 'none'),
                    size=int(data_config.get('image_size', 224)),
                    resize=int(data_config.get('resize', 256)))


def check_fits(config, ds: Dataset) -> None:
  """A ConfigError unless the dataset has the config's number of classes."""
  if ds.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'dataset {ds.name} has {ds.num_classes} classes but '
        f'model.num_classes={config.model.num_classes}')
