"""Tests for dds_jax.data."""

from __future__ import annotations

import hashlib
import os
import re
import types
import zipfile

import numpy as np
from PIL import Image
import pytest

from dds_jax import data
from dds_jax import errors
from dds_jax.data import dataset as dataset_lib
from dds_jax.data import imagefolder

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CIFAR_ZIP = os.path.join(_REPO_ROOT, '..', 'shared', 'data', 'cifar10',
                          'cifar10-jpeg-q75.zip')
_CIFAR_TEST_IMAGES_SHA256 = (
    'b7018a062865e9348a704e72416eb53c816b43cc8ac42ab43276a2b967508ab6')
_CIFAR_TEST_LABELS_SHA256 = (
    'cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5')
_CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                  'frog', 'horse', 'ship', 'truck')


def _toy_dataset(n: int = 10) -> data.Dataset:
  return data.Dataset(
      images=np.arange(n * 2 * 2 * 1, dtype=np.float32).reshape(n, 2, 2, 1) /
      (4 * n),
      labels=(np.arange(n) % 3).astype(np.int32),
      example_ids=np.arange(100, 100 + n, dtype=np.int64),
      num_classes=3,
      class_names=('a', 'b', 'c'),
      name='toy',
      split='test')


# ------------------------------------------------------------------- digits


def test_digits_splits():
  train = data.load('digits', 'train')
  test = data.load('digits', 'test')
  assert (len(train), len(test)) == (1437, 360)
  for ds in (train, test):
    assert ds.images.dtype == np.float32
    assert ds.images.shape[1:] == (8, 8, 1) == ds.image_shape
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.labels.dtype == np.int32 and ds.example_ids.dtype == np.int64
    assert set(np.unique(ds.labels)) == set(range(10))
    assert ds.num_classes == 10
    assert ds.class_names == tuple('0123456789')
    assert ds.name == 'digits'
  assert ds.images.max() == 1.0
  np.testing.assert_array_equal(test.example_ids, np.arange(0, 1797, 5))
  all_ids = np.concatenate([train.example_ids, test.example_ids])
  assert len(np.unique(all_ids)) == 1797
  np.testing.assert_array_equal(np.sort(all_ids), np.arange(1797))
  assert np.all(train.example_ids % 5 != 0)


def test_digits_bad_split_and_class_names():
  with pytest.raises(errors.ConfigError, match='train'):
    data.load('digits', 'validation')
  with pytest.raises(errors.ConfigError, match='class_names'):
    data.load('digits', 'test', class_names=['a'] * 10)


def test_unknown_spec_lists_valid_ones():
  for spec in ('mnist', 'foo:bar', 'digits:x', 'imagefolder'):
    with pytest.raises(errors.ConfigError, match='imagefolder:') as e:
      data.load(spec, 'test')
    assert 'tfds:' in str(e.value) and 'digits' in str(e.value)


# ------------------------------------------------------------------ Dataset


def test_dataset_take_and_repr():
  ds = _toy_dataset()
  sub = ds.take([3, 1])
  np.testing.assert_array_equal(sub.example_ids, [103, 101])
  np.testing.assert_array_equal(sub.labels, ds.labels[[3, 1]])
  np.testing.assert_array_equal(sub.images, ds.images[[3, 1]])
  assert (len(sub), sub.num_classes, sub.name, sub.split) == (2, 3, 'toy',
                                                              'test')
  assert len(ds.take(np.arange(10) % 2 == 0)) == 5
  assert 'num_examples=10' in repr(ds)


def test_dataset_rejects_inconsistent_arrays():
  ds = _toy_dataset()
  with pytest.raises(errors.InputError):
    dataset_lib.Dataset(ds.images, ds.labels[:3], ds.example_ids, 3,
                        ds.class_names, 'x', 'test')
  with pytest.raises(errors.InputError):
    dataset_lib.Dataset(ds.images.astype(np.float64), ds.labels,
                        ds.example_ids, 3, ds.class_names, 'x', 'test')


# ------------------------------------------------------------------- select


