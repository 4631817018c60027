"""In-memory image classification dataset, Cohen's selection and batching.

Every source (`digits`, `imagefolder:`, `tfds:`) returns a `Dataset`: the whole
split decoded into host memory as NumPy arrays. The datasets used for certified
robustness (CIFAR-10 test: 10,000 images of 32x32x3) are small enough for this,
and it keeps evaluation exact and simple: no example is ever dropped, and every
example keeps its `example_id` (its position in the split's canonical order)
through `select`, `Dataset.take` and `iterate_batches`, so results can always
be joined back to the original examples.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import Any

import numpy as np

from dds_jax import errors


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """A decoded split of an image classification dataset.

  Attributes:
    images: float32 array [N, H, W, C] with values in [0, 1].
    labels: int32 array [N], in [0, num_classes).
    example_ids: int64 array [N]: the global id of each example, i.e. its
      position in the split's canonical order. Stable across runs and kept by
      `take`, `select` and `iterate_batches`.
    num_classes: Number of classes.
    class_names: Name of each class; `class_names[label]`.
    name: Name of the source, e.g. 'digits', 'imagefolder:cifar10-jpeg-q75',
      'tfds:mnist'.
    split: Name of the split, e.g. 'test'.
  """

  images: np.ndarray
  labels: np.ndarray
  example_ids: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  name: str
  split: str

  def __post_init__(self):
    if self.images.ndim != 4:
      raise errors.InputError(
          f'Dataset {self.name!r}: images must be NHWC (4 dims), got shape '
          f'{self.images.shape}.')
    n = self.images.shape[0]
    if self.images.dtype != np.float32:
      raise errors.InputError(
          f'Dataset {self.name!r}: images must be float32, got '
          f'{self.images.dtype}.')
    if self.labels.shape != (n,) or self.example_ids.shape != (n,):
      raise errors.InputError(
          f'Dataset {self.name!r}: labels {self.labels.shape} and example_ids '
          f'{self.example_ids.shape} must both have shape ({n},) to match '
          f'images {self.images.shape}.')
    if self.labels.dtype != np.int32 or self.example_ids.dtype != np.int64:
      raise errors.InputError(
          f'Dataset {self.name!r}: labels must be int32 and example_ids int64, '
          f'got {self.labels.dtype} and {self.example_ids.dtype}.')
    if len(self.class_names) != self.num_classes:
      raise errors.InputError(
          f'Dataset {self.name!r}: {len(self.class_names)} class names for '
          f'{self.num_classes} classes.')

  lazy = False  # see `dds_jax.data.records.LazyDataset`

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __repr__(self) -> str:
    return (f'Dataset(name={self.name!r}, split={self.split!r}, '
            f'num_examples={len(self)}, image_shape={self.image_shape}, '
            f'num_classes={self.num_classes})')

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Shape (H, W, C) of one image."""
    h, w, c = self.images.shape[1:]
    return (int(h), int(w), int(c))

  def take(self, indices: Any) -> Dataset:
    """Returns the examples at `indices` (positions in this dataset).

    Args:
      indices: Integer positions (anything `np.asarray` turns into an integer
        array, e.g. a list or a range) or a boolean mask of length `len(self)`.

    Returns:
      A new `Dataset` with those examples, in that order, keeping their
      `example_ids`.
    """
    idx = np.asarray(indices)
    if idx.dtype != np.bool_:
      idx = idx.astype(np.int64).reshape(-1)
    return dataclasses.replace(
        self,
        images=self.images[idx],
        labels=self.labels[idx],
        example_ids=self.example_ids[idx])

  def images_at(self, idx: np.ndarray) -> np.ndarray:
    """float32 [len(idx), H, W, C]: the images at positions idx (a copy)."""
    return self.images[np.asarray(idx, np.int64).reshape(-1)]

  def with_labels(self, labels, class_names) -> Dataset:
    """This dataset with other labels (and classes), e.g. training targets."""
    return dataclasses.replace(self, labels=np.asarray(labels, np.int32),
                               num_classes=len(class_names),
                               class_names=tuple(class_names))

  def with_split(self, split: str) -> Dataset:
    return dataclasses.replace(self, split=split)


