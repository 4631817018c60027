"""Images in ImageFolder layout, from a directory or a zip archive.

Layout: `<root>/<split>/<class>/<file>`, where `<root>` is the directory or the
zip archive itself, or a single folder inside it (`cifar/test/cat/0001.png`
works as well as `test/cat/0001.png`). Files whose extension is not an image
extension (see `IMAGE_EXTENSIONS`) and hidden files or folders (name starting
with '.', or `__MACOSX`) are ignored; images deeper inside a class folder
belong to that class.

Labels: classes are the class folder names sorted by name (label = position),
unless `class_names` is given: then label = position in that list, every class
folder must be in it, and classes of the list without a folder are allowed.

Order within a split (which defines `example_ids`, the position in it): sorted
by the key (file base name, class name, path relative to the split folder).
The file *name* comes first, across all classes, because datasets exported
this way name their files by their index in the original order: the CIFAR-10
JPEG copy stores test image `i` as `test/<class>/<i:05d>.jpg`, so this order is
the official test order. For files named in another way the order is still
deterministic, but is only "sorted by name".

Decoding: Pillow, to uint8. Grayscale images ('1', 'L', 'LA') give one channel
and everything else (RGB, palette, RGBA, CMYK, ...) is converted to RGB; if a
split mixes the two, the grayscale images are repeated to three channels. All
images of a split must have the same height and width.

Parallel decoding: `processes` (config key `data.decode_processes`) sets how
many processes decode a split that is not cached: 1 (the default) decodes
serially, 0 one process per CPU this process may use (`os.sched_getaffinity`),
n > 1 uses n. The parent reads the files' bytes (an open zip archive cannot
be shared), a few tasks ahead of the workers, which decode `_IMAGES_PER_TASK`
images per task. The workers are started with 'spawn', never 'fork': the
parent may have initialised JAX, whose threads a fork would not copy. The
arrays are bit-identical to the serial path's, in the same order (so the cache
does not depend on `processes`), and a file that cannot be decoded raises the
same `DataError`, naming it. A spawned worker imports `dds_jax` and the
parent's main script (as `__mp_main__`: a script must keep its work under
`if __name__ == '__main__':`, as the launchers do), about 2 s, so a split of
fewer than `_PARALLEL_MIN_IMAGES` images is always decoded serially.

Cache: decoding takes about 1 s (CIFAR-10 test) to 10 s (CIFAR-10 train, one
core), so the decoded uint8 arrays are stored as an uncompressed `.npz` in
`cache_dir` (default: `$DDS_JAX_CACHE`, else `~/.cache/dds_jax`) and reused.
The cache key hashes the data (sha256 of the zip file's bytes; for a
directory, its sorted relative file paths, sizes and modification times; a
zip's sha256 is computed once per process for a given path, size and
modification time), the split and the requested class list, so a changed
archive is decoded again. Cache files are written atomically and read with
`allow_pickle=False`; an unreadable cache file is ignored and rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tempfile
import time
from typing import Protocol
import zipfile

import numpy as np
from PIL import Image

from dds_jax import errors
from dds_jax.data import dataset as dataset_lib

IMAGE_EXTENSIONS = frozenset({
    '.bmp', '.gif', '.jpeg', '.jpg', '.pbm', '.pgm', '.png', '.ppm', '.tif',
    '.tiff', '.webp'
})
CACHE_ENV_VAR = 'DDS_JAX_CACHE'
# Bump when the decoded content or the cache layout changes.
_CACHE_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20
_GRAYSCALE_MODES = frozenset({'1', 'L', 'LA'})
# sha256 of zip archives hashed in this process, by (path, size, mtime): the
# CIFAR-10 zip takes about 0.5 s to hash, more than reading a cached split.
_ZIP_SHA256_MEMO: dict[tuple[str, int, int], str] = {}
# Parallel decoding: splits with fewer images are decoded serially whatever
# `processes` says (starting a spawned worker costs about 2 s), and each task
# sent to a worker decodes this many images (CIFAR-10 train: 50 tasks).
_PARALLEL_MIN_IMAGES = 20_000  # 32x32 JPEGs: below, start-up costs more
_IMAGES_PER_TASK = 1000
# Chunks read ahead of the decoding, per worker (bounds the bytes held).
_TASKS_IN_FLIGHT_PER_PROCESS = 2


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class RawSplit:
  """A decoded split before conversion to float.

  Attributes:
    images: uint8 [N, H, W, C] with C = 1 or 3.
    labels: int32 [N].
    example_ids: int64 [N], the position in the split's order (0..N-1).
    class_names: Class names; label = position.
    files: Path of each image relative to the split folder (posix style), in
      the order of `images`.
  """

  images: np.ndarray
  labels: np.ndarray
  example_ids: np.ndarray
  class_names: tuple[str, ...]
  files: tuple[str, ...]

  def __repr__(self) -> str:
    return (f'RawSplit(num_examples={self.images.shape[0]}, '
            f'image_shape={self.images.shape[1:]}, '
            f'class_names={self.class_names})')


def default_cache_dir() -> str:
  """`$DDS_JAX_CACHE` if set, else `~/.cache/dds_jax`."""
  return os.environ.get(CACHE_ENV_VAR) or os.path.join(
      os.path.expanduser('~'), '.cache', 'dds_jax')


def load(path: str,
         split: str,
         *,
         cache_dir: str | None = None,
         class_names: Sequence[str] | None = None,
         processes: int = 1) -> dataset_lib.Dataset:
  """Loads a split as float32 images in [0, 1].

  Args:
    path: An ImageFolder directory or zip archive (see the module docstring).
    split: Name of the split folder, e.g. 'test'.
    cache_dir: Where decoded splits are cached; default `default_cache_dir()`.
    class_names: Optional class list; label = position in it.
    processes: Decoding processes when the split is not cached: 1 = serial,
      0 = one per available CPU, n > 1 = n (see the module docstring).

  Returns:
    The split as a `Dataset` named 'imagefolder:<archive name without .zip>'.

  Raises:
    DataError: missing path, missing split, unreadable or inconsistent images.
    ConfigError: bad `class_names` or `processes`, or a class folder not in
      `class_names`.
  """
  raw = load_uint8(path, split, cache_dir=cache_dir, class_names=class_names,
                   processes=processes)
  images = np.divide(raw.images, np.float32(255.0), dtype=np.float32)
  return dataset_lib.Dataset(
      images=images,
      labels=raw.labels,
      example_ids=raw.example_ids,
      num_classes=len(raw.class_names),
      class_names=raw.class_names,
      name=f'imagefolder:{_archive_name(path)}',
      split=split)


def load_uint8(path: str,
               split: str,
               *,
               cache_dir: str | None = None,
               class_names: Sequence[str] | None = None,
               processes: int = 1) -> RawSplit:
  """Loads a split as uint8 images, from the cache when possible.

  Args:
    path: An ImageFolder directory or zip archive (see the module docstring).
    split: Name of the split folder, e.g. 'test'.
    cache_dir: Where decoded splits are cached; default `default_cache_dir()`.
    class_names: Optional class list; label = position in it.
    processes: Decoding processes when the split is not cached: 1 = serial,
      0 = one per available CPU, n > 1 = n. Splits of fewer than
      `_PARALLEL_MIN_IMAGES` images are decoded serially. The result and the
      cache file do not depend on it.

  Returns:
    The decoded split.

  Raises:
    DataError: missing path, missing split, unreadable or inconsistent images.
    ConfigError: bad `class_names` or `processes`, or a class folder not in
      `class_names`.
  """
  if not path:
    raise errors.ConfigError(
        'Empty imagefolder path; use imagefolder:<directory or .zip file>.')
  if not split or '/' in split or split.startswith('.'):
    raise errors.ConfigError(
        f'Bad split name {split!r}: it must be the name of a folder, e.g. '
        "'test'.")
  if class_names is not None:
    class_names = _check_class_names(class_names)
  processes = resolve_processes(processes)
  path = os.path.expanduser(path)
  cache_dir = os.path.expanduser(cache_dir or default_cache_dir())

  with _open_source(path) as source:
    key = _cache_key(source.fingerprint(), split, class_names)
    cache_path = os.path.join(
        cache_dir,
        f'imagefolder-{_safe(_archive_name(path))}-{_safe(split)}-{key[:24]}'
        '.npz')
    raw = _read_cache(cache_path)
    if raw is not None:
      logging.info('Loaded %s split %r from cache %s.', path, split,
                   cache_path)
      return raw
    raw = _decode_split(source, path, split, class_names, processes)
  _write_cache(cache_path, raw)
  return raw


def resolve_processes(processes: int) -> int:
  """The number of decoding processes `processes` asks for (>= 1).

  0 means one per CPU this process may run on (`os.sched_getaffinity`, else
  `os.cpu_count()`); n >= 1 means n.

  Raises:
    ConfigError: `processes` is negative or not an integer.
  """
  if (isinstance(processes, bool) or
      not isinstance(processes, (int, np.integer)) or processes < 0):
    raise errors.ConfigError(
        f'decode processes={processes!r} must be an integer >= 0 (0: one per '
        'CPU, 1: serial).')
  if processes == 0:
    try:
      return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # Not on Linux.
      return os.cpu_count() or 1
  return int(processes)


def _archive_name(path: str) -> str:
  name = os.path.basename(os.path.normpath(os.path.expanduser(path)))
  if name.lower().endswith('.zip'):
    name = name[:-len('.zip')]
  return name


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:64]


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
  if isinstance(class_names, str):
    raise errors.ConfigError(
        f'class_names must be a list of names, got the string {class_names!r}.')
  names = tuple(class_names)
  bad = [n for n in names if not isinstance(n, str) or not n or '/' in n]
  if bad:
    raise errors.ConfigError(
        f'class_names must be non-empty folder names, got {bad!r}.')
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise errors.ConfigError(f'class_names has duplicates: {dups}.')
  if not names:
    raise errors.ConfigError('class_names is empty.')
  return names


def _cache_key(fingerprint: str, split: str,
               class_names: tuple[str, ...] | None) -> str:
  material = json.dumps({
      'version': _CACHE_VERSION,
      'data': fingerprint,
      'split': split,
      'class_names': class_names,
  }, sort_keys=True)
  return hashlib.sha256(material.encode('utf-8')).hexdigest()


# ------------------------------------------------------------------ sources


class _Source(Protocol):
  """Files of a directory or zip archive, by posix path relative to it."""

  def entries(self) -> list[str]:
    """Relative paths; folders end with '/'."""

  def read(self, relpath: str) -> bytes:
    """Contents of a file."""

  def fingerprint(self) -> str:
    """A string that changes when the contents change."""

  def __enter__(self) -> _Source:
    ...

  def __exit__(self, *exc) -> None:
    ...


class _DirSource:
  """An ImageFolder directory."""

  def __init__(self, root: str):
    self._root = root
    self._files: list[tuple[str, int, int]] | None = None  # path, size, mtime
    self._dirs: list[str] = []

  def __enter__(self) -> _DirSource:
    return self

  def __exit__(self, *exc) -> None:
    pass

  def _scan(self) -> list[tuple[str, int, int]]:
    if self._files is None:
      files, dirs = [], []
      for dirpath, dirnames, filenames in os.walk(self._root):
        rel_dir = os.path.relpath(dirpath, self._root)
        rel_dir = '' if rel_dir == '.' else rel_dir.replace(os.sep, '/') + '/'
        dirnames.sort()
        dirs.extend(rel_dir + d + '/' for d in dirnames)
        for f in sorted(filenames):
          st = os.stat(os.path.join(dirpath, f))
          files.append((rel_dir + f, st.st_size, st.st_mtime_ns))
      self._files, self._dirs = files, dirs
    return self._files

  def entries(self) -> list[str]:
    files = self._scan()
    return self._dirs + [f for f, _, _ in files]

  def read(self, relpath: str) -> bytes:
    with open(os.path.join(self._root, *relpath.split('/')), 'rb') as f:
      return f.read()

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for relpath, size, mtime_ns in sorted(self._scan()):
      h.update(f'{relpath}\0{size}\0{mtime_ns}\n'.encode('utf-8'))
    return 'dir:' + h.hexdigest()


class _ZipSource:
  """An ImageFolder zip archive."""

  def __init__(self, path: str):
    self._path = path
    try:
      self._zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise errors.DataError(
          f'Cannot read the zip archive {path}: {e}. Check that the file is '
          'complete (compare its sha256 with the published one) or point '
          'imagefolder: at a directory instead.') from e

  def __enter__(self) -> _ZipSource:
    return self

  def __exit__(self, *exc) -> None:
    self._zip.close()

  def entries(self) -> list[str]:
    names = []
    for name in self._zip.namelist():
      while name.startswith('./'):
        name = name[2:]
      names.append(name.lstrip('/'))
    return names

  def read(self, relpath: str) -> bytes:
    try:
      return self._zip.read(relpath)
    except KeyError:
      return self._zip.read('./' + relpath)

  def fingerprint(self) -> str:
    st = os.stat(self._path)
    memo_key = (os.path.abspath(self._path), st.st_size, st.st_mtime_ns)
    if memo_key not in _ZIP_SHA256_MEMO:
      h = hashlib.sha256()
      with open(self._path, 'rb') as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
          h.update(chunk)
      _ZIP_SHA256_MEMO[memo_key] = h.hexdigest()
    return 'zip:' + _ZIP_SHA256_MEMO[memo_key]


def _open_source(path: str) -> _Source:
  if os.path.isdir(path):
    return _DirSource(path)
  if os.path.isfile(path):
    return _ZipSource(path)
  if os.path.exists(path):
    raise errors.DataError(
        f'{path} is neither a directory nor a zip file; imagefolder: needs one '
        'of the two.')
  raise errors.DataError(
      f'Image folder {path} does not exist. Give the path of a directory or '
      'zip archive holding <split>/<class>/<image> (relative paths are taken '
      f'from the current directory, {os.getcwd()}).')


# ----------------------------------------------------------------- decoding


def _is_hidden(part: str) -> bool:
  return part.startswith('.') or part == '__MACOSX'


def _find_split_prefix(entries: list[str], path: str, split: str) -> str:
  """Returns '' or '<top>/' such that the split folder is '<prefix><split>/'."""
  visible = [e for e in entries
             if not any(_is_hidden(p) for p in e.split('/') if p)]
  if any(e.startswith(split + '/') for e in visible):
    return ''
  tops = sorted({
      e.split('/', 1)[0] + '/'
      for e in visible
      if e.split('/')[1:2] == [split] and len(e.split('/')) > 2
  })
  if len(tops) == 1:
    return tops[0]
  if len(tops) > 1:
    raise errors.DataError(
        f'{path} has the split {split!r} under several top-level folders '
        f'{tops}; keep one, or point imagefolder: at one of them.')
  available = sorted({e.split('/', 1)[0] for e in visible if '/' in e})
  nested = sorted({'/'.join(e.split('/')[:2]) for e in visible
                   if e.count('/') >= 3})
  found = f'{available[:20]}'
  if nested:
    found += f' (and nested {nested[:20]})'
  raise errors.DataError(
      f'No split folder {split!r} in {path}: expected <split>/<class>/<image> '
      f'at its top level or under one top-level folder. Folders found: '
      f'{found}. Pass one of those as split, or fix the layout.')


def _decode_image(data: bytes, name: str) -> np.ndarray:
  """Decodes one image file to uint8 [H, W, 1] (grayscale) or [H, W, 3]."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.mode in _GRAYSCALE_MODES:
        img = img.convert('L')
      elif img.mode != 'RGB':
        img = img.convert('RGB')
      array = np.asarray(img, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:  # What Pillow raises.
    raise errors.DataError(
        f'Cannot decode image {name}: {e}. Remove or replace the file.') from e
  if array.ndim == 2:
    array = array[:, :, None]
  return array


def _decode_chunk(chunk: Sequence[tuple[bytes, str]]) -> list[np.ndarray]:
  """Decodes (file bytes, name) pairs: the task of one worker process.

  Module-level so that a spawned process can unpickle it; it uses numpy and
  Pillow only (no archive handle, no JAX state), and is `_decode_image` per
  image, so the arrays and the `DataError` of a bad file are the serial
  path's.
  """
  return [_decode_image(data, name) for data, name in chunk]


@dataclasses.dataclass(frozen=True)
class SplitListing:
  """The files of one split, in the split's order (see the module docstring).

  Attributes:
    entries: Path of each image inside the directory or archive.
    files: Path of each image relative to the split folder (posix style).
    labels: int32 label of each image.
    class_names: Class names; label = position.
  """

  entries: tuple[str, ...]
  files: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]