def test_select_cohen_semantics():
  ds = _toy_dataset(100)
  np.testing.assert_array_equal(data.select(ds).example_ids, ds.example_ids)
  np.testing.assert_array_equal(
      data.select(ds, skip=20).example_ids, 100 + np.arange(0, 100, 20))
  # max is a position in the full dataset (Cohen's `if i == max: break`), not
  # a number of selected examples.
  np.testing.assert_array_equal(
      data.select(ds, skip=20, max=41).example_ids, [100, 120, 140])
  np.testing.assert_array_equal(
      data.select(ds, skip=20, max=40).example_ids, [100, 120])
  np.testing.assert_array_equal(
      data.select(ds, skip=1, max=3).example_ids, [100, 101, 102])
  assert len(data.select(ds, skip=7, max=0)) == 0
  assert len(data.select(ds, skip=1, max=1000)) == 100
  # Composes with the examples' original ids.
  again = data.select(data.select(ds, skip=2), skip=3)
  np.testing.assert_array_equal(again.example_ids, 100 + np.arange(0, 100, 6))


def _cohen_certify_loop(n, skip, max_):
  """The selection loop of Cohen et al.'s certify.py, verbatim."""
  selected = []
  for i in range(n):
    if i % skip != 0:
      continue
    if i == max_:
      break
    selected.append(i)
  return selected


def test_select_matches_cohen_loop():
  ds = _toy_dataset(57)
  for skip in (1, 2, 5, 19, 20, 100):
    for max_ in (-1, 0, 1, 13, 38, 40, 56, 57, 60, 200):
      got = data.select(ds, skip, max_).example_ids - 100
      if max_ < 0 or max_ % skip == 0 or max_ >= 57:
        np.testing.assert_array_equal(
            got, _cohen_certify_loop(57, skip, max_))
      # Documented difference: Cohen's loop never reaches `i == max` when max
      # is not a multiple of skip, and so ignores max; select stops there.
      np.testing.assert_array_equal(
          got,
          [i for i in range(57) if i % skip == 0 and (max_ < 0 or i < max_)])


def test_select_bad_arguments():
  ds = _toy_dataset()
  for skip in (0, -1, 1.5, True):
    with pytest.raises(errors.ConfigError, match='skip'):
      data.select(ds, skip=skip)
  with pytest.raises(errors.ConfigError, match='max'):
    data.select(ds, skip=1, max=-2)


# ---------------------------------------------------------- iterate_batches


@pytest.mark.parametrize('n,batch_size', [(10, 3), (10, 5), (10, 16), (1, 1)])
def test_iterate_batches_pads_and_covers_every_example(n, batch_size):
  ds = _toy_dataset(n)
  batches = list(data.iterate_batches(ds, batch_size))
  assert len(batches) == -(-n // batch_size)
  for b in batches:
    assert b['images'].shape == (batch_size, 2, 2, 1)
    assert b['images'].dtype == np.float32
    assert b['labels'].shape == b['example_ids'].shape == b['mask'].shape
    assert b['labels'].dtype == np.int32
    assert b['example_ids'].dtype == np.int64 and b['mask'].dtype == bool
    assert np.all(b['example_ids'][~b['mask']] == -1)
    assert np.all(b['images'][~b['mask']] == 0)
  ids = np.concatenate([b['example_ids'][b['mask']] for b in batches])
  np.testing.assert_array_equal(ids, ds.example_ids)  # In order, once each.
  labels = np.concatenate([b['labels'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, ds.labels)
  assert sum(b['mask'].sum() for b in batches) == n


def test_iterate_batches_without_pad_or_with_drop_remainder():
  ds = _toy_dataset(10)
  sizes = [len(b['labels']) for b in data.iterate_batches(ds, 4, pad=False)]
  assert sizes == [4, 4, 2]
  batches = list(data.iterate_batches(ds, 4, drop_remainder=True))
  assert [len(b['labels']) for b in batches] == [4, 4]
  assert all(b['mask'].all() for b in batches)
  with pytest.raises(errors.ConfigError, match='batch_size'):
    list(data.iterate_batches(ds, 0))


def test_iterate_batches_shuffle_is_a_function_of_seed_and_epoch():
  ds = _toy_dataset(50)

  def order(seed, epoch, batch_size=8):
    batches = data.iterate_batches(
        ds, batch_size, shuffle_key_seed=seed, epoch=epoch)
    return np.concatenate([b['example_ids'][b['mask']] for b in batches])

  first = order(0, 0)
  np.testing.assert_array_equal(np.sort(first), ds.example_ids)
  assert not np.array_equal(first, ds.example_ids)
  np.testing.assert_array_equal(order(0, 0), first)
  np.testing.assert_array_equal(order(0, 0, batch_size=7), first)
  assert not np.array_equal(order(0, 1), first)
  assert not np.array_equal(order(1, 0), first)
  # Images and labels follow their example ids.
  for b in data.iterate_batches(ds, 8, shuffle_key_seed=3, epoch=2):
    pos = b['example_ids'][b['mask']] - 100
    np.testing.assert_array_equal(b['images'][b['mask']], ds.images[pos])
    np.testing.assert_array_equal(b['labels'][b['mask']], ds.labels[pos])


# -------------------------------------------------------------- imagefolder


def _random_image(rng, size=(6, 5), mode='RGB'):
  w, h = size
  if mode == 'L':
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), 'L')
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                         'RGB')


