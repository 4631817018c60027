"""Lazy datasets: one record decoded at a time, for data too big for RAM.

`dds_jax.data.Dataset` holds a whole split decoded as float32: fine for digits
and CIFAR-10, impossible for ImageNet (about 770 GB to train, 30 GB for the
500 validation images Cohen et al. certify, on every host). A `LazyDataset`
has the same interface (`len`, `take`, `select`, `labels`, `example_ids`,
`image_shape`, `images`) but holds only the positions of its examples in a
random-access *record source*; images are decoded when they are read:

  * `images_at(positions)` / `images` decode just those examples (a
    certification call's few examples, one evaluation batch);
  * `dds_jax.data.pipeline` streams training batches through grain.

So `select(ds, skip=100)` on ImageNet's validation split decodes nothing, and
certification then decodes only the 500 selected images, a few at a time.

Record sources (grain's random-access protocol: `len` and `[i]`):

  * `ImageFolderRecords`: an ImageFolder directory or zip archive
    (`dds_jax.data.imagefolder` layout, order and labels), one file decoded
    per record;
  * `TfdsRecords`: a TFDS split prepared in array_record format
    (`tfds.data_source`);
  * `ArrayRecords`: arrays already in memory (digits; an ImageFolder split
    decoded once as uint8 with `data.in_ram`, for small images).

Preprocessing (`Preprocess`): 'none' keeps the stored size (every image of the
split must have it); 'imagenet' is Cohen et al.'s: for evaluation, resize the
shorter side to `resize` (256) and take the central `size` x `size` (224)
crop; for training, a random-resized crop (scale [0.08, 1], aspect ratio
[3/4, 4/3], as torchvision's `RandomResizedCrop`) to `size` x `size`. The
random crop is a pure function of (seed, epoch, example id), so a resumed or
re-sharded run crops every example exactly as an uninterrupted one. The
horizontal flip stays on the device (`train.flip`), as for every dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from dds_jax import errors
from dds_jax.data import imagefolder
from dds_jax.data import tfds_source

PREPROCESS_KINDS = ('none', 'imagenet')
# Random-resized crop (torchvision's defaults, used by Cohen et al.).
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10
# Mixed into the crop's random stream, apart from the noise's keys.
_CROP_STREAM = 0x43524F50


# ------------------------------------------------------------ preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How a decoded image becomes a model input (see the module docstring).

  Attributes:
    kind: 'none' or 'imagenet'.
    size: 'imagenet': the side of the square crop.
    resize: 'imagenet', evaluation: the shorter side before the center crop.
  """

  kind: str = 'none'
  size: int = 224
  resize: int = 256

  def __post_init__(self):
    if self.kind not in PREPROCESS_KINDS:
      raise errors.ConfigError(
          f'data.preprocess={self.kind!r}; use one of {PREPROCESS_KINDS}.')
    if self.kind == 'imagenet' and not 0 < self.size <= self.resize:
      raise errors.ConfigError(
          f'data.image_size={self.size} must be in (0, data.resize='
          f'{self.resize}].')

  def output_shape(self, channels: int) -> tuple[int, int, int] | None:
    """(H, W, C) of every output, or None when it is the stored size."""
    if self.kind == 'none':
      return None
    return (self.size, self.size, channels)

  def evaluate(self, image: np.ndarray) -> np.ndarray:
    """The evaluation input: resize + center crop ('imagenet') or as is."""
    if self.kind == 'none':
      return image
    h, w = image.shape[:2]
    scale = self.resize / min(h, w)
    nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
    image = _resize(image, nh, nw)
    top, left = (nh - self.size) // 2, (nw - self.size) // 2
    return image[top:top + self.size, left:left + self.size]

  def train(self, image: np.ndarray, seed: int, epoch: int,
            example_id: int) -> np.ndarray:
    """The training input: a random-resized crop ('imagenet') or as is."""
    if self.kind == 'none':
      return image
    rng = np.random.default_rng(
        [_CROP_STREAM, int(seed), int(epoch), int(example_id)])
    top, left, ch, cw = random_resized_crop_box(image.shape[0], image.shape[1],
                                                rng)
    return _resize(image[top:top + ch, left:left + cw], self.size, self.size)