def _list_split(source: _Source, path: str, split: str,
                class_names: tuple[str, ...] | None) -> SplitListing:
  """Lists, sorts and labels the images of one split (nothing is decoded)."""
  entries = source.entries()
  prefix = _find_split_prefix(entries, path, split) + split + '/'
  found_classes = set()
  images = []  # (sort key, class, relative path in source)
  for entry in entries:
    if not entry.startswith(prefix):
      continue
    parts = entry[len(prefix):].split('/')
    if len(parts) < 2 or any(_is_hidden(p) for p in parts if p):
      continue  # A file directly in the split folder, or hidden.
    found_classes.add(parts[0])
    basename = parts[-1]
    if basename and os.path.splitext(basename)[1].lower() in IMAGE_EXTENSIONS:
      images.append(((basename, parts[0], '/'.join(parts)), parts[0], entry))

  if class_names is None:
    class_names = tuple(sorted(found_classes))
  else:
    unknown = sorted(found_classes - set(class_names))
    if unknown:
      raise errors.ConfigError(
          f'Split {split!r} of {path} has class folders {unknown} that are not '
          f'in class_names {list(class_names)}. Add them to class_names, or '
          'leave class_names unset to use all folders sorted by name.')
  if not images:
    raise errors.DataError(
        f'No images in {path} under {prefix}<class>/ (extensions '
        f'{sorted(IMAGE_EXTENSIONS)}).')
  images.sort()
  label_of = {name: i for i, name in enumerate(class_names)}
  return SplitListing(
      entries=tuple(entry for _, _, entry in images),
      files=tuple(key[2] for key, _, _ in images),
      labels=np.array([label_of[c] for _, c, _ in images], dtype=np.int32),
      class_names=class_names)