# (split, class, file name): file names interleave the classes, as CIFAR's do.
_LAYOUT = [
    ('test', 'dog', '0000.png'),
    ('test', 'cat', '0001.png'),
    ('test', 'dog', '0002.png'),
    ('test', 'bird', '0003.png'),
    ('test', 'cat', '0004.png'),
    ('train', 'cat', '0000.png'),
    ('train', 'bird', '0001.png'),
]


def _write_tree(root, prefix='', layout=_LAYOUT, seed=0):
  """Writes PNGs; returns {(split, class, file): uint8 array}."""
  rng = np.random.default_rng(seed)
  pixels = {}
  for split, cls, fname in layout:
    img = _random_image(rng)
    folder = os.path.join(root, prefix, split, cls)
    os.makedirs(folder, exist_ok=True)
    img.save(os.path.join(folder, fname))
    pixels[(split, cls, fname)] = np.asarray(img)
  return pixels


def _zip_tree(root, zip_path):
  with zipfile.ZipFile(zip_path, 'w') as zf:
    for dirpath, _, filenames in os.walk(root):
      for f in filenames:
        full = os.path.join(dirpath, f)
        zf.write(full, os.path.relpath(full, root).replace(os.sep, '/'))
  return zip_path


def _check_toy_test_split(raw_or_ds, pixels, class_names):
  expected_order = sorted(
      (k for k in pixels if k[0] == 'test'), key=lambda k: (k[2], k[1]))
  assert tuple(raw_or_ds.class_names) == class_names
  np.testing.assert_array_equal(raw_or_ds.example_ids, np.arange(5))
  np.testing.assert_array_equal(
      raw_or_ds.labels, [class_names.index(k[1]) for k in expected_order])
  expected = np.stack([pixels[k] for k in expected_order])
  if raw_or_ds.images.dtype == np.uint8:
    np.testing.assert_array_equal(raw_or_ds.images, expected)
  else:
    np.testing.assert_array_equal(raw_or_ds.images,
                                  expected.astype(np.float32) / 255)


