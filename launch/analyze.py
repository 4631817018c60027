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
* ``analysis.json``: the `dds_jax.analysis.summarize` dicts by run name;
* with --paired, ``comparison.md`` and ``comparison.json``: every run
  against the first on the same images (`dds_jax.analysis.paired_report`:
  McNemar's exact test, Newcombe's interval of the difference, wins and
  losses by the first run's p_lower, sigma - sigma0), a "+ memory" row for
  each TSV with the memory's columns, and the radius cap, sigma cost and
  memory counts from the certification's ``summary.json`` beside each TSV
  where there is one (read, never written).

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
_PAIRED = flags.DEFINE_bool(
    'paired', False, 'Compare every TSV with the first (the baseline) on the '
    'same images: comparison.md and comparison.json in --out.')
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

  columns, summaries, certified = {}, {}, {}
  for name, path in zip(names, paths):
    columns[name] = analysis.read_tsv(path)
    summaries[name] = analysis.summarize(
        columns[name], radii, radius_key=_RADIUS_KEY.value,
        predict_key=_PREDICT_KEY.value)
    summaries[name]['path'] = path
    certified[name] = _certify_summary(path)
    if certified[name] is not None:
      summaries[name]['radius_cap'] = certified[name].get('radius_cap')

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
  if _PAIRED.value:
    for name in names:
      if 'radius_mem' in columns[name]:
        curves[f'{name} + memory'] = analysis.radius_and_correct(
            columns[name], radius_key='radius_mem', predict_key='predict_mem')
  plot_path = os.path.join(out, 'certified_accuracy.png')
  analysis.plot_certified_accuracy(
      curves, plot_path, title=_TITLE.value, max_radius=_MAX_RADIUS.value)
  if _FORMAT.value == 'markdown':
    table_path = os.path.join(out, 'summary_table.md')
    analysis.write_text(table_path, table + '\n' + analysis.TABLE_NOTE + '\n')
  else:
    table_path = os.path.join(out, 'summary_table.csv')
    analysis.write_text(table_path, table)
  json_path = os.path.join(out, 'analysis.json')
  analysis.write_text(json_path, json.dumps(summaries, indent=2) + '\n')
  print(f'\nwrote {plot_path}, {table_path}, {json_path}', file=sys.stderr)
  if _PAIRED.value:
    _paired(names, columns, summaries, certified, radii, out)


def _certify_summary(tsv_path: str):
  """The certification's summary.json beside a TSV, or None."""
  path = os.path.join(os.path.dirname(os.path.abspath(tsv_path)),
                      analysis.CERTIFY_SUMMARY)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.InputError(f'{path}: {e}') from None
  return summary if isinstance(summary, dict) and 'n0' in summary else None


def _paired(names, columns, summaries, certified, radii, out) -> None:
  """comparison.md / .json: each run against the first, memory rows added."""
  if len(names) < 2:
    raise errors.ConfigError('--paired: give the baseline TSV and at least '
                             'one more')
  runs = {}
  keys = (_RADIUS_KEY.value, _PREDICT_KEY.value)
  for name in names:
    runs[name] = {'columns': columns[name], 'summary': summaries[name],
                  'keys': keys}
    if keys == ('radius', 'predict') and 'radius_mem' in columns[name]:
      mem = analysis.summarize(columns[name], radii, radius_key='radius_mem',
                               predict_key='predict_mem')
      mem['radius_cap'] = summaries[name].get('radius_cap')
      runs[f'{name} + memory'] = {'columns': columns[name], 'summary': mem,
                                  'keys': ('radius_mem', 'predict_mem')}
  result, text = analysis.paired_report(runs, radii)
  notes = analysis.certify_notes(
      {n: s for n, s in certified.items() if s is not None})
  text += '\n'.join(notes) + ('\n' if notes else '')
  print('\n' + text, end='')
  md = os.path.join(out, 'comparison.md')
  analysis.write_text(md, text + '\n' + analysis.TABLE_NOTE + '\n')
  analysis.write_text(os.path.join(out, 'comparison.json'),
                      json.dumps(result, indent=2) + '\n')
  print(f'wrote {md}', file=sys.stderr)


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
