r"""Cost of the memory rule (`dds_jax.memory`) against 1k to 100k stored inputs.

Usage (from the repository root)::

  PYTHONPATH=. python bench/memory.py [--sizes=1000,10000,100000]
      [--queries=30] [--batch=1000] [--sqlite_dir=/tmp]
      [--out=bench/results/memory.json] [--quick]

Stored inputs are CIFAR-size (32x32x3 float32, uniform in [0, 1]) with
classes 0..9 and radii U(0.1, 1.0): at typical L2 distances of ~22 such balls
never overlap. Two kinds of queries:

  * disjoint: fresh uniform images, radius U(0.1, 1.0), class 0..9;
  * overlap: a stored input plus a perturbation of L2 norm U(0, 0.8), a random
    class and radius U(0.1, 1.0): most conflict with that ball (overrule when
    inside it, shrink otherwise).

Measured, per size N and kind of query:

1. rule: `MemoryIndex.rule` for one query (projection pre-filter, candidate
   search, exact float64 recheck; no append, no SQLite): median and p90
   over --queries queries; also the rows rechecked exactly per query.
2. insert RAM: `MemoryIndex.insert` one at a time (rule + append).
3. batch: `MemoryIndex.insert_many` on --batch queries (one matrix product
   per 64 queries for the pre-filter, the rule sequential), and the same
   queries one at a time from the same state; the results must be equal
   (asserted).
4. insert+commit: `MemoryStore.insert` (BEGIN IMMEDIATE, refresh, rule,
   INSERT, COMMIT with synchronous=FULL, i.e. an fsync) one at a time, and
   `MemoryStore.insert_many` of --batch queries in one transaction. The
   SQLite file for N is built directly with executemany in one transaction
   (the same N rows as the index, inserted without the rule); opening it
   (reading N rows into RAM) is timed too.

Writes every measurement and a machine description to --out as JSON and prints
a Markdown table last.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from bench import common as bench_common
from dds_jax.memory import MemoryIndex, MemoryStore
# pylint: enable=g-import-not-at-top,wrong-import-position

_SIZES = flags.DEFINE_list('sizes', ['1000', '10000', '100000'],
                           'Numbers of stored inputs.')
_QUERIES = flags.DEFINE_integer('queries', 30,
                                'Single queries timed per measurement.')
_BATCH = flags.DEFINE_integer('batch', 1000, 'Queries per batch.')
_SQLITE_DIR = flags.DEFINE_string('sqlite_dir', None,
                                  'Where the SQLite files go (default: tmp).')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny sizes (a smoke test).')
_OUT = flags.DEFINE_string('out', 'bench/results/memory.json',
                           'Where to write the JSON results.')

SHAPE = (32, 32, 3)
_CLASSES = 10


def _machine() -> dict:
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return dict(cpu=cpu, nproc=os.cpu_count(), numpy=np.__version__,
              python=platform.python_version(),
              sqlite=sqlite3.sqlite_version, platform=platform.platform(),
              load_average_1_5_15_min=os.getloadavg(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'),
              command='PYTHONPATH=. python ' + ' '.join(
                  shlex.quote(a) for a in sys.argv))


def _stored(rng, n):
  """n random stored certificates, generated in blocks."""
  for s in range(0, n, 10_000):
    b = min(10_000, n - s)
    yield (rng.random((b,) + SHAPE, dtype=np.float32),
           rng.integers(0, _CLASSES, b), rng.uniform(0.1, 1.0, b))


def _queries(rng, index, m, kind):
  if kind == 'disjoint':
    xs = rng.random((m,) + SHAPE, dtype=np.float32)
  else:
    j = rng.choice(len(index), size=m, replace=len(index) < m)
    delta = rng.normal(size=(m,) + SHAPE)
    delta *= (rng.uniform(0, 0.8, m) / np.sqrt(
        np.sum(delta ** 2, axis=(1, 2, 3))))[:, None, None, None]
    xs = np.clip(index.xs[j] + delta, 0, 1).astype(np.float32)
  return xs, rng.integers(0, _CLASSES, m), rng.uniform(0.1, 1.0, m)


def _ms(ts):
  ts = sorted(ts)
  return dict(median_ms=1e3 * statistics.median(ts),
              p90_ms=1e3 * ts[min(len(ts) - 1, int(0.9 * len(ts)))])


def _bench_index(index, rng, kind, q, batch) -> dict:
  n = len(index)
  out = {}
  xs, cs, rs = _queries(rng, index, q, kind)
  ts = []
  before = index.exact_checks
  for i in range(q):
    t = time.perf_counter()
    index.rule(xs[i], int(cs[i]), float(rs[i]))
    ts.append(time.perf_counter() - t)
  out['rule'] = _ms(ts)
  out['exact_checks_per_query'] = (index.exact_checks - before) / q
  ts = []
  for i in range(q):
    t = time.perf_counter()
    index.insert(xs[i], int(cs[i]), float(rs[i]))
    ts.append(time.perf_counter() - t)
  out['insert_ram'] = _ms(ts)
  index.truncate(n)
  xs, cs, rs = _queries(rng, index, batch, kind)
  t = time.perf_counter()
  got = index.insert_many(xs, cs, rs)
  t_batch = time.perf_counter() - t
  index.truncate(n)
  t = time.perf_counter()
  one = [index.insert(xs[i], int(cs[i]), float(rs[i])) for i in range(batch)]
  t_one = time.perf_counter() - t
  index.truncate(n)
  equal = (np.array_equal(got[0], [o[0] for o in one]) and
           np.array_equal(got[1], [o[1] for o in one]))
  assert equal, 'a batch differs from one at a time'
  out['batch'] = dict(size=batch, seconds=t_batch,
                      queries_per_s=batch / t_batch,
                      one_at_a_time_seconds=t_one,
                      equal_to_one_at_a_time=equal,
                      changed_fraction=float(np.mean(got[2])),
                      overruled_fraction=float(np.mean(got[0] != cs)))
  return out


def _build_sqlite(path, index) -> float:
  """The store's file for the index's rows: one transaction, executemany."""
  t = time.perf_counter()
  MemoryStore.open(path, input_shape=SHAPE, dataset='bench',
                   model_fingerprint='random').close()
  conn = sqlite3.connect(path, isolation_level=None)
  conn.execute('BEGIN IMMEDIATE')
  xs, cs, rs = index.xs, index.preds, index.radii
  now = datetime.datetime.now(datetime.timezone.utc).isoformat()
  conn.executemany(
      'INSERT INTO certificates (id, x, pred, radius, raw_pred, raw_radius, '
      'changed, example_id, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, NULL, ?)',
      ((i + 1, xs[i].tobytes(), int(cs[i]), float(rs[i]), int(cs[i]),
        float(rs[i]), now) for i in range(len(xs))))
  conn.execute('COMMIT')
  conn.close()
  return time.perf_counter() - t


def _bench_sqlite(path, index, rng, q, batch) -> dict:
  out = dict(build_seconds=_build_sqlite(path, index),
             file_mb=os.path.getsize(path) / 2**20)
  t = time.perf_counter()
  store = MemoryStore.open(path, input_shape=SHAPE, dataset='bench',
                           model_fingerprint='random')
  out['open_seconds'] = time.perf_counter() - t
  with store:
    assert len(store) == len(index)
    for kind in ('disjoint', 'overlap'):
      xs, cs, rs = _queries(rng, index, q, kind)
      ts = []
      for i in range(q):
        t = time.perf_counter()
        store.insert(xs[i], int(cs[i]), float(rs[i]))
        ts.append(time.perf_counter() - t)
      out[f'insert_commit_{kind}'] = _ms(ts)
    xs, cs, rs = _queries(rng, index, batch, 'overlap')
    t = time.perf_counter()
    store.insert_many(xs, cs, rs, chunk_size=batch)
    t_batch = time.perf_counter() - t
    out['insert_many_overlap'] = dict(size=batch, seconds=t_batch,
                                      queries_per_s=batch / t_batch)
  return out


def main(argv):
  del argv
  sizes = [int(s) for s in _SIZES.value]
  q, batch = _QUERIES.value, _BATCH.value
  if _QUICK.value:
    sizes, q, batch = [200, 1000], 5, 50
  rng = np.random.default_rng(0)
  load_start = os.getloadavg()
  results = []
  with tempfile.TemporaryDirectory(dir=_SQLITE_DIR.value) as tmp:
    for n in sizes:
      index = MemoryIndex(SHAPE)
      t = time.perf_counter()
      index.reserve(n)
      for xs, cs, rs in _stored(rng, n):
        index.add(xs, cs, rs)
      build = time.perf_counter() - t
      row = dict(stored=n, build_index_seconds=build)
      for kind in ('disjoint', 'overlap'):
        row[kind] = _bench_index(index, rng, kind, q, batch)
        print(f'N={n} {kind}: {json.dumps(row[kind])}', flush=True)
      path = os.path.join(tmp, f'memory_{n}.sqlite')
      row['sqlite'] = _bench_sqlite(path, index, rng, q, batch)
      print(f'N={n} sqlite: {json.dumps(row["sqlite"])}', flush=True)
      for suffix in ('', '-wal', '-shm'):
        if os.path.exists(path + suffix):
          os.remove(path + suffix)
      results.append(row)
      del index
  report = dict(machine=_machine(), load_average_at_start=load_start,
                settings=dict(shape=SHAPE, queries=q, batch=batch,
                              sizes=sizes, radii='U(0.1, 1.0)',
                              overlap_perturbation='L2 norm U(0, 0.8)',
                              synchronous='FULL'),
                results=results)
  print()
  bench_common.write_result(_OUT.value, report, indent=2)
  print()
  lines = [
      '| stored | queries | rule ms (median / p90) | exact rechecks / query '
      '| insert RAM ms | insert+commit ms | batch of %d: q/s (one at a time '
      's) | changed / overruled |' % batch,
      '|---:|---|---:|---:|---:|---:|---:|---:|']
  for row in results:
    for kind in ('disjoint', 'overlap'):
      r, s = row[kind], row['sqlite']
      lines.append(
          f"| {row['stored']:,} | {kind} | {r['rule']['median_ms']:.2f} / "
          f"{r['rule']['p90_ms']:.2f} | {r['exact_checks_per_query']:.1f} | "
          f"{r['insert_ram']['median_ms']:.2f} | "
          f"{s[f'insert_commit_{kind}']['median_ms']:.2f} | "
          f"{r['batch']['queries_per_s']:.0f} "
          f"({r['batch']['one_at_a_time_seconds']:.2f} s) | "
          f"{100 * r['batch']['changed_fraction']:.0f}% / "
          f"{100 * r['batch']['overruled_fraction']:.0f}% |")
  lines.append('')
  lines.append('| stored | build index s | SQLite build s (MB) | open s | '
               'insert_many %d in one transaction q/s |' % batch)
  lines.append('|---:|---:|---:|---:|---:|')
  for row in results:
    s = row['sqlite']
    lines.append(f"| {row['stored']:,} | {row['build_index_seconds']:.1f} | "
                 f"{s['build_seconds']:.1f} ({s['file_mb']:.0f}) | "
                 f"{s['open_seconds']:.1f} | "
                 f"{s['insert_many_overlap']['queries_per_s']:.0f} |")
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
