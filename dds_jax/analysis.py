"""Reads certification TSVs and summarises them: tables, intervals, plots.

The certification output is the TSV of Cohen et al. (2019), `certify.py`: a
header row ``idx label predict radius correct time`` (tab-separated) and one
row per certified example. Our certifier appends more columns after those
(``sigma``, ``p_lower``, ``predict_mem``, ``radius_mem``, ``changed``, ...);
they are read and kept, never required. ``predict == -1`` means the smoothed
classifier abstained (its radius is 0 and it is not correct). ``time`` is
either seconds as a float (``15.4``) or a `datetime.timedelta` string
(``0:00:13.736080``, ``1 day, 2:03:04.5``); both are read as seconds.

Definitions used throughout:

* certified accuracy at r: fraction of rows with ``correct == 1`` and
  ``radius >= r`` (a radius exactly equal to r counts);
* ACR (average certified radius): ``mean(correct * radius)``, abstentions and
  wrong predictions counting as 0;
* abstain rate: fraction of rows with ``predict == -1``;
* 95% interval of a certified accuracy k / n: two-sided Clopper-Pearson;
* paired comparison of two runs on the same examples (`paired_comparison`):
  at each r, McNemar's exact test on the pairs where exactly one run certifies
  the example correct at r, and Newcombe's 95% interval of the difference;
* radius cap: a summary may carry ``radius_cap`` (the largest radius its N and
  alpha can certify, `dds_jax.stats.radius_cap`); tables show radii beyond it
  as ``beyond cap``, not as measured zeros.

Typical use::

  summary = analysis.summarize('runs/exp/certify.tsv')
  print(analysis.format_table({'exp': summary}))
  analysis.plot_certified_accuracy(
      {'exp': analysis.read_tsv('runs/exp/certify.tsv')}, 'curve.png')

`write_tsv` formats floats with ``'%.6g'`` by default (6 significant digits,
always with a ``.`` or exponent so that a float column reads back as float):
a radius is kept to a relative 5e-6, far below what the Monte-Carlo
certificate resolves. Pass ``float_format=None`` for the shortest string that
round-trips exactly (e.g. when ``p_lower`` close to 1 must be recomputed into a
radius later).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from dds_jax import errors
# The two-sided exact interval of a certified accuracy k / n: defined in
# `dds_jax.stats` next to the one-sided bound of CERTIFY (one formula for
# both), and public here too.
from dds_jax.stats import binom_pvalue
from dds_jax.stats import clopper_pearson_interval
from dds_jax.stats import paired_difference_interval

PathLike = Union[str, os.PathLike]

# Covers CIFAR-10 (Cohen's tables: 0.25 ... 1.0) and ImageNet (up to 3.0).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)

# Columns of Cohen's format, in his order. `read_tsv` requires them by default.
REQUIRED_COLUMNS = ('idx', 'label', 'predict', 'radius', 'correct', 'time')
# Columns with a fixed type; the type of any other column is inferred.
INT_COLUMNS = frozenset({'idx', 'label', 'predict', 'correct'})
FLOAT_COLUMNS = frozenset({'radius', 'sigma', 'p_lower', 'time'})

ABSTAIN = -1

_DURATION_RE = re.compile(
    r'^\s*(?:(?P<days>-?\d+) days?, )?(?P<h>\d+):(?P<m>\d{1,2}):'
    r'(?P<s>\d{1,2}(?:\.\d*)?)\s*$')


# ---------------------------------------------------------------------------
# Reading and writing.
# ---------------------------------------------------------------------------


def parse_duration(text: str) -> float:
  """Parses ``'15.4'`` or ``'0:00:13.736080'`` (or ``'1 day, 0:00:01'``).

  Args:
    text: seconds as a float, or `str(datetime.timedelta)`.

  Returns:
    The duration in seconds.

  Raises:
    ValueError: if `text` is neither form.
  """
  try:
    return float(text)
  except ValueError:
    pass
  match = _DURATION_RE.match(text)
  if match is None:
    raise ValueError(f'not a duration: {text!r}')
  days = int(match.group('days') or 0)
  return (days * 86400.0 + int(match.group('h')) * 3600.0 +
          int(match.group('m')) * 60.0 + float(match.group('s')))


def _is_float_column(name: str) -> bool:
  return name in FLOAT_COLUMNS or name.startswith('radius')


def _parse_column(name: str, values: Sequence[str], linenos: Sequence[int],
                  path: str) -> np.ndarray:
  """Converts one column's strings, reporting the first bad line."""

  def fail(i: int, what: str) -> errors.InputError:
    return errors.InputError(
        f'{path}:{linenos[i]}: column {name!r}: expected {what}, '
        f'got {values[i]!r}')

  def convert(fn: Callable[[str], Any], dtype: Any, what: str) -> np.ndarray:
    out = np.empty(len(values), dtype=dtype)
    for i, v in enumerate(values):
      try:
        out[i] = fn(v)
      except (ValueError, OverflowError):
        raise fail(i, what) from None
    return out

  if name == 'time':
    return convert(parse_duration, np.float64,
                   'seconds or H:MM:SS[.ffffff]')
  if name in INT_COLUMNS:
    return convert(int, np.int64, 'an integer')
  if _is_float_column(name):
    return convert(float, np.float64, 'a number')
  # Any other column: int if every value is, else float, else bool, else str.
  for fn, dtype in ((int, np.int64), (float, np.float64)):
    try:
      return np.array([fn(v) for v in values], dtype=dtype)
    except (ValueError, OverflowError):
      pass
  if values and all(v in ('True', 'False') for v in values):
    return np.array([v == 'True' for v in values], dtype=bool)
  return np.array(values, dtype=str)


