r"""Kill soak: a certification SIGKILLed at random times resumes to the same
files.

Usage (from the repository root; not part of the test run)::

  PYTHONPATH=. python bench/kill_soak.py [--kills=100] [--seed=0]
      [--workdir=runs/kill_soak] [--out=bench/results/kill_soak.json]

Trains the digits `small` model once (`launch.train`), certifies its test
examples once uninterrupted (`launch.certify`, data-dependent sigma with the
memory, `--examples_per_call` examples per call so that there are many resume
points): the reference. Then certifies again into a fresh results dir,
SIGKILLing the launcher at a time drawn uniformly from [0, --max_kill_s]
(default: 1.1 x the reference run's wall time, startup included) and
restarting the same command, until a run completes; half of the kills
(--mid_run_fraction) instead wait for K more rows of certify.tsv (K uniform in
1..the rows left) and then a time uniform in one call's duration, so that they
land inside the certification loop however long startup takes. Then compares
the completed run's files with the reference:

  * certify.tsv: every column but `time`, as text;
  * summary.json: every field but the time-, path- and launch-dependent ones
    (IGNORED_SUMMARY_KEYS);
  * sigma.tsv, as text;
  * memory.sqlite, table `certificates`, in query order: example id, input
    bytes, pred, radius, raw_pred, raw_radius, changed; no example stored twice,
    none lost.

Repeats with a fresh results dir until --kills kills in all (the last chain
then runs to completion). Each kill is classified from the files it left:
`startup` (no new TSV or memory row: startup, restore, sigma optimization, or
the summary of a run whose rows were all there), `mid_run` (new rows, the TSV
not complete) or `finishing` (new rows up to the last one, the process still
writing the summary). Prints the counts and PASS or FAIL, and
writes them with the command to --out.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from bench import common as bench_common


def _define_flags() -> None:
  """The command line's flags; not at import, where they could clash
  with a launcher's --config and --workdir (tests import soak())."""
  global _KILLS, _SEED, _WORKDIR, _OUT, _CONFIG, _EXAMPLES_PER_CALL
  global _HOST_DEVICES, _MAX_KILL_S, _MID_RUN_FRACTION, _TRAIN_FLAGS
  global _CERTIFY_FLAGS
  _KILLS = flags.DEFINE_integer('kills', 100, 'SIGKILLs in all.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill times.')
  _WORKDIR = flags.DEFINE_string(
      'workdir', None, 'Where the model, reference and soak runs go '
      '(default: a temporary dir, removed at the end unless the soak fails). '
      'A trained '
      '<workdir>/train/export is reused.')
  _OUT = flags.DEFINE_string('out', 'bench/results/kill_soak.json',
                             'Where the JSON goes.')
  _CONFIG = flags.DEFINE_string('config', 'dds_jax/configs/digits.py:small',
                                'The config of every launcher.')
  _EXAMPLES_PER_CALL = flags.DEFINE_integer(
      'examples_per_call', 2,
      'config.certify.examples_per_call: rows per flush.')
  _HOST_DEVICES = flags.DEFINE_integer(
      'host_devices', 1, 'DDS_JAX_HOST_DEVICES of every launcher.')
  _MAX_KILL_S = flags.DEFINE_float(
      'max_kill_s', 0.0, 'Kill times are uniform in [0, this] seconds after '
      'the start (0: 1.1 x the reference run).')
  _MID_RUN_FRACTION = flags.DEFINE_float(
      'mid_run_fraction', 0.5, 'This fraction of the kills waits for K more '
      'certify.tsv rows (K uniform in 1..the rows left), then a time uniform '
      "in [0, one call's duration]: a kill at any point of a call, whatever "
      "the machine's speed. The others are at a uniform time since the "
      'start.')
  _TRAIN_FLAGS = flags.DEFINE_multi_string(
      'train_flag', [], 'Extra flags of launch.train, e.g. '
      '--train_flag=--config.train.epochs=1.')
  _CERTIFY_FLAGS = flags.DEFINE_multi_string(
      'certify_flag', [], 'Extra flags of every launch.certify.')


# Fields of summary.json that legitimately differ between two runs (a key
# containing one of these): timing, paths, and what the last launch did itself.
IGNORED_SUMMARY_KEYS = ('provenance', 'time', 'per_s', 'path', 'created_at',
                        'this_run', 'invariant_checked_rows_since')
CERT_COLUMNS = ('example_id', 'x', 'pred', 'radius', 'raw_pred', 'raw_radius',
                'changed')
MAX_ATTEMPTS_PER_CHAIN = 200


def child_env(host_devices: int) -> dict[str, str]:
  """The launchers' environment: this repository first, a set device count."""
  env = dict(os.environ)
  env['DDS_JAX_HOST_DEVICES'] = str(host_devices)
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def launcher(module: str, *args: str) -> list[str]:
  return [sys.executable, '-m', f'launch.{module}', *args]