@pytest.mark.parametrize('as_zip', [False, True])
@pytest.mark.parametrize('prefix', ['', 'toy'])
def test_imagefolder_dir_and_zip(tmp_path, as_zip, prefix):
  pixels = _write_tree(tmp_path / 'tree', prefix)
  path = str(tmp_path / 'tree')
  if as_zip:
    path = _zip_tree(path, str(tmp_path / 'toy-set.zip'))
  cache = str(tmp_path / 'cache')
  ds = data.load(f'imagefolder:{path}', 'test', cache_dir=cache)
  assert ds.name == ('imagefolder:toy-set' if as_zip else 'imagefolder:tree')
  assert ds.split == 'test'
  assert ds.images.dtype == np.float32 and ds.image_shape == (5, 6, 3)
  assert ds.num_classes == 3
  _check_toy_test_split(ds, pixels, ('bird', 'cat', 'dog'))
  raw = data.load_imagefolder_uint8(path, 'test', cache_dir=cache)
  _check_toy_test_split(raw, pixels, ('bird', 'cat', 'dog'))
  assert raw.files == ('dog/0000.png', 'cat/0001.png', 'dog/0002.png',
                       'bird/0003.png', 'cat/0004.png')
  # Classes come from each split's own folders (train has no dog folder); pass
  # class_names to get the same labels in every split.
  train = data.load(f'imagefolder:{path}', 'train', cache_dir=cache)
  assert train.class_names == ('bird', 'cat')
  np.testing.assert_array_equal(train.labels, [1, 0])


def test_imagefolder_explicit_class_names(tmp_path):
  pixels = _write_tree(tmp_path)
  names = ('dog', 'zebra', 'cat', 'bird')
  cache = str(tmp_path / 'cache')
  ds = data.load(
      f'imagefolder:{tmp_path}', 'test', cache_dir=cache, class_names=names)
  assert ds.num_classes == 4
  _check_toy_test_split(ds, pixels, names)
  train = data.load(
      f'imagefolder:{tmp_path}', 'train', cache_dir=cache, class_names=names)
  np.testing.assert_array_equal(train.labels, [2, 3])
  with pytest.raises(errors.ConfigError, match='dog'):
    data.load(f'imagefolder:{tmp_path}', 'test', cache_dir=cache,
              class_names=['cat', 'bird'])
  with pytest.raises(errors.ConfigError, match='duplicates'):
    data.load(f'imagefolder:{tmp_path}', 'test', cache_dir=cache,
              class_names=['cat', 'cat', 'dog', 'bird'])


@pytest.mark.parametrize('as_zip', [False, True])
def test_imagefolder_cache_hit_does_not_decode(tmp_path, monkeypatch, as_zip):
  pixels = _write_tree(tmp_path / 'tree')
  path = str(tmp_path / 'tree')
  if as_zip:
    path = _zip_tree(path, str(tmp_path / 'toy.zip'))
  cache = tmp_path / 'cache'
  first = data.load(f'imagefolder:{path}', 'test', cache_dir=str(cache))
  cache_files = sorted(os.listdir(cache))
  assert len(cache_files) == 1 and cache_files[0].endswith('.npz')
  with np.load(cache / cache_files[0], allow_pickle=False) as z:
    assert z['images'].dtype == np.uint8

  def fail(*args, **kwargs):
    raise AssertionError('decoded although the split is cached')

  monkeypatch.setattr(imagefolder, '_decode_image', fail)
  second = data.load(f'imagefolder:{path}', 'test', cache_dir=str(cache))
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  np.testing.assert_array_equal(second.example_ids, first.example_ids)
  assert second.class_names == first.class_names
  _check_toy_test_split(second, pixels, ('bird', 'cat', 'dog'))
  # Another class list is another cache entry.
  with pytest.raises(AssertionError, match='decoded'):
    data.load(f'imagefolder:{path}', 'test', cache_dir=str(cache),
              class_names=['bird', 'cat', 'dog', 'emu'])
  monkeypatch.undo()
  # A corrupted cache file is ignored and rewritten.
  (cache / cache_files[0]).write_bytes(b'not a zip')
  third = data.load(f'imagefolder:{path}', 'test', cache_dir=str(cache))
  np.testing.assert_array_equal(third.images, first.images)
  assert not [f for f in os.listdir(cache) if f.startswith('.tmp')]


def test_imagefolder_cache_dir_from_env(tmp_path, monkeypatch):
  _write_tree(tmp_path / 'tree')
  monkeypatch.setenv('DDS_JAX_CACHE', str(tmp_path / 'envcache'))
  assert data.default_cache_dir() == str(tmp_path / 'envcache')
  data.load(f'imagefolder:{tmp_path / "tree"}', 'test')
  assert len(os.listdir(tmp_path / 'envcache')) == 1


