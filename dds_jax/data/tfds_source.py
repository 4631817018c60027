"""Image classification datasets prepared with TensorFlow Datasets (TFDS).

Reads an already prepared dataset with `tfds.data_source` (random access to the
array_record files; TensorFlow is not needed to read). Nothing is downloaded:
prepare the dataset once on a machine with TensorFlow, e.g.

  pip install tensorflow-cpu
  tfds build mnist --file_format=array_record --data_dir=<data_dir>

If the dataset was prepared in the default tfrecord format instead, it can only
be read through TensorFlow: when TensorFlow is importable this falls back to
`tfds.load(..., batch_size=-1)`, otherwise it asks for an array_record build.

The dataset must have an 'image' feature (uint8 [H, W, C]) and a ClassLabel
'label' feature; `num_classes` and `class_names` come from the label feature.
`example_ids` are positions in the requested split (for a sliced split such as
'test[:1000]', positions in the slice).

`tensorflow_datasets` is imported only when a dataset is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib.util
import logging
import os
import time
from typing import Any

import numpy as np

from dds_jax import errors
from dds_jax.data import dataset as dataset_lib


def load(name: str,
         split: str,
         *,
         data_dir: str | None = None,
         class_names: Sequence[str] | None = None) -> dataset_lib.Dataset:
  """Loads a split of a prepared TFDS image classification dataset.

  Args:
    name: TFDS name, optionally with config and version as TFDS writes them,
      e.g. 'mnist', 'cifar10:3.0.2'.
    split: TFDS split, e.g. 'test' or 'train[:10%]'.
    data_dir: TFDS data directory; default `$TFDS_DATA_DIR`, else
      `~/tensorflow_datasets`.
    class_names: Optional; if given it must equal the dataset's class names
      (labels are fixed by the dataset).

  Returns:
    The split as a `Dataset` named 'tfds:<name>'.

  Raises:
    DataError: the dataset is not prepared in `data_dir` or cannot be read.
    ConfigError: unknown dataset, features that are not image + class label,
      or class names that do not match.
  """
  if not name:
    raise errors.ConfigError(
        "Empty TFDS dataset name; use tfds:<name>, e.g. 'tfds:mnist'.")
  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  images, labels, features = _read(tfds, name, split, data_dir)
  logging.info('Read %d examples of tfds:%s split %r in %.1f s.',
               images.shape[0], name, split, time.perf_counter() - start)

  label_feature = features['label']
  names = tuple(str(n) for n in label_feature.names)
  num_classes = int(label_feature.num_classes)
  if class_names is not None and tuple(class_names) != names:
    raise errors.ConfigError(
        f'tfds:{name} has the classes {names}; got class_names='
        f'{tuple(class_names)}. Leave class_names unset for tfds datasets.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.DataError(
        f'tfds:{name} split {split!r} has labels outside [0, {num_classes}).')
  return dataset_lib.Dataset(
      images=np.divide(images, np.float32(255.0), dtype=np.float32),
      labels=labels.astype(np.int32),
      example_ids=np.arange(images.shape[0], dtype=np.int64),
      num_classes=num_classes,
      class_names=names,
      name=f'tfds:{name}',
      split=split)


def _data_dir_for_message(data_dir: str | None) -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets')


def _tensorflow_available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _check_features(features: Any, name: str) -> None:
  keys = list(features.keys()) if hasattr(features, 'keys') else []
  label = features['label'] if 'label' in keys else None
  if ('image' not in keys or label is None or
      not hasattr(label, 'num_classes') or not hasattr(label, 'names')):
    raise errors.ConfigError(
        f'tfds:{name} is not an image classification dataset with features '
        f"'image' and a class label 'label'; its features are {keys}.")


def open_data_source(name: str, split: str, data_dir: str | None) -> Any:
  """`tfds.data_source` of a split prepared in array_record format.

  For lazy reading (`dds_jax.data.records`): a split without random access
  (tfrecord, or nothing prepared) is a DataError that says how to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
  source, error = _open(tfds, name, split, data_dir)
  if source is None:
    where = _data_dir_for_message(data_dir)
    raise errors.DataError(
        f'tfds:{name} split {split!r} in data_dir {where} has no random '
        f'access ({error}); reading it record by record needs an array_record '
        f'build:\n  tfds build {name} --file_format=array_record '
        f'--data_dir={where}') from error
  _check_features(source.dataset_info.features, name)
  return source


