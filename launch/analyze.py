r"""Summarises certification TSVs: a table on stdout, a plot and files on disk.

Usage::

  python -m launch.analyze RUN1.tsv [RUN2.tsv ...] [--radii=0,0.25,0.5]
      [--out=DIR] [--names=a,b] [--format=markdown|csv] [--noci]
      [--radius_key=radius_mem --predict_key=predict_mem]

Prints one row per TSV (certified accuracy at each radius with its 95%
Clopper-Pearson interval, ACR, abstain rate, time per example) and writes
into --out:

* ``certified_accuracy.png``: certified accuracy against L2 radius, all runs;
* ``summary_table.md`` (or ``summary_table.csv`` with --format=csv);
* ``summary.json``: the `dds_jax.analysis.summarize` dicts by run name.

--out defaults to the directory of the first TSV, so that the summary lands
beside the results it describes (``runs/EXP/certify.tsv`` ->
``runs/EXP/certified_accuracy.png``); pass --out for read-only or shared
inputs. Run names default to the file names without ``.tsv`` (with parent
directories added where that is ambiguous).

Errors in the inputs (missing file, malformed TSV, bad flag value) print one
line to stderr and exit with status 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags

from dds_jax import analysis
from dds_jax import distributed
from dds_jax import errors
from launch import multihost

_RADII = flags.DEFINE_list(
    'radii', [f'{r:g}' for r in analysis.DEFAULT_RADII],
    'Comma-separated L2 radii at which to report certified accuracy.')
_OUT = flags.DEFINE_string(
    'out', None, 'Output directory (default: directory of the first TSV).')
_NAMES = flags.DEFINE_list(
    'names', None, 'Comma-separated run names, one per TSV (default: from '
    'the file names).')
_FORMAT = flags.DEFINE_enum(
    'format', 'markdown', ['markdown', 'csv'], 'Table format.')
_CI = flags.DEFINE_bool(
    'ci', True, 'Show 95% Clopper-Pearson intervals in the table.')
_RADIUS_KEY = flags.DEFINE_string(
    'radius_key', 'radius', 'Radius column to summarise (e.g. radius_mem).')
_PREDICT_KEY = flags.DEFINE_string(
    'predict_key', 'predict',
    'Prediction column (e.g. predict_mem); correctness is derived from it '
    'and the label when it is not "predict".')
_TITLE = flags.DEFINE_string('title', None, 'Plot title.')
_MAX_RADIUS = flags.DEFINE_float(
    'max_radius', None, 'Right end of the plot x axis (default: automatic).')


def _parse_radii(values: Sequence[str]) -> list[float]:
  try:
    radii = [float(v) for v in values if v.strip()]
  except ValueError:
    raise errors.ConfigError(
        f'--radii: expected comma-separated numbers, got {",".join(values)}'
    ) from None
  if not radii or any(not r >= 0 for r in radii):
    raise errors.ConfigError(f'--radii: need numbers >= 0, got {radii}')
  return radii


def run(paths: Sequence[str]) -> None:
  """Summarises `paths` as the flags say; raises DdsError on bad input."""
  radii = _parse_radii(_RADII.value)
  names = _NAMES.value or analysis.default_run_names(paths)
  if len(names) != len(paths):
    raise errors.ConfigError(
        f'--names: {len(names)} name(s) for {len(paths)} TSV file(s)')
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'--names: names must be distinct, got {names}')

  columns, summaries = {}, {}
  for name, path in zip(names, paths):
    columns[name] = analysis.read_tsv(path)
    summaries[name] = analysis.summarize(
        columns[name], radii, radius_key=_RADIUS_KEY.value,
        predict_key=_PREDICT_KEY.value)
    summaries[name]['path'] = path

  table = analysis.format_table(summaries, fmt=_FORMAT.value, ci=_CI.value)
  print(table, end='')
  if _FORMAT.value == 'markdown':
    print('\n' + analysis.TABLE_NOTE)

  out = _OUT.value or os.path.dirname(os.path.abspath(paths[0]))
  curves = {
      name: analysis.radius_and_correct(
          columns[name], radius_key=_RADIUS_KEY.value,
          predict_key=_PREDICT_KEY.value)
      for name in names
  }
  plot_path = os.path.join(out, 'certified_accuracy.png')
  analysis.plot_certified_accuracy(
      curves, plot_path, title=_TITLE.value, max_radius=_MAX_RADIUS.value)
  if _FORMAT.value == 'markdown':
    table_path = os.path.join(out, 'summary_table.md')
    analysis.write_text(table_path, table + '\n' + analysis.TABLE_NOTE + '\n')
  else:
    table_path = os.path.join(out, 'summary_table.csv')
    analysis.write_text(table_path, table)
  json_path = os.path.join(out, 'summary.json')
  analysis.write_text(json_path, json.dumps(summaries, indent=2) + '\n')
  print(f'\nwrote {plot_path}, {table_path}, {json_path}', file=sys.stderr)


def main(argv: Sequence[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more certification TSV files')
  try:
    multihost.maybe_initialize()
    # The same command on every host: one writes. Without --multihost JAX's
    # backends are never started (no device is needed to read TSV files).
    if not multihost.MULTIHOST.value or distributed.is_main():
      run(paths)
  except errors.DdsError as e:
    print(f'analyze: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