def read_tsv(
    path: PathLike,
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> dict[str, np.ndarray]:
  """Reads a certification TSV into columns.

  Args:
    path: the TSV file (header row, tab-separated, one row per example).
    required: columns that must be present (Cohen's six by default).

  Returns:
    Columns by name in file order: ``idx label predict correct`` as int64,
    ``radius`` (and any ``radius*``), ``sigma``, ``p_lower`` as float64,
    ``time`` as float64 seconds; other columns as int64 if every value is an
    integer, else float64, else bool (``True``/``False``), else str.

  Raises:
    DataError: the file is missing or cannot be read.
    InputError: the file is malformed: no header, a missing or duplicate
      column, a row with the wrong number of fields, a value of the wrong
      type, ``correct`` not 0/1, a negative or non-finite radius. The message
      names the file and the line.
  """
  path = os.fspath(path)
  try:
    with open(path, 'r', encoding='utf-8', newline='') as f:
      text = f.read()
  except FileNotFoundError:
    raise errors.DataError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise errors.DataError(f'{path}: is a directory, not a TSV file') from None
  except UnicodeDecodeError as e:
    raise errors.InputError(
        f'{path}: not a UTF-8 text file ({e.reason} at byte {e.start})'
    ) from None
  except OSError as e:
    raise errors.DataError(f'{path}: cannot read: {e.strerror or e}') from None

  lines = text.splitlines()
  header_lineno = next(
      (i + 1 for i, line in enumerate(lines) if line.strip()), None)
  if header_lineno is None:
    raise errors.InputError(f'{path}: empty file, expected a header row '
                            f'({" ".join(REQUIRED_COLUMNS)})')
  names = [n.strip() for n in lines[header_lineno - 1].split('\t')]
  if any(not n for n in names):
    raise errors.InputError(
        f'{path}:{header_lineno}: empty column name in header {names}')
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise errors.InputError(
        f'{path}:{header_lineno}: duplicate column(s) {duplicates} in header')
  missing = [n for n in required if n not in names]
  if missing:
    raise errors.InputError(
        f'{path}:{header_lineno}: header lacks column(s) {missing}; '
        f'it has {names} (is this a tab-separated certification TSV?)')

  raw = [[] for _ in names]
  linenos = []
  for lineno in range(header_lineno + 1, len(lines) + 1):
    line = lines[lineno - 1]
    if not line.strip():
      continue
    fields = line.split('\t')
    if len(fields) != len(names):
      raise errors.InputError(
          f'{path}:{lineno}: expected {len(names)} tab-separated fields '
          f'({" ".join(names)}), got {len(fields)}')
    for column, value in zip(raw, fields):
      column.append(value.strip())
    linenos.append(lineno)

  columns = {
      name: _parse_column(name, values, linenos, path)
      for name, values in zip(names, raw)
  }

  if 'correct' in columns:
    bad = np.flatnonzero((columns['correct'] != 0) & (columns['correct'] != 1))
    if bad.size:
      i = bad[0]
      raise errors.InputError(
          f'{path}:{linenos[i]}: column \'correct\' must be 0 or 1, '
          f'got {columns["correct"][i]}')
  if 'radius' in columns:
    radius = columns['radius']
    bad = np.flatnonzero(~(np.isfinite(radius) & (radius >= 0)))
    if bad.size:
      i = bad[0]
      raise errors.InputError(
          f'{path}:{linenos[i]}: column \'radius\' must be finite and >= 0, '
          f'got {raw[names.index("radius")][i]!r}')
  return columns


def read_sigma_by_id(path: PathLike) -> dict[int, float]:
  """{example id: sigma} of a TSV with columns idx and sigma: a trained
  per-sample sigma table, or a certification's sigma.tsv."""
  cols = read_tsv(path, required=('idx', 'sigma'))
  return dict(zip(np.asarray(cols['idx'], np.int64).tolist(),
                  np.asarray(cols['sigma'], np.float64).tolist()))


def _format_float(x: float, float_format: str | None) -> str:
  if float_format is not None:
    s = float_format % x
    if re.fullmatch(r'-?\d+', s):
      s += '.0'  # Keep floats recognisable as floats when read back.
    return s
  if not np.isfinite(x):
    return str(float(x))
  # Shortest string that round-trips at the value's own precision.
  if x != 0 and not 1e-4 <= abs(x) < 1e16:
    return np.format_float_scientific(x, unique=True, trim='0')
  return np.format_float_positional(x, unique=True, trim='0')


def _format_value(v: Any, float_format: str | None) -> str:
  if isinstance(v, (bool, np.bool_)):
    return '1' if v else '0'
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return _format_float(v, float_format)
  s = str(v)
  if '\t' in s or '\n' in s or '\r' in s:
    raise errors.InputError(f'value {s!r} contains a tab or newline')
  return s


def write_tsv(
    path: PathLike,
    columns: Mapping[str, Sequence[Any]],
    order: Sequence[str] | None = None,
    *,
    float_format: str | None = '%.6g',
) -> None:
  """Writes columns as a TSV, atomically (temporary file + `os.replace`).

  Args:
    path: where to write; its directory is created if missing.
    columns: equal-length sequences by column name.
    order: the columns to write, in order. None: Cohen's columns that are
      present, in his order, then the others in `columns` order. Columns not
      in `order` are not written.
    float_format: %-format of floats (``'%.6g'``: 6 significant digits,
      ``'.0'`` appended when it would look like an integer); None: the
      shortest exact representation. Integers are written as integers, bools
      as 1/0, anything else with `str`.

  Raises:
    InputError: a column in `order` is missing, lengths differ, or a value
      holds a tab or newline.
    DataError: the file cannot be written.
  """
  path = os.fspath(path)
  if order is None:
    order = [n for n in REQUIRED_COLUMNS if n in columns]
    order += [n for n in columns if n not in order]
  order = list(order)
  missing = [n for n in order if n not in columns]
  if missing:
    raise errors.InputError(
        f'write_tsv({path}): column(s) {missing} not in {list(columns)}')
  if len(set(order)) != len(order):
    raise errors.InputError(f'write_tsv({path}): duplicate names in {order}')
  for name in order:
    if '\t' in name or '\n' in name or not name.strip():
      raise errors.InputError(f'write_tsv({path}): bad column name {name!r}')
  lengths = {n: len(columns[n]) for n in order}
  if len(set(lengths.values())) > 1:
    raise errors.InputError(
        f'write_tsv({path}): columns differ in length: {lengths}')
  num_rows = next(iter(lengths.values()), 0)

  lines = ['\t'.join(order)]
  cells = [list(columns[n]) for n in order]
  for i in range(num_rows):
    lines.append('\t'.join(_format_value(c[i], float_format) for c in cells))
  _atomic_write(path, ('\n'.join(lines) + '\n').encode('utf-8'))


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically; DataError if it cannot."""
  _atomic_write(os.fspath(path), text.encode('utf-8'))


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    raise errors.DataError(f'{path}: cannot write: {e.strerror or e}') from None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------


def _as_1d(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
  try:
    a = np.asarray(x, dtype=dtype)
  except (TypeError, ValueError):
    raise errors.InputError(f'{name}: not numeric') from None
  if a.ndim != 1:
    raise errors.InputError(
        f'{name}: expected a 1-D array, got shape {a.shape}')
  return a


def certified_accuracy(radius: Any, correct: Any, radii: Any) -> np.ndarray:
  """Fraction of examples with ``correct == 1`` and ``radius >= r``, each r.

  Args:
    radius: (n,) certified radii (0 for abstentions).
    correct: (n,) 1 where the smoothed prediction is the label, else 0.
    radii: (m,) radii to evaluate at, or a scalar.

  Returns:
    (m,) float64 certified accuracies (a 0-d array for a scalar `radii`).

  Raises:
    InputError: shapes differ, n == 0, or a radius is negative / non-finite.
  """
  radius = _as_1d(radius, 'radius')
  correct = _as_1d(correct, 'correct')
  if radius.shape != correct.shape:
    raise errors.InputError(
        f'radius and correct differ in shape: {radius.shape} vs '
        f'{correct.shape}')
  if radius.size == 0:
    raise errors.InputError('no examples: certified accuracy is undefined')
  if not np.all(np.isfinite(radius) & (radius >= 0)):
    raise errors.InputError('radius must be finite and >= 0')
  radii = np.asarray(radii, dtype=np.float64)
  certified = np.sort(radius[correct == 1])
  # Number of correct rows with radius >= r.
  count = certified.size - np.searchsorted(certified, radii, side='left')
  return count / radius.size


def _correct_for(columns: Mapping[str, Any], predict_key: str,
                 correct_key: str | None) -> np.ndarray:
  if correct_key is None:
    correct_key = 'correct' if predict_key == 'predict' else None
  if correct_key is not None:
    _require(columns, correct_key)
    return _as_1d(columns[correct_key], correct_key)
  # Derived: e.g. predict_mem == label (abstention is never correct).
  _require(columns, 'label')
  predict = _as_1d(columns[predict_key], predict_key)
  label = _as_1d(columns['label'], 'label')
  return ((predict == label) & (predict != ABSTAIN)).astype(np.float64)


def _require(columns: Mapping[str, Any], key: str) -> None:
  if key not in columns:
    raise errors.InputError(
        f'column {key!r} not found; have {sorted(columns)}')


def radius_and_correct(
    columns: Mapping[str, Any],
    *,
    radius_key: str = 'radius',
    predict_key: str = 'predict',
    correct_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Picks the (radius, correct) arrays of one certification variant.

  Args:
    columns: columns by name, as from `read_tsv`.
    radius_key: the radius column (e.g. ``'radius_mem'``).
    predict_key: the prediction column, -1 = abstain (e.g. ``'predict_mem'``).
    correct_key: the 0/1 correctness column. None: ``'correct'`` when
      `predict_key` is ``'predict'``, else derived as
      ``(columns[predict_key] == columns['label']) & (prediction != -1)``.

  Returns:
    float64 (radius, correct), both (n,).

  Raises:
    InputError: a needed column is missing or the lengths differ.
  """
  _require(columns, radius_key)
  _require(columns, predict_key)
  radius = _as_1d(columns[radius_key], radius_key)
  predict = _as_1d(columns[predict_key], predict_key)
  correct = _correct_for(columns, predict_key, correct_key)
  if not radius.shape == predict.shape == correct.shape:
    raise errors.InputError(
        f'columns differ in length: {radius_key} {radius.size}, '
        f'{predict_key} {predict.size}, correct {correct.size}')
  return radius, correct


def summarize(
    columns_or_path: Mapping[str, Any] | PathLike,
    radii: Sequence[float] = DEFAULT_RADII,
    *,
    radius_key: str = 'radius',
    predict_key: str = 'predict',
    correct_key: str | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
  """Summarises one certification run.

  Args:
    columns_or_path: a TSV path (read with `read_tsv`) or columns by name.
    radii: radii at which to report certified accuracy.
    radius_key: the radius column (e.g. ``'radius_mem'``).
    predict_key: the prediction column, -1 = abstain (e.g. ``'predict_mem'``).
    correct_key: the 0/1 correctness column. None: ``'correct'`` when
      `predict_key` is ``'predict'``, else derived as
      ``(columns[predict_key] == columns['label']) & (prediction != -1)``.
    level: confidence level of the Clopper-Pearson intervals.

  Returns:
    A JSON-serialisable dict: ``num_examples`` (int), ``radii``,
    ``certified_accuracy``, ``num_certified`` (the k of each accuracy),
    ``ci_low``, ``ci_high`` (lists, one per radius), ``acr``,
    ``abstain_rate``, ``clean_accuracy`` (certified accuracy at r = 0, i.e.
    accuracy of the smoothed classifier with abstention counted wrong),
    ``mean_time_s`` (None without a ``time`` column), ``radius_key``,
    ``predict_key``, and ``path`` when given a path.

  Raises:
    InputError: a needed column is missing, lengths differ, no rows.
    DataError: the path cannot be read.
  """
  path = None
  if isinstance(columns_or_path, (str, os.PathLike)):
    path = os.fspath(columns_or_path)
    columns = read_tsv(path)
  else:
    columns = columns_or_path
  where = f'{path}: ' if path else ''
  try:
    radius, correct = radius_and_correct(
        columns, radius_key=radius_key, predict_key=predict_key,
        correct_key=correct_key)
    predict = _as_1d(columns[predict_key], predict_key)
    radii = [float(r) for r in np.atleast_1d(np.asarray(radii, np.float64))]
    accuracy = certified_accuracy(radius, correct, radii)
  except errors.InputError as e:
    raise errors.InputError(f'{where}{e}') from None
  n = int(radius.size)
  k = np.rint(accuracy * n).astype(np.int64)
  lo, hi = clopper_pearson_interval(k, n, level)
  mean_time = None
  if 'time' in columns:
    time = np.asarray(columns['time'])
    if time.dtype.kind in 'iuf' and time.size:
      mean_time = float(np.mean(time))
      mean_time = mean_time if math.isfinite(mean_time) else None
  summary = {
      'num_examples': n,
      'radii': radii,
      'certified_accuracy': [float(a) for a in accuracy],
      'num_certified': [int(x) for x in k],
      'ci_low': [float(x) for x in lo],
      'ci_high': [float(x) for x in hi],
      'acr': float(np.mean(correct * radius)),
      'abstain_rate': float(np.mean(predict == ABSTAIN)),
      'clean_accuracy': float(certified_accuracy(radius, correct, 0.0)),
      'mean_time_s': mean_time,
      'radius_key': radius_key,
      'predict_key': predict_key,
  }
  if path is not None:
    summary['path'] = path
  return summary


def _by_id(columns: Mapping[str, Any], radius_key: str, predict_key: str):
  radius, correct = radius_and_correct(columns, radius_key=radius_key,
                                       predict_key=predict_key)
  _require(columns, 'idx')
  ids = np.asarray(columns['idx'], np.int64)
  if np.unique(ids).size != ids.size:
    raise errors.InputError('duplicate idx: a paired comparison needs one row '
                            'per example')
  order = np.argsort(ids)
  return ids[order], radius[order], correct[order]


def _aligned(base, other, base_keys, other_keys):
  """(ids, (radius, correct) of base, the same of other), sorted by idx."""
  ids_b, rad_b, cor_b = _by_id(base, *base_keys)
  ids_o, rad_o, cor_o = _by_id(other, *other_keys)
  if ids_b.shape != ids_o.shape or np.any(ids_b != ids_o):
    raise errors.InputError(
        f'the runs cover different examples ({ids_b.size} vs {ids_o.size} '
        'rows, or other idx): a paired comparison needs the same ones')
  return ids_b, (rad_b, cor_b), (rad_o, cor_o)


def paired_comparison(
    base: Mapping[str, Any],
    other: Mapping[str, Any],
    radii: Sequence[float] = DEFAULT_RADII,
    *,
    base_keys: tuple[str, str] = ('radius', 'predict'),
    other_keys: tuple[str, str] = ('radius', 'predict'),
    level: float = 0.95,
) -> dict[str, Any]:
  """Compares two certification runs on the same examples, at each radius.

  The outcome of an example at r is "certified and correct at r". For each r:
  ``only_other`` (b) and ``only_base`` (c) count the discordant examples,
  ``difference`` = (b - c) / n is other's certified accuracy minus base's,
  ``ci_low`` / ``ci_high`` its Newcombe interval at `level`
  (`dds_jax.stats.paired_difference_interval`) and ``p_value`` McNemar's
  exact two-sided test (binomial test of b out of b + c at 1/2; 1 when
  b + c = 0).

  Args:
    base: columns of the baseline run (as from `read_tsv`), with ``idx``.
    other: columns of the compared run, the same set of ``idx``.
    radii: radii to compare at.
    base_keys: (radius column, prediction column) of the base run.
    other_keys: the same for the other run, e.g. ``('radius_mem',
      'predict_mem')``.
    level: confidence level of the intervals.

  Returns:
    A JSON-serialisable dict of lists, one entry per radius, plus ``radii``
    and ``num_examples``.

  Raises:
    InputError: the runs do not cover the same examples, or a column is
      missing.
  """
  ids_b, (rad_b, cor_b), (rad_o, cor_o) = _aligned(base, other, base_keys,
                                                    other_keys)
  out = {k: [] for k in ('only_other', 'only_base', 'both', 'neither',
                         'difference', 'ci_low', 'ci_high', 'p_value')}
  radii = [float(r) for r in radii]
  for r in radii:
    yes_b = (cor_b == 1) & (rad_b >= r)
    yes_o = (cor_o == 1) & (rad_o >= r)
    a, b = int(np.sum(yes_b & yes_o)), int(np.sum(yes_o & ~yes_b))
    c, d = int(np.sum(yes_b & ~yes_o)), int(np.sum(~yes_b & ~yes_o))
    diff, lo, hi = paired_difference_interval(a, b, c, d, level)
    for key, v in (('only_other', b), ('only_base', c), ('both', a),
                   ('neither', d), ('difference', diff), ('ci_low', lo),
                   ('ci_high', hi),
                   ('p_value', float(binom_pvalue(b, c)[0]))):
      out[key].append(v)
  return {'radii': radii, 'num_examples': int(ids_b.size), **out}


P_LOWER_BUCKETS = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)


def wins_by_bucket(
    base: Mapping[str, Any],
    other: Mapping[str, Any],
    edges: Sequence[float] = P_LOWER_BUCKETS,
    *,
    other_keys: tuple[str, str] = ('radius', 'predict'),
) -> list[dict[str, Any]]:
  """Where another run wins or loses against a baseline, by baseline p_lower.

  Each image is put in the bucket [edges[i], edges[i+1]) of the baseline's
  ``p_lower`` (the last bucket includes its upper edge); within a bucket, an
  image's radius counts as 0 when it is not correct. Per bucket: ``n``, the
  mean radius of each run, ``wins`` / ``losses`` (the other run's radius
  larger / smaller), and the mean sigma of each run when the TSVs have it.

  Raises:
    InputError: different images, or no ``p_lower`` column in `base`.
  """
  _, (rad_b, cor_b), (rad_o, cor_o) = _aligned(
      base, other, ('radius', 'predict'), other_keys)
  _require(base, 'p_lower')

  def sorted_col(cols, key):
    order = np.argsort(np.asarray(cols['idx'], np.int64))
    return np.asarray(cols[key], np.float64)[order]

  p_lower = sorted_col(base, 'p_lower')
  r_b, r_o = rad_b * (cor_b == 1), rad_o * (cor_o == 1)
  sig_b = sorted_col(base, 'sigma') if 'sigma' in base else None
  sig_o = sorted_col(other, 'sigma') if 'sigma' in other else None
  out = []
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    last = i == len(edges) - 2
    mask = (p_lower >= lo) & ((p_lower <= hi) if last else (p_lower < hi))
    row = {'p_lower_from': float(lo), 'p_lower_to': float(hi),
           'n': int(mask.sum()),
           'wins': int(np.sum(r_o[mask] > r_b[mask])),
           'losses': int(np.sum(r_o[mask] < r_b[mask]))}
    for name, v in (('mean_radius_base', r_b), ('mean_radius_other', r_o),
                    ('mean_sigma_base', sig_b), ('mean_sigma_other', sig_o)):
      row[name] = (float(v[mask].mean()) if v is not None and mask.any()
                   else None)
    out.append(row)
  return out


def format_buckets(rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of `wins_by_bucket` rows (empty buckets left out)."""
  num = lambda x: '-' if x is None else f'{x:.3f}'
  rows = [r for r in rows if r['n']] or rows[:1]
  return _markdown(
      ['baseline p_lower', 'n', 'mean radius (baseline)', 'mean radius',
       'wins', 'losses', 'mean sigma'],
      [[f'[{r["p_lower_from"]:g}, {r["p_lower_to"]:g})', str(r['n']),
        num(r['mean_radius_base']), num(r['mean_radius_other']),
        str(r['wins']), str(r['losses']), num(r['mean_sigma_other'])]
       for r in rows])


def format_paired(comparisons: Mapping[str, Mapping[str, Any]],
                  caps: Mapping[str, float | None] | None = None) -> str:
  """A Markdown table of `paired_comparison` outputs, one row per run.

  Each cell reads ``+0.072 [+0.046, +0.102] 26:0 p=3.0e-08``: the difference
  in certified accuracy against the baseline, its 95% interval, the
  discordant counts (only this run : only the baseline) and McNemar's exact
  p-value. ``beyond cap`` where r exceeds `caps[name]` (the larger of the two
  runs' caps).
  """
  if not comparisons:
    raise errors.InputError('no comparisons to format')
  radii = sorted({float(r) for c in comparisons.values() for r in c['radii']})
  header = ['vs baseline'] + [f'r={_radius_label(r)}' for r in radii]
  rows = []
  for name, c in comparisons.items():
    cap = (caps or {}).get(name)
    row = [str(name).replace('|', '\\|')]
    for r in radii:
      if r not in c['radii']:
        row.append('-')
        continue
      if cap is not None and r > cap:
        row.append('beyond cap')
        continue
      i = c['radii'].index(r)
      row.append(f'{c["difference"][i]:+.3f} [{c["ci_low"][i]:+.3f}, '
                 f'{c["ci_high"][i]:+.3f}] {c["only_other"][i]}:'
                 f'{c["only_base"][i]} p={c["p_value"][i]:.2g}')
    rows.append(row)
  return _markdown(header, rows)


def histogram_lines(values: Any, bins: int = 8, width: int = 40,
                    edge_format: str = '+.3f') -> list[str]:
  """A text histogram, one line per bin: ``[lo, hi)  count  ####``."""
  counts, edges = np.histogram(np.asarray(values, np.float64), bins=bins)
  top = max(int(counts.max()), 1)
  return [f'    [{lo:{edge_format}}, {hi:{edge_format}}) {k:6d} '
          + '#' * int(round(width * k / top))
          for k, lo, hi in zip(counts, edges[:-1], edges[1:])]


# The summary file a certification writes beside its TSV (dds_jax.evaluate).
CERTIFY_SUMMARY = 'summary.json'


def certify_notes(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """One line per data-dependent run and per memory, from certification
  summaries (summary.json): sigma's range and the forward passes spent
  choosing it beside CERTIFY's n0 + N; the memory's store size, changed
  count and union bound."""
  lines = []
  for name, s in summaries.items():
    if s.get('data_dependent_sigma'):
      st = s['sigma_stats']
      lines.append(
          f"{name}: sigma mean {st['mean']:.4f} (min {st['min']:.4f}, "
          f"max {st['max']:.4f}); choosing sigma cost "
          f"{s['sigma_forward_passes']} forward passes per image, "
          f"{s['sigma_forward_passes'] / s['certify_forward_passes']:.2f}x "
          f"CERTIFY's n0 + N = {s['certify_forward_passes']}.")
  for name, s in summaries.items():
    d = s.get('dual')
    if d is not None and s.get('soundness') == 'dual':
      chosen = ', '.join(f'{k}: {v}' for k, v in d['chosen'].items())
      lines.append(
          f"{name}: dual certificate at alpha_sigma {d['alpha_sigma']:g} + "
          f"alpha_c {d['alpha_c']:g}; selector smoothed at s_e = "
          f"{d['selector_sigma']:g} with {d['selector_n0']} + "
          f"{d['selector_n']} draws, abstained on "
          f"{d['selector_abstain_rate']:.1%}; sigma chosen ({chosen}); "
          f"R_sigma < R_c on {d['radius_sigma_binding']} images.")
  for name, s in summaries.items():
    m = s.get('memory')
    if m is not None and 'num_stored' in m:
      lines.append(f"{name} + memory: {m['num_stored']} stored certificates, "
                   f"{m['num_changed_this_run']} changed by the memory rule, "
                   f"union bound k * alpha = {m['union_bound']:.3g}.")
  return lines


def paired_report(
    runs: Mapping[str, Mapping[str, Any]],
    radii: Sequence[float],
    *,
    sigma0: float | None = None,
    bucket_rows: Sequence[str] | None = None,
) -> tuple[dict[str, Any], str]:
  """Runs compared with the first (the baseline) on the same images.

  Args:
    runs: by row name, in table order: ``columns`` (as from `read_tsv`),
      ``summary`` (a `summarize` dict, or a certification's summary.json
      with ``radius_cap``), and optionally ``keys`` (radius and prediction
      columns, default ``('radius', 'predict')``; ``('radius_mem',
      'predict_mem')`` for a row made sound by the memory).
    radii: radii of the paired tests.
    sigma0: the reference sigma of the sigma - sigma0 histograms (default:
      the baseline's median sigma).
    bucket_rows: the rows whose wins and losses by p_lower are reported
      (default: every row but the baseline, the "+ memory" row in place of
      the row it makes sound).

  Returns:
    ({"paired": `paired_comparison` by row, "buckets": `wins_by_bucket` by
    row (when the baseline has ``p_lower``), "sigma_minus_sigma0": quantiles
    by row whose sigma varies, "baseline"}, the Markdown text: the table of
    certified accuracy, the paired tests, and per row where it wins and
    loses by the baseline's p_lower and the distribution of sigma - sigma0).
  """
  if len(runs) < 2:
    raise errors.InputError('a paired report needs a baseline and another run')
  names = list(runs)
  base = names[0]
  keys = {n: tuple(r.get('keys', ('radius', 'predict'))) for n, r in runs.items()}
  cols = {n: r['columns'] for n, r in runs.items()}
  summaries = {n: r['summary'] for n, r in runs.items()}
  paired = {n: paired_comparison(cols[base], cols[n], radii,
                                 base_keys=keys[base], other_keys=keys[n])
            for n in names[1:]}
  caps = {n: max(summaries[base].get('radius_cap') or -np.inf,
                 summaries[n].get('radius_cap') or -np.inf) for n in paired}
  caps = {n: (None if c == -np.inf else c) for n, c in caps.items()}
  lines = [format_table(summaries), '',
           f'Paired with the baseline ({base}) on the same '
           f'{paired[names[1]]["num_examples"]} images: difference in '
           'certified accuracy [Newcombe 95% interval], discordant images '
           '(only this row : only the baseline), McNemar exact p.', '',
           format_paired(paired, caps)]
  result = {'baseline': base, 'paired': paired, 'buckets': {},
            'sigma_minus_sigma0': {}}
  if bucket_rows is None:
    bucket_rows = [n for n in names[1:] if f'{n} + memory' not in runs]
  if 'p_lower' in cols[base]:
    for n in bucket_rows:
      rows = wins_by_bucket(cols[base], cols[n], other_keys=keys[n])
      result['buckets'][n] = rows
      lines += ['', f'{n} against the baseline, by the baseline\'s p_lower '
                '(radius 0 where wrong; wins / losses: larger / smaller '
                'radius):', '', format_buckets(rows).rstrip('\n')]
  if sigma0 is None and 'sigma' in cols[base]:
    sigma0 = float(np.median(cols[base]['sigma']))
  seen = set()
  for n in names:
    sig = cols[n].get('sigma')
    if sig is None or sigma0 is None or id(cols[n]) in seen:
      continue
    seen.add(id(cols[n]))  # a "+ memory" row shares its run's sigma
    sig = np.asarray(sig, np.float64)
    if np.all(sig == sig[0]):
      continue
    d = sig - sigma0
    q = np.quantile(d, [0.0, 0.1, 0.5, 0.9, 1.0])
    result['sigma_minus_sigma0'][n] = {
        'mean': float(d.mean()), 'std': float(d.std()),
        'quantiles': {k: float(v) for k, v in zip(
            ('min', 'p10', 'median', 'p90', 'max'), q)},
        'fraction_below': float(np.mean(d < 0)),
        'fraction_above': float(np.mean(d > 0))}
    lines += ['', f'{n}: sigma - sigma0 (sigma0 = {sigma0:g}) over '
              f'{d.size} images: mean {d.mean():+.4f}, median {q[2]:+.4f}, '
              f'10%-90% [{q[1]:+.4f}, {q[3]:+.4f}], '
              f'{np.mean(d < 0):.0%} below and {np.mean(d > 0):.0%} above '
              'sigma0', ''] + histogram_lines(d)
  return result, '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# Presentation.
# ---------------------------------------------------------------------------


def default_run_names(paths: Sequence[PathLike]) -> list[str]:
  """Short unique names for runs: file stems, plus parent dirs if ambiguous.

  Args:
    paths: TSV paths.

  Returns:
    One name per path, e.g. ``noise_0.25``, or ``sigma_0.25`` for
    ``sigma_0.25/certify.tsv`` when every file has the same name.
  """
  parts = [os.path.normpath(os.path.abspath(os.fspath(p))).split(os.sep)
           for p in paths]
  parts = [p[:-1] + [os.path.splitext(p[-1])[0]] for p in parts]
  if (len(parts) > 1 and len({p[-1] for p in parts}) == 1
      and len({tuple(p) for p in parts}) == len(parts)):
    parts = [p[:-1] for p in parts]  # runs/a/certify.tsv, runs/b/certify.tsv
  depth = 1
  while True:
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names) or depth >= max(map(len, parts)):
      break
    depth += 1
  if len(set(names)) != len(names):  # The same file given twice.
    names = [f'{p[-1]}#{i}' for i, p in enumerate(parts)]
  return names


def _radius_label(r: float) -> str:
  return f'{r:g}'


def format_table(
    summaries: Mapping[str, Mapping[str, Any]],
    *,
    fmt: str = 'markdown',
    ci: bool = True,
) -> str:
  """Formats summaries as a table with one row per run.

  Columns: run name, n, certified accuracy at each radius (the union of the
  runs' radii; ``-`` where a run lacks one), ACR, abstain rate, mean time per
  example. In Markdown each accuracy reads ``0.600 [0.556, 0.643]`` (95%
  Clopper-Pearson interval, omitted with ``ci=False``), with 3 decimals, or
  ``beyond cap`` where r exceeds the summary's ``radius_cap``. In
  CSV every number is its own column (``acc@0.25``, ``ci_low@0.25``, ...).

  Args:
    summaries: `summarize` outputs by run name.
    fmt: ``'markdown'`` or ``'csv'``.
    ci: whether to include the confidence intervals.

  Returns:
    The table (Markdown is padded to align in a terminal), ending in newline.

  Raises:
    InputError: on an unknown `fmt` or no summaries.
  """
  if fmt not in ('markdown', 'csv'):
    raise errors.InputError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
  if not summaries:
    raise errors.InputError('no summaries to format')
  radii = sorted({float(r) for s in summaries.values() for r in s['radii']})

  def at(s, key, r):
    for i, sr in enumerate(s['radii']):
      if float(sr) == r:
        return s[key][i]
    return None

  if fmt == 'csv':
    header = ['name', 'n']
    for r in radii:
      header.append(f'acc@{_radius_label(r)}')
      if ci:
        header += [f'ci_low@{_radius_label(r)}', f'ci_high@{_radius_label(r)}']
    header += ['acr', 'abstain_rate', 'mean_time_s']
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(header)
    num = lambda x: '' if x is None else f'{x:.6g}'
    for name, s in summaries.items():
      row = [name, s['num_examples']]
      for r in radii:
        row.append(num(at(s, 'certified_accuracy', r)))
        if ci:
          row += [num(at(s, 'ci_low', r)), num(at(s, 'ci_high', r))]
      row += [num(s['acr']), num(s['abstain_rate']), num(s.get('mean_time_s'))]
      writer.writerow(row)
    return buf.getvalue()

  header = ['run', 'n'] + [f'r={_radius_label(r)}' for r in radii]
  header += ['ACR', 'abstain', 's/example']
  rows = []
  for name, s in summaries.items():
    row = [str(name).replace('|', '\\|'), str(s['num_examples'])]
    cap = s.get('radius_cap')
    for r in radii:
      acc = at(s, 'certified_accuracy', r)
      if acc is None:
        row.append('-')
      elif cap is not None and r > cap:
        row.append('beyond cap')
      elif ci:
        row.append(f'{acc:.3f} [{at(s, "ci_low", r):.3f}, '
                   f'{at(s, "ci_high", r):.3f}]')
      else:
        row.append(f'{acc:.3f}')
    time = s.get('mean_time_s')
    row += [f'{s["acr"]:.3f}', f'{s["abstain_rate"]:.3f}',
            '-' if time is None else f'{time:.3g}']
    rows.append(row)
  return _markdown(header, rows)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
  """A Markdown table padded to align in a terminal, ending in newline."""
  widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
  lines = []
  for j, row in enumerate([header, None] + rows):
    if row is None:
      cells = ['-' * w if j == 0 else '-' * (w - 1) + ':'
               for j, w in enumerate(widths)]
    else:
      cells = [c.ljust(w) if j == 0 else c.rjust(w)
               for j, (c, w) in enumerate(zip(row, widths))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


TABLE_NOTE = (
    'Certified accuracy at L2 radius r (fraction of examples correct with '
    'certified radius >= r) [two-sided 95% Clopper-Pearson interval]; ACR = '
    'average certified radius (abstentions and errors count as 0); abstain = '
    'fraction of abstentions; s/example = mean certification time.')


def _curve_of(name: str, value: Any) -> tuple[str, Any]:
  """Returns ('points', (radii, acc)) for a summary, ('raw', (r, c)) else."""
  if isinstance(value, Mapping):
    if 'certified_accuracy' in value:
      return 'points', (np.asarray(value['radii'], np.float64),
                        np.asarray(value['certified_accuracy'], np.float64))
    if 'radius' in value and 'correct' in value:
      return 'raw', (value['radius'], value['correct'])
    raise errors.InputError(
        f'curve {name!r}: expected a summary, columns with radius and '
        f'correct, or a (radius, correct) pair; got keys {sorted(value)}')
  try:
    radius, correct = value
  except (TypeError, ValueError):
    raise errors.InputError(
        f'curve {name!r}: expected a (radius, correct) pair') from None
  return 'raw', (radius, correct)


def plot_certified_accuracy(
    curves: Mapping[str, Any],
    path: PathLike,
    *,
    title: str | None = None,
    max_radius: float | None = None,
    num_points: int = 1000,
) -> None:
  """Plots certified accuracy against L2 radius, several runs on one plot.

  Raw curves are evaluated on ``np.linspace(0, max_radius, num_points)``,
  which draws the exact step function at screen resolution; summaries only
  hold a few radii and are drawn as markers joined by lines. The legend
  gives each run's ACR where it is known.

  Uses matplotlib's object-oriented API with the Agg canvas, without pyplot,
  so it changes no global backend (notebooks keep theirs).

  Args:
    curves: by run name, any of: a ``(radius, correct)`` pair of arrays;
      columns from `read_tsv` (uses ``radius`` and ``correct``); a
      `summarize` output.
    path: the PNG to write (atomically; directory created if missing).
    title: the plot title; default ``'Certified accuracy'``.
    max_radius: right end of the x axis; default: just past the largest
      radius of any run (1.0 if all are 0).
    num_points: grid size for raw curves.

  Raises:
    InputError: no curves, or a curve of the wrong form.
    DataError: the file cannot be written.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top

  if not curves:
    raise errors.InputError('no curves to plot')
  parsed = {name: _curve_of(name, value) for name, value in curves.items()}
  largest = 0.0
  for name, (kind, (x, y)) in parsed.items():
    if kind == 'raw':
      x = _as_1d(x, f'{name}: radius')
      x = x[np.asarray(y) == 1] if x.shape == np.shape(y) else x
    if np.size(x):
      largest = max(largest, float(np.max(x)))
  if max_radius is None:
    max_radius = 1.05 * largest if largest > 0 else 1.0
  if not max_radius > 0:
    raise errors.InputError(f'max_radius must be > 0, got {max_radius}')

  fig = Figure(figsize=(7, 4.5), dpi=150)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  grid = np.linspace(0.0, max_radius, num_points)
  for name, (kind, (x, y)) in parsed.items():
    if kind == 'raw':
      try:
        acc = certified_accuracy(x, y, grid)
      except errors.InputError as e:
        raise errors.InputError(f'curve {name!r}: {e}') from None
      acr = float(np.mean(np.asarray(y, np.float64) *
                          np.asarray(x, np.float64)))
      ax.plot(grid, acc, label=f'{name} (ACR {acr:.3f})', linewidth=1.6)
    else:
      keep = x <= max_radius
      label = name
      summary = curves[name]
      if isinstance(summary, Mapping) and 'acr' in summary:
        label = f'{name} (ACR {summary["acr"]:.3f})'
      ax.plot(x[keep], y[keep], marker='o', label=label, linewidth=1.6)
  ax.set_xlim(0.0, max_radius)
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel('L2 radius (in [0,1] pixel space)')
  ax.set_ylabel('Certified accuracy')
  ax.set_title(title if title is not None else 'Certified accuracy')
  ax.grid(True, alpha=0.3)
  ax.legend(loc='upper right', fontsize='small')
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  _atomic_write(os.fspath(path), buf.getvalue())

