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
"""

from __future__ import annotations

from collections.abc import Sequence

from dds_jax import errors
from dds_jax.data import digits
from dds_jax.data import imagefolder
from dds_jax.data import tfds_source
from dds_jax.data.dataset import Dataset
from dds_jax.data.dataset import iterate_batches
from dds_jax.data.dataset import select
from dds_jax.data.imagefolder import default_cache_dir
from dds_jax.data.imagefolder import load_uint8 as load_imagefolder_uint8
from dds_jax.data.imagefolder import RawSplit

__all__ = [
    'Dataset',
    'RawSplit',
    'SPEC_FORMATS',
    'default_cache_dir',
    'check_fits',
    'iterate_batches',
    'load',
    'load_split',
    'load_imagefolder_uint8',
    'select',
]

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
         data_dir: str | None = None) -> Dataset:
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
        rest, split, cache_dir=cache_dir, class_names=class_names)
  if kind == 'tfds' and sep:
    return tfds_source.load(
        rest, split, data_dir=data_dir, class_names=class_names)
  raise errors.ConfigError(
      f'Unknown dataset spec {spec!r}. Valid forms: '
      f'{", ".join(repr(f) for f in SPEC_FORMATS)}.')



def load_split(config, split: str) -> Dataset:
  """The split of a dds_jax config's dataset (`config.data.*`)."""
  dc = config.data
  return load(dc.name, split, cache_dir=dc.cache_dir or None,
              class_names=tuple(dc.class_names) or None,
              data_dir=dc.data_dir or None)


def check_fits(config, ds: Dataset) -> None:
  """A ConfigError unless the dataset has the config's number of classes."""
  if ds.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'dataset {ds.name} has {ds.num_classes} classes but '
        f'model.num_classes={config.model.num_classes}')