def _read_entry(source: _Source, path: str, entry: str) -> bytes:
  try:
    return source.read(entry)
  except OSError as e:
    raise errors.DataError(f'Cannot read {entry} in {path}: {e}.') from e


def _decode_parallel(source: _Source, path: str, entries: Sequence[str],
                     processes: int) -> list[np.ndarray]:
  """Decodes `entries` in `processes` spawned processes, in order.

  The parent reads the bytes chunk by chunk, a few chunks ahead of the
  workers, and collects the results in submission order.
  """
  size = max(1, _IMAGES_PER_TASK)
  chunks = [entries[i:i + size] for i in range(0, len(entries), size)]
  max_in_flight = processes * _TASKS_IN_FLIGHT_PER_PROCESS
  arrays: list[np.ndarray] = []
  pending: list[concurrent.futures.Future] = []
  # 'spawn', not 'fork': the parent may have initialised JAX (threads).
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=processes, mp_context=context) as pool:
    try:
      for chunk in chunks:
        task = [(_read_entry(source, path, entry), f'{path}:{entry}')
                for entry in chunk]
        pending.append(pool.submit(_decode_chunk, task))
        while len(pending) >= max_in_flight:
          arrays.extend(pending.pop(0).result())
      while pending:
        arrays.extend(pending.pop(0).result())
    except concurrent.futures.BrokenExecutor as e:
      pool.shutdown(wait=True, cancel_futures=True)
      raise errors.DataError(
          f'A process decoding {path} stopped unexpectedly ({e}): out of '
          'memory, or it could not start (a spawned process imports the main '
          'script; see its error above). Decode serially with '
          'data.decode_processes=1 (processes=1), or with fewer processes.'
      ) from e
    except BaseException:
      # A DataError of a worker comes here as raised by `_decode_image`.
      pool.shutdown(wait=True, cancel_futures=True)
      raise
  return arrays