def random_resized_crop_box(h: int, w: int,
                            rng: np.random.Generator) -> tuple[int, int, int,
                                                               int]:
  """(top, left, height, width) of torchvision's RandomResizedCrop box."""
  area = h * w
  log_ratio = (math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
  for _ in range(_RRC_TRIES):
    target = area * rng.uniform(*_RRC_SCALE)
    ratio = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * ratio)))
    ch = int(round(math.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return top, left, ch, cw
  # Fallback: the central crop at the nearest allowed aspect ratio.
  in_ratio = w / h
  if in_ratio < _RRC_RATIO[0]:
    cw, ch = w, int(round(w / _RRC_RATIO[0]))
  elif in_ratio > _RRC_RATIO[1]:
    ch, cw = h, int(round(h * _RRC_RATIO[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize of a uint8 [H, W, C] image to [h, w, C]."""
  if image.shape[:2] == (h, w):
    return image
  if image.dtype != np.uint8:
    raise errors.ConfigError(
        "data.preprocess='imagenet' resizes uint8 images; this source holds "
        f'{image.dtype} images. Use data.preprocess=none.')
  channels = image.shape[2]
  pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
  out = np.asarray(pil.resize((w, h), Image.BILINEAR), dtype=np.uint8)
  return out[:, :, None] if out.ndim == 2 else out


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1] (as the in-memory sources do); float as is."""
  if image.dtype == np.uint8:
    return np.divide(image, np.float32(255.0), dtype=np.float32)
  return np.asarray(image, np.float32)


# ------------------------------------------------------------------ sources


class ImageFolderRecords:
  """An ImageFolder split, one file decoded per record.

  Listing the split reads only the directory or the zip's central directory.
  Each thread opens its own handle on the archive, so grain's reader threads
  never share one.
  """

  def __init__(self, path: str, split: str,
               class_names: Sequence[str] | None = None):
    self.path = os.path.expanduser(path)
    if class_names is not None:
      class_names = imagefolder._check_class_names(class_names)  # pylint: disable=protected-access
    with imagefolder._open_source(self.path) as source:  # pylint: disable=protected-access
      self.listing = imagefolder._list_split(source, self.path, split,  # pylint: disable=protected-access
                                             class_names)
    self.split = split
    self.name = f'imagefolder:{imagefolder._archive_name(self.path)}'  # pylint: disable=protected-access
    self.class_names = self.listing.class_names
    self.labels = self.listing.labels
    self._local = threading.local()

  def __len__(self) -> int:
    return len(self.listing.entries)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_local']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def _source(self):
    source = getattr(self._local, 'source', None)
    if source is None:
      source = imagefolder._open_source(self.path)  # pylint: disable=protected-access
      self._local.source = source
    return source

  def image(self, i: int) -> np.ndarray:
    """The decoded uint8 [H, W, 1 or 3] image of record i."""
    entry = self.listing.entries[i]
    try:
      data = self._source().read(entry)
    except OSError as e:
      raise errors.DataError(f'Cannot read {entry} in {self.path}: {e}.') from e
    return imagefolder._decode_image(data, f'{self.path}:{entry}')  # pylint: disable=protected-access

  def label(self, i: int) -> int:
    return int(self.labels[i])

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {'image': self.image(i), 'label': self.label(i),
            'example_id': int(i)}


class TfdsRecords:
  """A TFDS split in array_record format, through `tfds.data_source`.

  Labels are read from the records themselves (a label costs one record read),
  so they are read only for the examples asked for.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               class_names: Sequence[str] | None = None):
    if not name:
      raise errors.ConfigError(
          "Empty TFDS dataset name; use tfds:<name>, e.g. 'tfds:mnist'.")
    self._source = tfds_source.open_data_source(name, split, data_dir)
    label = self._source.dataset_info.features['label']
    self.class_names = tuple(str(n) for n in label.names)
    if class_names is not None and tuple(class_names) != self.class_names:
      raise errors.ConfigError(
          f'tfds:{name} has the classes {self.class_names}; got class_names='
          f'{tuple(class_names)}. Leave class_names unset for tfds datasets.')
    self.name = f'tfds:{name}'
    self.split = split
    self.labels = None  # not known without reading every record

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    example = self._source[int(i)]
    image = np.asarray(example['image'])
    if image.ndim == 2:
      image = image[:, :, None]
    label = int(np.asarray(example['label']))
    if not 0 <= label < len(self.class_names):
      raise errors.DataError(f'{self.name} split {self.split!r}: example {i} '
                             f'has label {label} outside [0, '
                             f'{len(self.class_names)}).')
    return {'image': image, 'label': label, 'example_id': int(i)}

  def image(self, i: int) -> np.ndarray:
    return self[i]['image']

  def label(self, i: int) -> int:
    return self[i]['label']


class ArrayRecords:
  """Images and labels already in memory (uint8 or float32), as records."""

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               class_names: Sequence[str], name: str, split: str,
               example_ids: np.ndarray | None = None):
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.class_names, self.name, self.split = tuple(class_names), name, split
    self.example_ids = (np.arange(len(self.labels), dtype=np.int64)
                        if example_ids is None else
                        np.asarray(example_ids, np.int64))

  @classmethod
  def of(cls, ds) -> ArrayRecords:
    """The records of an in-memory `Dataset` (record i = its row i)."""
    return cls(ds.images, ds.labels, ds.class_names, ds.name, ds.split,
               ds.example_ids)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def image(self, i: int) -> np.ndarray:
    return self.images[i]

  def label(self, i: int) -> int:
    return int(self.labels[i])

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {'image': self.image(i), 'label': self.label(i),
            'example_id': int(self.example_ids[i])}


# ------------------------------------------------------------- the dataset


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LazyDataset:
  """A `Dataset` whose images are decoded when read (module docstring).

  Attributes:
    source: The record source. Record i is the example with id i (its
      position in the split's canonical order), unless the source has its own
      `example_ids` array (`ArrayRecords`).
    positions: int64 [N]: the records of this dataset, in its order.
    preprocess: How records become model inputs.
    label_override: Labels to use instead of the records' (e.g. dual RS's
      sigma selector targets), or None.
    class_names_override: With label_override: the new class names.
  """

  source: Any
  positions: np.ndarray
  preprocess: Preprocess = Preprocess()
  label_override: np.ndarray | None = None
  class_names_override: tuple[str, ...] | None = None
  split_override: str | None = None

  lazy = True

  def __post_init__(self):
    pos = np.asarray(self.positions, np.int64).reshape(-1)
    if pos.size and (pos.min() < 0 or pos.max() >= len(self.source)):
      raise errors.InputError(
          f'{self.name}: positions outside [0, {len(self.source)}).')
    object.__setattr__(self, 'positions', pos)

  def __len__(self) -> int:
    return int(self.positions.size)

  def __repr__(self) -> str:
    return (f'LazyDataset(name={self.name!r}, split={self.split!r}, '
            f'num_examples={len(self)}, image_shape={self.image_shape}, '
            f'num_classes={self.num_classes})')

  @property
  def name(self) -> str:
    return self.source.name

  @property
  def split(self) -> str:
    return self.split_override or self.source.split

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.class_names_override or tuple(self.source.class_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def example_ids(self) -> np.ndarray:
    ids = getattr(self.source, 'example_ids', None)
    return self.positions if ids is None else ids[self.positions]

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """int32 [N]; from the listing where the source has one, else read."""
    if self.label_override is not None:
      return np.asarray(self.label_override, np.int32)
    if getattr(self.source, 'labels', None) is not None:
      return np.asarray(self.source.labels, np.int32)[self.positions]
    return np.array([self.source.label(int(i)) for i in self.positions],
                    np.int32)

  @functools.cached_property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model inputs (the first record's, for 'none')."""
    first = self.source.image(0 if not len(self) else int(self.positions[0]))
    shape = self.preprocess.output_shape(first.shape[2])
    return shape or tuple(int(d) for d in first.shape)

  def take(self, indices: Any) -> LazyDataset:
    """The examples at `indices` (positions in this dataset, or a mask)."""
    idx = np.asarray(indices)
    if idx.dtype != np.bool_:
      idx = idx.astype(np.int64).reshape(-1)
    labels = None if self.label_override is None else self.labels[idx]
    return self._derive(positions=self.positions[idx], label_override=labels)

  def with_labels(self, labels, class_names) -> LazyDataset:
    return self._derive(label_override=np.asarray(labels, np.int32),
                        class_names_override=tuple(class_names))

  def with_split(self, split: str) -> LazyDataset:
    return self._derive(split_override=split)

  def _derive(self, **changes) -> LazyDataset:
    """A copy with changes that keeps the known image shape (no re-read)."""
    out = dataclasses.replace(self, **changes)
    if 'image_shape' in self.__dict__:
      out.__dict__['image_shape'] = self.__dict__['image_shape']
    return out

  def example(self, i: int, *, train_seed: int | None = None,
              epoch: int = 0) -> dict[str, Any]:
    """Example i of this dataset as a float32 model input, label and id.

    train_seed: None for the evaluation transform; else the training one
    (random-resized crop keyed by (train_seed, epoch, example id)).
    """
    pos = int(self.positions[i])
    record = self.source[pos]
    image, example_id = record['image'], record['example_id']
    if train_seed is None:
      image = self.preprocess.evaluate(image)
    else:
      image = self.preprocess.train(image, train_seed, epoch, example_id)
    image = self._check_shape(image, example_id)
    label = (record['label'] if self.label_override is None
             else int(self.label_override[i]))
    return {'images': to_float(image), 'labels': np.int32(label),
            'example_ids': np.int64(example_id)}

  def read_batch(self, idx: np.ndarray, *, train_seed: int | None = None,
                 epoch: int = 0) -> dict[str, np.ndarray]:
    """`example` of every position in idx, stacked: images, labels, ids.

    Arrays in RAM without preprocessing are read in one fancy-index.
    """
    idx = np.asarray(idx, np.int64).reshape(-1)
    if (isinstance(self.source, ArrayRecords) and
        self.preprocess.kind == 'none'):
      pos = self.positions[idx]
      return {'images': to_float(self.source.images[pos]),
              'labels': self.labels[idx],
              'example_ids': self.source.example_ids[pos]}
    rows = [self.example(int(i), train_seed=train_seed, epoch=epoch)
            for i in idx]
    return {k: np.stack([r[k] for r in rows]) for k in
            ('images', 'labels', 'example_ids')}

  def _check_shape(self, image: np.ndarray, pos: int) -> np.ndarray:
    want = self.image_shape
    if image.shape[2] == 1 and want[2] == 3:
      image = np.repeat(image, 3, axis=2)
    if image.shape != want:
      raise errors.DataError(
          f'{self.name} split {self.split!r}: example {pos} has shape '
          f'{image.shape}, not {want} like the first one. Resize the images '
          "to one size, or set data.preprocess='imagenet' (resize and crop).")
    return image

  def images_at(self, idx: np.ndarray) -> np.ndarray:
    """float32 [len(idx), H, W, C]: the examples at positions idx, decoded."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    if not idx.size:
      return np.zeros((0,) + tuple(self.image_shape), np.float32)
    return self.read_batch(idx)['images']

  @property
  def images(self) -> np.ndarray:
    """All images of this dataset, decoded (take a few first)."""
    return self.images_at(np.arange(len(self)))


def load(spec: str, split: str, *, class_names=None, data_dir=None,
         preprocess: Preprocess = Preprocess(), in_memory=None,
         in_ram: bool = False, cache_dir: str | None = None,
         decode_processes: int = 1) -> LazyDataset:
  """A lazy split of 'imagefolder:<path>', 'tfds:<name>' or 'digits'.

  in_memory: for 'digits', the in-memory `Dataset` to wrap (it is tiny).
  in_ram: imagefolder: serve the records from the split decoded once into RAM
    as uint8 (the decode cache, `imagefolder.load_uint8`; a quarter of the
    float32 in-memory pipeline) instead of decoding each file when read:
    faster for small images (CIFAR-10). Every image must have one size.
  decode_processes: imagefolder with in_ram: processes decoding the split when
    it is not cached (`imagefolder.load_uint8`'s `processes`).
  """
  kind, _, rest = spec.partition(':')
  if kind == 'imagefolder' and in_ram:
    raw = imagefolder.load_uint8(rest, split, cache_dir=cache_dir,
                                 class_names=class_names,
                                 processes=decode_processes)
    source = ArrayRecords(raw.images, raw.labels, raw.class_names,
                          f'imagefolder:{imagefolder._archive_name(rest)}',  # pylint: disable=protected-access
                          split, raw.example_ids)
  elif kind == 'imagefolder':
    if not rest:
      raise errors.ConfigError(
          'Empty imagefolder path; use imagefolder:<directory or .zip file>.')
    source = ImageFolderRecords(rest, split, class_names)
  elif kind == 'tfds':
    source = TfdsRecords(rest, split, data_dir, class_names)
  elif in_memory is not None:
    source = ArrayRecords.of(in_memory)
  else:
    raise errors.ConfigError(f'No lazy reader for dataset {spec!r}.')
  return LazyDataset(source, np.arange(len(source), dtype=np.int64),
                     preprocess)