def test_imagefolder_changed_dir_is_decoded_again(tmp_path):
  _write_tree(tmp_path / 'tree')
  cache = str(tmp_path / 'cache')
  first = data.load(f'imagefolder:{tmp_path / "tree"}', 'test', cache_dir=cache)
  Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(
      tmp_path / 'tree' / 'test' / 'bird' / '0005.png')
  second = data.load(
      f'imagefolder:{tmp_path / "tree"}', 'test', cache_dir=cache)
  assert (len(first), len(second)) == (5, 6)


def test_imagefolder_grayscale_and_palette(tmp_path):
  rng = np.random.default_rng(1)
  gray_dir = tmp_path / 'gray' / 'test' / 'a'
  gray_dir.mkdir(parents=True)
  gray = [_random_image(rng, mode='L') for _ in range(2)]
  for i, img in enumerate(gray):
    img.save(gray_dir / f'{i}.png')
  ds = data.load(f'imagefolder:{tmp_path / "gray"}', 'test',
                 cache_dir=str(tmp_path / 'cache'))
  assert ds.image_shape == (5, 6, 1)
  np.testing.assert_array_equal(
      ds.images[..., 0],
      np.stack([np.asarray(g) for g in gray]) / np.float32(255))
  # Mixed grayscale + palette: everything becomes RGB.
  rgb = _random_image(rng).convert('P')
  rgb.save(gray_dir / '9.png')
  raw = data.load_imagefolder_uint8(
      str(tmp_path / 'gray'), 'test', cache_dir=str(tmp_path / 'cache'))
  assert raw.images.shape == (3, 5, 6, 3)
  np.testing.assert_array_equal(raw.images[0],
                                np.repeat(np.asarray(gray[0])[..., None], 3, 2))
  np.testing.assert_array_equal(raw.images[2], np.asarray(rgb.convert('RGB')))


def test_imagefolder_ignores_hidden_and_non_image_files(tmp_path):
  _write_tree(tmp_path)
  (tmp_path / 'test' / 'cat' / 'notes.txt').write_text('hello')
  (tmp_path / 'test' / 'cat' / '.DS_Store').write_bytes(b'\0')
  (tmp_path / 'test' / 'README.md').write_text('hello')
  os.makedirs(tmp_path / 'test' / '.hidden')
  Image.fromarray(np.zeros((1, 1), np.uint8)).save(
      tmp_path / 'test' / '.hidden' / 'x.png')
  ds = data.load(f'imagefolder:{tmp_path}', 'test',
                 cache_dir=str(tmp_path / 'cache'))
  assert len(ds) == 5 and ds.class_names == ('bird', 'cat', 'dog')


def test_imagefolder_mixed_sizes(tmp_path):
  _write_tree(tmp_path / 'tree')
  Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(
      tmp_path / 'tree' / 'test' / 'cat' / '0009.png')
  with pytest.raises(errors.DataError, match='same size'):
    data.load(f'imagefolder:{tmp_path / "tree"}', 'test',
              cache_dir=str(tmp_path / 'cache'))


def test_imagefolder_unreadable_image(tmp_path):
  _write_tree(tmp_path / 'tree')
  (tmp_path / 'tree' / 'test' / 'cat' / '0009.jpg').write_bytes(b'garbage')
  with pytest.raises(errors.DataError, match='0009.jpg'):
    data.load(f'imagefolder:{tmp_path / "tree"}', 'test',
              cache_dir=str(tmp_path / 'cache'))