def _decode_split(source: _Source, path: str, split: str,
                  class_names: tuple[str, ...] | None,
                  processes: int = 1) -> RawSplit:
  """Lists, sorts, labels and decodes the images of one split."""
  listing = _list_split(source, path, split, class_names)
  start = time.perf_counter()
  num_chunks = -(-len(listing.entries) // max(1, _IMAGES_PER_TASK))
  if len(listing.entries) < _PARALLEL_MIN_IMAGES:
    processes = 1
  processes = min(processes, num_chunks)
  if processes > 1:
    arrays = _decode_parallel(source, path, listing.entries, processes)
  else:
    arrays = [
        _decode_image(_read_entry(source, path, entry), f'{path}:{entry}')
        for entry in listing.entries
    ]
  logging.info('Decoded %d images of %s split %r in %.1f s with %d %s.',
               len(arrays), path, split, time.perf_counter() - start,
               processes, 'process' if processes == 1 else 'processes')

  first = arrays[0]
  for entry, array in zip(listing.entries, arrays):
    if array.shape[:2] != first.shape[:2]:
      raise errors.DataError(
          f'Images of split {split!r} in {path} do not all have the same '
          f'size: {listing.entries[0]} is {first.shape[1]}x{first.shape[0]} '
          f'(WxH) but {entry} is {array.shape[1]}x{array.shape[0]}. Resize '
          'them to one size first, or read the split lazily with '
          "data.pipeline='grain' and data.preprocess='imagenet' (resize and "
          'crop per image).')
  if any(a.shape[2] == 3 for a in arrays):
    arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
              for a in arrays]
  n = len(arrays)
  return RawSplit(
      images=np.stack(arrays),
      labels=listing.labels,
      example_ids=np.arange(n, dtype=np.int64),
      class_names=listing.class_names,
      files=listing.files)