def select(ds,
           skip: int = 1,
           max: int = -1) -> Dataset:  # pylint: disable=redefined-builtin
  """Selects examples exactly like Cohen et al.'s `certify.py`.

  Cohen et al. (2019) loop over the dataset as
  `for i in range(len(dataset)): if i % skip: continue; if i == max: break`,
  so they keep positions `i` with `i % skip == 0` and `i < max`: `max` is a
  position in the full dataset, not a number of examples. For example skip=20
  on the 10,000 CIFAR-10 test images keeps 500 examples (positions 0, 20, ...,
  9980), and skip=20, max=100 keeps positions 0, 20, 40, 60, 80.

  One difference: when `max` is not a multiple of `skip`, Cohen's loop skips
  position `max` before testing `i == max`, never breaks, and so ignores `max`
  entirely; here the selection still stops before position `max` (skip=20,
  max=50 keeps 0, 20, 40). For `max` = -1 or a multiple of `skip`, which
  covers the published runs, the two agree exactly.

  Args:
    ds: The dataset.
    skip: Keep every `skip`-th example, starting with the first. At least 1.
    max: Stop before position `max`; -1 keeps going to the end.

  Returns:
    The selected examples, keeping their original `example_ids`.

  Raises:
    ConfigError: `skip` < 1 or `max` < -1.
  """
  if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)):
    raise errors.ConfigError(f'skip must be an integer >= 1, got {skip!r}.')
  if isinstance(max, bool) or not isinstance(max, (int, np.integer)):
    raise errors.ConfigError(
        f'max must be an integer (-1 for no limit), got {max!r}.')
  if skip < 1:
    raise errors.ConfigError(
        f'skip must be >= 1 (1 keeps every example, 20 every 20th), got '
        f'{skip}.')
  if max < -1:
    raise errors.ConfigError(
        f'max must be -1 (no limit) or a position >= 0, got {max}.')
  stop = len(ds) if max == -1 else min(int(max), len(ds))
  return ds.take(np.arange(0, stop, int(skip), dtype=np.int64))


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(n) that is a pure function of (seed, epoch)."""
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [int(seed), int(epoch)])))
  return rng.permutation(n).astype(np.int64)


def iterate_batches(
    ds,
    batch_size: int,
    *,
    shuffle_key_seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    pad: bool = True,
    rows: slice | None = None,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields NumPy batches of a dataset, for one epoch.

  Each batch is a dict with 'images' [B, H, W, C] float32, 'labels' [B] int32,
  'example_ids' [B] int64 and 'mask' [B] bool (True for real examples).

  Without `drop_remainder`, every example appears in exactly one batch with
  mask True. With `pad` (the default) every batch has exactly `batch_size`
  rows, so jitted code sees one shape: the last batch is filled up with zero
  images, label 0, example id -1 and mask False. Evaluation must ignore rows
  with mask False; it never loses an example.

  Args:
    ds: The dataset.
    batch_size: Rows per batch, at least 1.
    shuffle_key_seed: If None, examples come in dataset order. Otherwise they
      come in a random order that is a pure function of (shuffle_key_seed,
      epoch): the same for the same pair, different across epochs.
    epoch: Epoch number, mixed into the shuffle. Ignored without a seed.
    drop_remainder: Drop the last batch if it is not full (for training). Takes
      precedence over `pad`.
    pad: Pad the last batch up to `batch_size` (with mask False) instead of
      yielding a smaller one.
    rows: Only these rows of every batch (after padding), e.g. one process's
      share of a global batch in a multi-host job: only they are read.
    start_batch: Start with this batch of the epoch (a resume); the batches
      before it are not read.

  Yields:
    Batches as dicts of NumPy arrays.

  Raises:
    ConfigError: `batch_size` < 1, or a negative seed or epoch.
  """
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, (int, np.integer)) or batch_size < 1:
    raise errors.ConfigError(
        f'batch_size must be an integer >= 1, got {batch_size!r}.')
  n = len(ds)
  if shuffle_key_seed is None:
    order = None
  else:
    if shuffle_key_seed < 0 or epoch < 0:
      raise errors.ConfigError(
          f'shuffle_key_seed and epoch must be >= 0, got {shuffle_key_seed} '
          f'and {epoch}.')
    order = _permutation(n, shuffle_key_seed, epoch)

  for start in range(int(start_batch) * batch_size, n, batch_size):
    stop = min(start + batch_size, n)
    size = stop - start
    if size < batch_size and drop_remainder:
      return
    idx = np.arange(start, stop) if order is None else order[start:stop]
    mask = np.ones((size,), dtype=np.bool_)
    if size < batch_size and pad:
      idx = np.concatenate([idx, np.full(batch_size - size, -1)])
      mask = np.concatenate([mask, np.zeros(batch_size - size, np.bool_)])
    if rows is not None:
      idx, mask = idx[rows], mask[rows]
    yield _read(ds, idx, mask)


def _read(ds, idx: np.ndarray,
          mask: np.ndarray) -> dict[str, np.ndarray]:
  """The batch of examples at positions idx; rows with mask False are blank:
  zero image, label 0, example id -1."""
  real = np.where(mask, idx, 0)
  batch = {
      'images': ds.images_at(real),
      'labels': ds.labels[real],
      'example_ids': ds.example_ids[real],
      'mask': mask.copy(),
  }
  if not mask.all():
    batch['images'][~mask] = 0
    batch['labels'][~mask] = 0
    batch['example_ids'][~mask] = -1
  return batch
