r"""A CIFAR-10 zip small enough to carry to a lent GPU machine.

Usage (from the repository root)::

  python bench/gpu_data.py --src=<cifar10-jpeg-q75.zip> \
      --dest=.gpu/cifar10-gpu.zip [--skip=20] [--max_test=500]

The device tool carries at most 64 MiB of working tree, and the full JPEG zip
is about 59 MiB. This writes a copy with the whole training split and only
the test images the certification reads (Cohen's every `skip`-th, the first
`max_test` of them: 500 by default), byte for byte (JPEG files stored, not
recompressed), under their original names. The ImageFolder reader orders a
split by file name, so in the copy's test split, test image `i` of the copy
is official test image `skip * i`: a certification of the copy with
`certify.skip=1` writes `idx = i` for official image `skip * i`
(`official_idx` below gives the map; bench/gpu.py writes it beside its TSVs).

Prints the counts and sizes; refuses to overwrite --dest unless
--force.
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
import zipfile

from absl import app
from absl import flags

_SRC = flags.DEFINE_string('src', None, 'The CIFAR-10 ImageFolder zip.')
_DEST = flags.DEFINE_string('dest', '.gpu/cifar10-gpu.zip', 'Where to write.')
_SKIP = flags.DEFINE_integer('skip', 20, 'Keep every skip-th test image.')
_MAX_TEST = flags.DEFINE_integer('max_test', 500, 'Test images kept.')
_FORCE = flags.DEFINE_bool('force', False, 'Overwrite --dest.')

_INDEX = re.compile(r'^(\d+)\.[A-Za-z]+$')


def official_idx(copy_idx: int, skip: int = 20) -> int:
  """The official test index of test image `copy_idx` of the copy."""
  return skip * copy_idx


def select_entries(names: list[str], skip: int, max_test: int) -> list[str]:
  """All train/ entries, and the test/ entries of index % skip == 0, < max."""
  keep, test = [], []
  for name in names:
    if name.endswith('/'):
      continue
    parts = name.split('/')
    split = next((p for p in parts if p in ('train', 'test')), None)
    if split == 'train':
      keep.append(name)
    elif split == 'test':
      m = _INDEX.match(posixpath.basename(name))
      if m is None:
        raise ValueError(f'test file {name!r} is not named by its index')
      i = int(m.group(1))
      if i % skip == 0 and i // skip < max_test:
        test.append((i, name))
  if len(test) < max_test:
    raise ValueError(f'only {len(test)} test images match skip={skip}; '
                     f'expected {max_test}')
  return keep + [n for _, n in sorted(test)]


def repack(src: str, out: str, skip: int, max_test: int) -> dict[str, int]:
  with zipfile.ZipFile(src) as z:
    entries = select_entries(z.namelist(), skip, max_test)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + '.tmp'
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as w:
      for name in entries:
        info = z.getinfo(name)
        w.writestr(zipfile.ZipInfo(name, date_time=info.date_time),
                   z.read(name))
    os.replace(tmp, out)
  n_test = sum(1 for e in entries if '/test/' in '/' + e)
  return dict(train=len(entries) - n_test, test=n_test,
              bytes=os.path.getsize(out))


def main(argv):
  del argv
  if not _SRC.value:
    raise app.UsageError('--src is required')
  if os.path.exists(_DEST.value) and not _FORCE.value:
    print(f'{_DEST.value} exists (use --force to rewrite it)')
    return 0
  r = repack(_SRC.value, _DEST.value, _SKIP.value, _MAX_TEST.value)
  print(f'{_DEST.value}: {r["train"]} training and {r["test"]} test images, '
        f'{r["bytes"] / 2**20:.1f} MiB')
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main))