def _mixed_zip(tmp_path, n=9, garbage=None):
  """A zip of n JPEG/PNG images in 3 classes (one grayscale); returns its path."""
  rng = np.random.default_rng(3)
  root = tmp_path / 'mixed'
  for i in range(n):
    folder = root / 'train' / ('cat', 'dog', 'emu')[i % 3]
    folder.mkdir(parents=True, exist_ok=True)
    img = _random_image(rng, mode='L' if i == 4 else 'RGB')
    img.save(folder / f'{i:04d}.{"jpg" if i % 2 else "png"}')
  if garbage:
    (root / 'train' / 'dog' / garbage).write_bytes(b'garbage')
  return _zip_tree(str(root), str(tmp_path / 'mixed.zip'))


def _force_parallel(monkeypatch, images_per_task):
  monkeypatch.setattr(imagefolder, '_PARALLEL_MIN_IMAGES', 0)
  monkeypatch.setattr(imagefolder, '_IMAGES_PER_TASK', images_per_task)


def test_imagefolder_parallel_decode_matches_serial(tmp_path, monkeypatch,
                                                    caplog):
  path = _mixed_zip(tmp_path)
  caplog.set_level('INFO')
  # Below _PARALLEL_MIN_IMAGES, processes > 1 still decodes serially.
  serial = data.load_imagefolder_uint8(
      path, 'train', cache_dir=str(tmp_path / 'c1'), processes=2)
  assert 'with 1 process.' in caplog.text
  _force_parallel(monkeypatch, images_per_task=2)  # 5 tasks, 2 processes
  caplog.clear()
  parallel = data.load_imagefolder_uint8(
      path, 'train', cache_dir=str(tmp_path / 'c2'), processes=2)
  assert 'with 2 processes.' in caplog.text
  assert serial.images.shape == (9, 5, 6, 3)
  assert parallel.images.dtype == np.uint8
  np.testing.assert_array_equal(parallel.images, serial.images)
  assert parallel.images.tobytes() == serial.images.tobytes()
  np.testing.assert_array_equal(parallel.labels, serial.labels)
  np.testing.assert_array_equal(parallel.example_ids, serial.example_ids)
  assert parallel.files == serial.files
  assert parallel.class_names == serial.class_names
  # Both cache files hold the same arrays (the key does not include processes).
  assert os.listdir(tmp_path / 'c1') == os.listdir(tmp_path / 'c2')


def test_imagefolder_parallel_decode_names_a_corrupt_image(tmp_path,
                                                          monkeypatch):
  path = _mixed_zip(tmp_path, garbage='0005.jpg')
  cache = str(tmp_path / 'cache')
  with pytest.raises(errors.DataError, match='0005.jpg') as serial:
    data.load_imagefolder_uint8(path, 'train', cache_dir=cache, processes=1)
  _force_parallel(monkeypatch, images_per_task=5)  # 2 tasks, 2 processes
  with pytest.raises(errors.DataError, match='0005.jpg') as parallel:
    data.load_imagefolder_uint8(path, 'train', cache_dir=cache, processes=2)
  assert type(parallel.value) is errors.DataError
  # The same message, but for the address of the BytesIO Pillow names.
  def unaddressed(e):
    return re.sub(r' at 0x[0-9a-f]+', '', str(e.value))
  assert unaddressed(parallel) == unaddressed(serial)
  assert f'{path}:train/dog/0005.jpg' in str(parallel.value)
  assert not os.path.exists(cache)


def test_decode_processes_config_and_pass_through(tmp_path, monkeypatch):
  from dds_jax.configs import common
  from dds_jax.configs import digits as digits_config
  c = digits_config.get_config('small')
  assert c.data.decode_processes == 1
  for ok in (0, 1, 16):
    c.data.decode_processes = ok
    common.validate(c)
  c.data.decode_processes = -1
  with pytest.raises(errors.ConfigError,
                     match=r'^data.decode_processes must be >= 0 .*got -1$'):
    common.validate(c)
  with pytest.raises(errors.ConfigError, match='processes=-1'):
    data.load_imagefolder_uint8('x.zip', 'test', processes=-1)
  assert imagefolder.resolve_processes(0) == len(os.sched_getaffinity(0))
  assert imagefolder.resolve_processes(3) == 3
  # load_split hands data.decode_processes to the decoder, in both pipelines.
  _write_tree(tmp_path / 'tree')
  seen = []
  load_uint8 = imagefolder.load_uint8

  def spy(*args, processes=1, **kwargs):
    seen.append(processes)
    return load_uint8(*args, processes=processes, **kwargs)

  monkeypatch.setattr(imagefolder, 'load_uint8', spy)
  c.data.name = f'imagefolder:{tmp_path / "tree"}'
  c.data.cache_dir = str(tmp_path / 'cache')
  c.data.decode_processes = 3
  data.load_split(c, 'test')
  c.data.pipeline, c.data.in_ram = 'grain', True
  data.load_split(c, 'test')
  assert seen == [3, 3]