def run_to_end(cmd: Sequence[str], env: dict[str, str],
               timeout: float = 1800,
               tsv: str | None = None) -> tuple[float, list[float]]:
  """Runs cmd, raising with its stderr's end on failure.

  Returns:
    Its wall time, and the times since its start at which the rows of `tsv`
    appeared (polled every 10 ms; [] without tsv).
  """
  start = time.time()
  row_times = []
  with tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=err, text=True)
    while proc.poll() is None and time.time() - start < timeout:
      if tsv:
        row_times += [time.time() - start] * (tsv_rows(tsv) - len(row_times))
      time.sleep(0.01)
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    err.seek(0)
    if proc.returncode != 0:
      raise RuntimeError(f'{shlex.join(cmd)} exited with {proc.returncode}:\n'
                         f'{err.read()[-4000:]}')
  return time.time() - start, row_times


def tsv_rows(path: str) -> int:
  """Data rows in a TSV (0 when absent); a torn last line does not count."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().split('\n')
  return max(0, len([l for l in lines[:-1] if l]) - 1)  # complete lines only


def _query(path: str, sql: str) -> list[tuple]:
  """Runs sql on a copy of the store (and its journal): what the next
  launcher will find, without touching the files it will open."""
  with tempfile.TemporaryDirectory() as tmp:
    for suffix in ('', '-journal', '-wal', '-shm'):
      if os.path.exists(path + suffix):
        shutil.copy(path + suffix, os.path.join(tmp, 'm.sqlite' + suffix))
    db = sqlite3.connect(os.path.join(tmp, 'm.sqlite'))
    try:
      return db.execute(sql).fetchall()
    finally:
      db.close()


def store_rows(path: str) -> int:
  """Rows of the memory store's `certificates` table (0 when absent)."""
  if not os.path.exists(path):
    return 0
  try:
    return _query(path, 'SELECT COUNT(*) FROM certificates')[0][0]
  except sqlite3.OperationalError:  # killed before the table was made
    return 0


def _tsv_without_time(path: str) -> list[list[str]]:
  with open(path) as f:
    rows = [line.split('\t') for line in f.read().splitlines()]
  drop = rows[0].index('time') if 'time' in rows[0] else None
  return [[v for j, v in enumerate(r) if j != drop] for r in rows]


def _flat_summary(d: Any, prefix: str = '') -> dict[str, Any]:
  """summary.json as {'memory.acr': ...}, less IGNORED_SUMMARY_KEYS."""
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    if not any(s in k for s in IGNORED_SUMMARY_KEYS):
      out.update(_flat_summary(v, f'{prefix}{k}.' if isinstance(v, dict)
                               else f'{prefix}{k}'))
  return out


def _certificates(path: str) -> list[tuple]:
  return _query(path, f'SELECT id, {", ".join(CERT_COLUMNS)} FROM '
                'certificates ORDER BY id')


def compare(ref: str, got: str) -> list[str]:
  """How the results dir `got` differs from `ref`: [] when it does not."""
  diffs = []
  a, b = (_tsv_without_time(os.path.join(d, 'certify.tsv'))
          for d in (ref, got))
  if a[0] != b[0]:
    diffs.append(f'certify.tsv columns {a[0]} != {b[0]}')
  elif len(a) != len(b):
    diffs.append(f'certify.tsv has {len(b) - 1} rows, want {len(a) - 1}')
  else:
    for i, (ra, rb) in enumerate(zip(a[1:], b[1:])):
      cols = [c for c, va, vb in zip(a[0], ra, rb) if va != vb]
      if cols:
        diffs.append(f'certify.tsv row {i} (idx {ra[0]}): ' + ', '.join(
            f'{c} {ra[a[0].index(c)]} -> {rb[a[0].index(c)]}' for c in cols))
  for name in ('sigma.tsv',):
    pa, pb = os.path.join(ref, name), os.path.join(got, name)
    if os.path.exists(pa) and (not os.path.exists(pb) or
                               open(pa).read() != open(pb).read()):
      diffs.append(f'{name} differs')
  with open(os.path.join(ref, 'summary.json')) as f:
    sa = _flat_summary(json.load(f))
  with open(os.path.join(got, 'summary.json')) as f:
    sb = _flat_summary(json.load(f))
  if sa != sb:
    keys = sorted(set(sa) | set(sb))
    diffs.append('summary.json: ' + '; '.join(
        f'{k}: {sa.get(k, "(absent)")!r} -> {sb.get(k, "(absent)")!r}'
        for k in keys if sa.get(k, ()) != sb.get(k, ()))[:2000])
  ca = _certificates(os.path.join(ref, 'memory.sqlite'))
  cb = _certificates(os.path.join(got, 'memory.sqlite'))
  ids_a, ids_b = [r[1] for r in ca], [r[1] for r in cb]
  twice = sorted({i for i in ids_b if ids_b.count(i) > 1})
  if twice:
    diffs.append(f'memory: example ids stored twice: {twice}')
  lost = sorted(set(ids_a) - set(ids_b))
  if lost:
    diffs.append(f'memory: example ids lost: {lost}')
  extra = sorted(set(ids_b) - set(ids_a))
  if extra:
    diffs.append(f'memory: example ids not in the reference: {extra}')
  if not (twice or lost or extra):
    for ra, rb in zip(ca, cb):
      cols = [c for c, va, vb in zip(CERT_COLUMNS, ra[1:], rb[1:]) if va != vb]
      if cols:
        diffs.append(f'memory: certificate of example {ra[1]} differs in '
                     f'{cols}: ' + ', '.join(
                         f'{c} {ra[1 + CERT_COLUMNS.index(c)]!r} -> '
                         f'{rb[1 + CERT_COLUMNS.index(c)]!r}'
                         for c in cols if c != 'x'))
    if [r[0] for r in ca] != [r[0] for r in cb]:
      diffs.append(f'memory: row ids {[r[0] for r in cb]} != '
                   f'{[r[0] for r in ca]} (a row deleted and re-inserted)')
  return diffs