# -------------------------------------------------------------------- cache


def _read_cache(cache_path: str) -> RawSplit | None:
  """Returns the cached split, or None if absent or unreadable."""
  if not os.path.isfile(cache_path):
    return None
  try:
    with np.load(cache_path, allow_pickle=False) as z:
      images = z['images']
      labels = z['labels']
      example_ids = z['example_ids']
      class_names = tuple(str(c) for c in z['class_names'])
      files = tuple(str(f) for f in z['files'])
    n = images.shape[0]
    if (images.dtype != np.uint8 or images.ndim != 4 or
        labels.shape != (n,) or example_ids.shape != (n,) or len(files) != n):
      raise ValueError('inconsistent arrays')
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    logging.warning('Ignoring unreadable cache file %s (%s); decoding again.',
                    cache_path, e)
    return None
  return RawSplit(
      images=images,
      labels=labels.astype(np.int32),
      example_ids=example_ids.astype(np.int64),
      class_names=class_names,
      files=files)


def _write_cache(cache_path: str, raw: RawSplit) -> None:
  """Writes the cache file atomically; a failure only logs a warning."""
  cache_dir = os.path.dirname(cache_path)
  tmp_path = None
  try:
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=cache_dir, prefix='.tmp-', suffix='.npz', delete=False) as f:
      tmp_path = f.name
      np.savez(
          f,
          images=raw.images,
          labels=raw.labels,
          example_ids=raw.example_ids,
          class_names=np.array(raw.class_names, dtype=np.str_),
          files=np.array(raw.files, dtype=np.str_))
    os.replace(tmp_path, cache_path)
    tmp_path = None
  except OSError as e:
    logging.warning(
        'Could not write the cache file %s (%s); the next load will decode '
        'again. Set $%s or pass cache_dir= to a writable directory.',
        cache_path, e, CACHE_ENV_VAR)
  finally:
    if tmp_path is not None and os.path.exists(tmp_path):
      os.remove(tmp_path)