def test_imagefolder_missing_path_split_and_bad_zip(tmp_path):
  cache = str(tmp_path / 'cache')
  with pytest.raises(errors.DataError, match='does not exist'):
    data.load(f'imagefolder:{tmp_path / "nope.zip"}', 'test', cache_dir=cache)
  _write_tree(tmp_path / 'tree')
  with pytest.raises(errors.DataError, match="'val'") as e:
    data.load(f'imagefolder:{tmp_path / "tree"}', 'val', cache_dir=cache)
  assert 'test' in str(e.value) and 'train' in str(e.value)
  (tmp_path / 'bad.zip').write_bytes(b'not a zip file')
  with pytest.raises(errors.DataError, match='bad.zip'):
    data.load(f'imagefolder:{tmp_path / "bad.zip"}', 'test', cache_dir=cache)
  with pytest.raises(errors.ConfigError):
    data.load('imagefolder:', 'test', cache_dir=cache)


def test_cifar10_jpeg_test_split(tmp_path):
  if not os.path.isfile(_CIFAR_ZIP):
    pytest.skip(f'CIFAR-10 JPEG zip not found at {_CIFAR_ZIP}')
  cache = str(tmp_path / 'cache')
  raw = data.load_imagefolder_uint8(_CIFAR_ZIP, 'test', cache_dir=cache)
  assert raw.images.shape == (10000, 32, 32, 3)
  assert raw.class_names == _CIFAR_CLASSES
  np.testing.assert_array_equal(np.bincount(raw.labels), [1000] * 10)
  assert raw.files[:2] == ('cat/00000.jpg', 'ship/00001.jpg')
  assert hashlib.sha256(raw.images.tobytes()).hexdigest() == (
      _CIFAR_TEST_IMAGES_SHA256)
  assert hashlib.sha256(raw.labels.astype(np.uint8).tobytes()).hexdigest() == (
      _CIFAR_TEST_LABELS_SHA256)
  # Second load from the cache, as float32.
  ds = data.load(f'imagefolder:{_CIFAR_ZIP}', 'test', cache_dir=cache)
  assert ds.name == 'imagefolder:cifar10-jpeg-q75'
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, raw.labels)
  np.testing.assert_array_equal(ds.images[123],
                                raw.images[123].astype(np.float32) / 255)
  sel = data.select(ds, skip=20)
  assert len(sel) == 500
  np.testing.assert_array_equal(sel.example_ids, np.arange(0, 10000, 20))


# --------------------------------------------------------------------- tfds


def test_tfds_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load('tfds:mnist', 'test')
  assert len(ds) == 20
  assert ds.image_shape == (28, 28, 1)
  assert ds.images.dtype == np.float32
  assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
  assert ds.num_classes == 10 and ds.class_names == tuple('0123456789')
  assert ds.labels.dtype == np.int32
  assert np.all((ds.labels >= 0) & (ds.labels < 10))
  np.testing.assert_array_equal(ds.example_ids, np.arange(20))
  assert (ds.name, ds.split) == ('tfds:mnist', 'test')