def _open(tfds: Any, name: str, split: str,
          data_dir: str | None) -> tuple[Any, Exception | None]:
  """(tfds.data_source, None), or (None, the error) without random access."""
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(
        name, split=split, download=False, data_dir=data_dir), None
  except registered.DatasetNotFoundError as e:
    raise errors.ConfigError(
        f'Unknown TFDS dataset {name!r}. Check the name in the TFDS catalog '
        '(https://www.tensorflow.org/datasets/catalog), e.g. tfds:mnist.'
    ) from e
  except NotImplementedError as e:
    # Raised when the files are not in a random access format: either nothing
    # is prepared (TFDS then assumes tfrecord) or a tfrecord build.
    return None, e
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.DataError(
        f'Cannot open tfds:{name} split {split!r} in data_dir '
        f'{_data_dir_for_message(data_dir)}: {type(e).__name__}: {e}') from e


def _read(tfds: Any, name: str, split: str,
          data_dir: str | None) -> tuple[np.ndarray, np.ndarray, Any]:
  """Returns (uint8 images NHWC, int labels, features) of a split."""
  source, error = _open(tfds, name, split, data_dir)
  if source is None:
    return _read_without_data_source(tfds, name, split, data_dir, error)

  features = source.dataset_info.features
  _check_features(features, name)
  n = len(source)
  images, labels = None, np.zeros((n,), dtype=np.int64)
  for i in range(n):
    # One at a time: `__getitems__` is not available on every data source
    # (e.g. not on the one `tfds.testing.mock_data` makes).
    example = source[i]
    image = np.asarray(example['image'])
    if image.ndim == 2:
      image = image[:, :, None]
    if images is None:
      images = np.empty((n,) + image.shape, dtype=np.uint8)
    if image.shape != images.shape[1:]:
      raise errors.DataError(
          f'tfds:{name} split {split!r} has images of different shapes '
          f'({images.shape[1:]} and {image.shape} at example {i}); only '
          'datasets with one image size are supported.')
    images[i] = image
    labels[i] = int(np.asarray(example['label']))
  if images is None:
    raise errors.DataError(f'tfds:{name} split {split!r} is empty.')
  return images, labels, features


def _read_without_data_source(tfds: Any, name: str, split: str,
                              data_dir: str | None,
                              error: Exception) -> tuple[np.ndarray, np.ndarray,
                                                         Any]:
  """Explains an unprepared dataset, or reads a tfrecord one with TensorFlow."""
  where = _data_dir_for_message(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
    version_dir = str(builder.data_dir)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.DataError(
        f'Cannot open tfds:{name} in data_dir {where}: {error}; inspecting it '
        f'failed too: {type(e).__name__}: {e}') from error
  if not prepared:
    raise errors.DataError(
        f'TFDS dataset {name!r} is not prepared in data_dir {where} (looked '
        f'for {version_dir}), and dds_jax never downloads. Prepare it once, '
        'on a machine with TensorFlow (`pip install tensorflow-cpu`):\n'
        f'  tfds build {name} --file_format=array_record --data_dir={where}\n'
        'then pass that data_dir (or set $TFDS_DATA_DIR).') from error
  if not _tensorflow_available():
    raise errors.DataError(
        f'TFDS dataset {name!r} in {version_dir} is prepared in a format '
        f'without random access ({error}). Reading it needs TensorFlow '
        '(`pip install tensorflow-cpu`), or rebuild it in the array_record '
        'format, which does not:\n'
        f'  tfds build {name} --file_format=array_record '
        '--data_dir=<another dir>') from error

  logging.info('tfds:%s is not in array_record format; reading it through '
               'TensorFlow.', name)
  try:
    tf_ds, info = tfds.load(
        name, split=split, download=False, data_dir=data_dir, batch_size=-1,
        with_info=True)
    arrays = tfds.as_numpy(tf_ds)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.DataError(
        f'Cannot read tfds:{name} split {split!r} from {version_dir} with '
        f'TensorFlow: {type(e).__name__}: {e}') from e
  _check_features(info.features, name)
  images = np.asarray(arrays['image'], dtype=np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise errors.DataError(
        f'tfds:{name} split {split!r}: expected images [N, H, W, C], got '
        f'shape {images.shape}.')
  return images, np.asarray(arrays['label']).astype(np.int64), info.features