def soak(workdir: str, kills: int, seed: int = 0, config: str = '',
         examples_per_call: int = 2, host_devices: int = 1,
         max_kill_s: float = 0.0, mid_run_fraction: float = 0.5,
         train_flags: Sequence[str] = (),
         certify_flags: Sequence[str] = (),
         kill_points: Sequence[float | str] = (),
         log=print) -> dict[str, Any]:
  """Trains, certifies a reference, then kills and resumes; see the module doc.

  Args:
    workdir: holds train/ (reused when train/export exists), ref/ and soak/.
    kills: SIGKILLs in all.
    seed: seeds the kill times.
    config: the launchers' --config (default: digits small).
    examples_per_call: config.certify.examples_per_call.
    host_devices: DDS_JAX_HOST_DEVICES of the launchers.
    max_kill_s: kill times are uniform in [0, max_kill_s] (0: 1.1 x the
      reference's wall time).
    mid_run_fraction: this fraction of the random kills waits for K more
      rows, K uniform in 1..the rows left, then a time uniform in [0, one
      call's duration] (from the reference's row times).
    train_flags, certify_flags: extra launcher flags.
    kill_points: the first kills, before the random ones: a time in seconds,
      or 'rows+K' (or 'rows+K+S'): as soon as (S seconds after) the launcher
      has added K rows to certify.tsv.
    log: prints a progress line.

  Returns:
    The result: counts, the reference's duration, `passed` and `failures`.
  """
  config = config or 'dds_jax/configs/digits.py:small'
  env = child_env(host_devices)
  train_dir = os.path.join(workdir, 'train')
  export = os.path.join(train_dir, 'export')
  result: dict[str, Any] = {}
  if not os.path.exists(os.path.join(export, 'export.json')):
    result['train_s'], _ = run_to_end(
        launcher('train', f'--config={config}', f'--workdir={train_dir}',
                 *train_flags), env)
  flags_ = [f'--config={config}', f'--config.certify.checkpoint={export}',
            f'--config.certify.examples_per_call={examples_per_call}',
            *certify_flags]
  ref = os.path.join(workdir, 'ref')
  shutil.rmtree(ref, ignore_errors=True)
  ref_s, row_times = run_to_end(
      launcher('certify', *flags_, f'--workdir={ref}'), env,
      tsv=os.path.join(ref, 'certify.tsv'))
  total = tsv_rows(os.path.join(ref, 'certify.tsv'))
  max_kill_s = max_kill_s or 1.1 * ref_s
  calls = -(-total // examples_per_call)
  call_s = ((row_times[-1] - row_times[0]) / max(1, calls - 1)
            if len(row_times) >= 2 else 0.0)
  log(f'reference: {total} examples in {ref_s:.1f} s (first row after '
      f'{row_times[0] if row_times else float("nan"):.1f} s, ~{call_s:.2f} s '
      f'per call); time kills uniform in [0, {max_kill_s:.1f}] s')
  rng = random.Random(seed)
  planned = list(kill_points)
  counts = {'startup': 0, 'mid_run': 0, 'finishing': 0}
  result.update(
      reference_s=ref_s, call_s=call_s, examples=total, max_kill_s=max_kill_s,
      reference_first_row_s=row_times[0] if row_times else None, kills=0,
      chains=0, attempts=0, resumed_messages=0, completed_before_kill=0,
      failures=[], kill_log=[])
  soak_dir = os.path.join(workdir, 'soak')
  cmd = launcher('certify', *flags_, f'--workdir={soak_dir}')
  while result['kills'] < kills:
    result['chains'] += 1
    shutil.rmtree(soak_dir, ignore_errors=True)
    for _ in range(MAX_ATTEMPTS_PER_CHAIN):
      tsv = os.path.join(soak_dir, 'certify.tsv')
      store = os.path.join(soak_dir, 'memory.sqlite')
      rows0, stored0 = tsv_rows(tsv), store_rows(store)
      at = None
      if result['kills'] < kills:
        if planned:
          at = planned.pop(0)
        elif rng.random() < mid_run_fraction and rows0 < total:
          at = (f'rows+{rng.randint(1, total - rows0)}'
                f'+{rng.uniform(0, call_s):.3f}')
        else:
          at = rng.uniform(0, max_kill_s)
      result['attempts'] += 1
      start = time.time()
      with tempfile.TemporaryFile('w+') as out_f, tempfile.TemporaryFile(
          'w+') as err_f:
        proc = subprocess.Popen(cmd, cwd=_REPO, env=env, text=True,
                                stdout=out_f, stderr=err_f)
        try:
          if isinstance(at, str):  # 'rows+K' or 'rows+K+S'
            _, k, *delay = at.split('+')
            while proc.poll() is None and tsv_rows(tsv) < rows0 + int(k):
              time.sleep(0.01)
            proc.wait(timeout=float(delay[0]) if delay else 0)
          else:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
          pass
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
        proc.wait()
        elapsed = time.time() - start
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
      if 'resuming certification at example' in out:
        result['resumed_messages'] += 1
      if proc.returncode == -signal.SIGKILL:
        rows1, stored1 = tsv_rows(tsv), store_rows(store)
        wrote = (rows1, stored1) != (rows0, stored0)
        kind = ('startup' if not wrote else
                'finishing' if rows1 >= total else 'mid_run')
        counts[kind] += 1
        result['kills'] += 1
        result['kill_log'].append(dict(chain=result['chains'], at=at,
                                       after_s=round(elapsed, 2), kind=kind,
                                       tsv_rows=rows1, store_rows=stored1))
        log(f'kill {result["kills"]}/{kills} after {elapsed:.2f} s: {kind} '
            f'(TSV {rows0} -> {rows1} rows, store {stored0} -> {stored1})')
        continue
      if proc.returncode != 0:
        result['failures'].append(
            f'chain {result["chains"]}: exit {proc.returncode} after '
            f'{elapsed:.1f} s:\n{err[-4000:]}')
        break
      if at is not None:
        result['completed_before_kill'] += 1
      diffs = compare(ref, soak_dir)
      log(f'chain {result["chains"]} completed: ' +
          ('same files as the reference' if not diffs else '; '.join(diffs)))
      if diffs:
        result['failures'].append(f'chain {result["chains"]}: ' +
                                  '\n'.join(diffs))
      break
    else:
      result['failures'].append(f'chain {result["chains"]}: not complete '
                                f'after {MAX_ATTEMPTS_PER_CHAIN} attempts')
    if result['failures']:
      kept = os.path.join(workdir, f'failed_chain{result["chains"]}')
      shutil.rmtree(kept, ignore_errors=True)
      if os.path.exists(soak_dir):
        shutil.copytree(soak_dir, kept)
      break
  result.update(counts, passed=not result['failures'])
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.time()
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='kill_soak')
  result = soak(workdir, _KILLS.value, _SEED.value, _CONFIG.value,
                _EXAMPLES_PER_CALL.value, _HOST_DEVICES.value,
                _MAX_KILL_S.value, _MID_RUN_FRACTION.value,
                _TRAIN_FLAGS.value, _CERTIFY_FLAGS.value)
  verdict = 'PASS' if result['passed'] else 'FAIL'
  print(f'{verdict}: {result["kills"]} kills ({result["mid_run"]} mid-run, '
        f'{result["startup"]} in startup, {result["finishing"]} finishing) '
        f'in {result["chains"]} chains of resumes, {result["attempts"]} '
        'launches')
  for failure in result['failures']:
    print(failure)
  if result['passed'] and not _WORKDIR.value:
    shutil.rmtree(workdir, ignore_errors=True)
  result.update(
      command=shlex.join([os.path.relpath(sys.executable, _REPO)] + sys.argv),
      git_head=bench_common.git('rev-parse', 'HEAD'), nproc=os.cpu_count(),
      loadavg_end=list(os.getloadavg()), wall_s=time.time() - start,
      workdir=workdir if not result['passed'] or _WORKDIR.value else None)
  bench_common.write_result(_OUT.value, result)
  if not result['passed']:
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