def test_tfds_unprepared_dataset(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(errors.DataError) as e:
    data.load('tfds:mnist', 'test', data_dir=str(tmp_path))
  message = str(e.value)
  assert 'tfds build mnist' in message and 'array_record' in message
  assert str(tmp_path) in message


def test_tfds_tfrecord_fallback(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  from dds_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  features = {
      'image': None,
      'label': types.SimpleNamespace(num_classes=2, names=['no', 'yes']),
  }

  class FakeBuilder:
    data_dir = '/somewhere/fake/1.0.0'

    def is_prepared(self):
      return True

  def fake_data_source(*args, **kwargs):
    raise NotImplementedError('Random access ... FileFormat.TFRECORD ...')

  images = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
  monkeypatch.setattr(tfds, 'data_source', fake_data_source)
  monkeypatch.setattr(tfds, 'builder', lambda *a, **k: FakeBuilder())
  monkeypatch.setattr(tfds_source, '_tensorflow_available', lambda: False)
  with pytest.raises(errors.DataError, match='tensorflow-cpu') as e:
    data.load('tfds:fake', 'test')
  assert 'array_record' in str(e.value)

  def fake_load(name, **kwargs):
    assert (name, kwargs['batch_size'], kwargs['download']) == ('fake', -1,
                                                               False)
    return 'tf-dataset', types.SimpleNamespace(features=features)

  monkeypatch.setattr(tfds_source, '_tensorflow_available', lambda: True)
  monkeypatch.setattr(tfds, 'load', fake_load)
  monkeypatch.setattr(tfds, 'as_numpy', lambda ds: {
      'image': images, 'label': np.array([1, 0, 1])})
  ds = data.load('tfds:fake', 'test')
  assert ds.class_names == ('no', 'yes') and ds.image_shape == (4, 4, 3)
  np.testing.assert_array_equal(ds.labels, [1, 0, 1])
  np.testing.assert_array_equal(ds.images, images / np.float32(255))


def test_tfds_unknown_dataset(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(errors.ConfigError, match='no_such_dataset'):
    data.load('tfds:no_such_dataset', 'test', data_dir=str(tmp_path))


def test_import_does_not_import_tfds():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys; import dds_jax.data; '
          'assert "tensorflow_datasets" not in sys.modules; '
          'assert "sklearn" not in sys.modules')
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  subprocess.run([sys.executable, '-c', code], check=True, env=env)


@pytest.mark.parametrize('rows', [slice(0, 3), slice(3, 6), slice(2, 5)])
def test_iterate_batches_rows_are_one_process_share_of_each_batch(rows):
  ds = _toy_dataset(16)
  for shuffle in (None, 4):
    full = list(data.iterate_batches(ds, 6, shuffle_key_seed=shuffle))
    part = list(data.iterate_batches(ds, 6, shuffle_key_seed=shuffle,
                                     rows=rows))
    assert len(full) == len(part) == 3
    for f, p in zip(full, part):
      for k in f:
        np.testing.assert_array_equal(p[k], f[k][rows], err_msg=k)


def test_holdout_is_a_fixed_part_of_the_training_split():
  from dds_jax.configs import digits as digits_config
  config = digits_config.get_config("small")
  full = data.load_split(config, "train")
  with pytest.raises(errors.ConfigError, match="holdout > 0"):
    data.load_split(config, data.HOLDOUT_SPLIT)
  config.data.holdout = 100
  train, held = (data.load_split(config, s) for s in ("train", "holdout"))
  assert (len(train), len(held)) == (len(full) - 100, 100)
  assert held.split == "holdout" and train.split == "train"
  assert not set(train.example_ids) & set(held.example_ids)
  assert set(train.example_ids) | set(held.example_ids) == set(
      full.example_ids)
  np.testing.assert_array_equal(
      held.images, full.images[data.holdout_positions(len(full), 100)])
  # The same images whatever the seed; the test split is untouched.
  config.seed = 7
  np.testing.assert_array_equal(data.load_split(config, "holdout").example_ids,
                                held.example_ids)
  assert len(data.load_split(config, "test")) == 360
  # A spread-out sample, not the first ids.
  assert held.example_ids.max() > 0.8 * full.example_ids.max()
  config.data.holdout = len(full)
  with pytest.raises(errors.ConfigError, match="must be in"):
    data.load_split(config, "train")
