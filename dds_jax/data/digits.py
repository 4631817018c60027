"""scikit-learn's bundled 8x8 digits, a tiny dataset for tests and demos.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1797
grayscale 8x8 images of handwritten digits with integer pixel values 0..16.
Images are divided by 16 to float32 in [0, 1], shape (8, 8, 1). Classes are
'0'..'9' (label = digit).

Fixed train/test split (the original data has none): the example at original
index `i` (its position in `load_digits()`) is in

- 'test'  if `i % 5 == 0`: 360 examples (0, 5, 10, ..., 1795),
- 'train' otherwise: 1437 examples,

each in increasing original index, and its `example_id` is `i`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dds_jax import errors
from dds_jax.data import dataset as dataset_lib

SPLITS = ('train', 'test')
CLASS_NAMES = tuple(str(d) for d in range(10))
NUM_EXAMPLES = 1797
_TEST_EVERY = 5


def load(split: str,
         *,
         class_names: Sequence[str] | None = None) -> dataset_lib.Dataset:
  """Loads a split of the digits dataset.

  Args:
    split: 'train' or 'test' (see the module docstring).
    class_names: Optional; if given it must be ('0', ..., '9'): the labels of
      this dataset are fixed.

  Returns:
    The split as a `Dataset` named 'digits'.

  Raises:
    ConfigError: unknown split, or class names that do not match.
  """
  if split not in SPLITS:
    raise errors.ConfigError(
        f'Unknown split {split!r} for dataset digits; use one of {SPLITS}.')
  if class_names is not None and tuple(class_names) != CLASS_NAMES:
    raise errors.ConfigError(
        f'digits has the fixed classes {CLASS_NAMES}; got class_names='
        f'{tuple(class_names)}. Leave class_names unset for digits.')
  # Imported here: scikit-learn is slow to import and only this source uses it.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  bunch = datasets.load_digits()
  images = np.asarray(bunch.images)
  labels = np.asarray(bunch.target)
  all_ids = np.arange(images.shape[0], dtype=np.int64)
  is_test = all_ids % _TEST_EVERY == 0
  ids = all_ids[is_test] if split == 'test' else all_ids[~is_test]
  return dataset_lib.Dataset(
      images=(images[ids, :, :, None] / 16.0).astype(np.float32),
      labels=labels[ids].astype(np.int32),
      example_ids=ids,
      num_classes=len(CLASS_NAMES),
      class_names=CLASS_NAMES,
      name='digits',
      split=split)
