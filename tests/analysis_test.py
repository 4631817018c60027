"""Tests of dds_jax.analysis and launch.analyze."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from dds_jax import analysis
from dds_jax import errors

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
PEERS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                     'peers', 'cohen2019-cifar10-resnet110')
SIGMAS = ('0.12', '0.25', '0.50', '1.00')

# Published in Cohen et al. (2019) / the repository's summary (3 decimals).
PUBLISHED = {
    '0.25': {'radii': (0.0, 0.25, 0.5, 0.75),
             'acc': (0.748, 0.600, 0.428, 0.266), 'acr': 0.429},
    '0.50': {'radii': (0.0, 0.25, 0.5, 0.75, 1.0),
             'acc': (0.652, 0.546, 0.414, 0.320, 0.234), 'acr': 0.538},
}

HEADER = 'idx\tlabel\tpredict\tradius\tcorrect\ttime\n'


def peer(sigma: str) -> str:
  path = os.path.join(PEERS, f'noise_{sigma}.tsv')
  if not os.path.exists(path):
    pytest.skip(f'peer file {path} absent')
  return path


def write(path, text: str) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


# ---------------------------------------------------------------------------
# Reading the peer files.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('sigma', SIGMAS)
def test_reads_peer_file_as_is(sigma):
  columns = analysis.read_tsv(peer(sigma))
  assert list(columns) == list(analysis.REQUIRED_COLUMNS)
  assert all(len(c) == 500 for c in columns.values())
  for name in ('idx', 'label', 'predict', 'correct'):
    assert columns[name].dtype == np.int64
  assert columns['radius'].dtype == np.float64
  assert columns['time'].dtype == np.float64
  np.testing.assert_array_equal(columns['idx'], np.arange(0, 10000, 20))
  # Abstentions have radius 0 and are not correct.
  abstain = columns['predict'] == -1
  assert np.all(columns['radius'][abstain] == 0)
  assert np.all(columns['correct'][abstain] == 0)
  np.testing.assert_array_equal(
      columns['correct'], columns['predict'] == columns['label'])
  assert np.all((columns['time'] > 1) & (columns['time'] < 60))


def test_time_formats():
  # noise_0.12 uses H:MM:SS.ffffff, noise_0.25 seconds as floats.
  t12 = analysis.read_tsv(peer('0.12'))['time']
  t25 = analysis.read_tsv(peer('0.25'))['time']
  assert t12[0] == pytest.approx(13.736080)
  assert t25[0] == pytest.approx(15.4)
  assert analysis.parse_duration('1:02:03.5') == pytest.approx(3723.5)
  assert analysis.parse_duration('1 day, 0:00:01') == pytest.approx(86401)
  assert analysis.parse_duration('2 days, 0:00:00') == pytest.approx(172800)
  with pytest.raises(ValueError):
    analysis.parse_duration('12 s')


@pytest.mark.parametrize('sigma', sorted(PUBLISHED))
def test_peer_file_reproduces_published_summary(sigma):
  published = PUBLISHED[sigma]
  summary = analysis.summarize(peer(sigma), published['radii'])
  # What the 500 rows give exactly (counts out of 500).
  expected_counts = {'0.25': [374, 300, 214, 133],
                     '0.50': [326, 273, 207, 160, 117]}[sigma]
  assert summary['num_certified'] == expected_counts
  np.testing.assert_allclose(summary['certified_accuracy'],
                             np.array(expected_counts) / 500)
  # ... agrees with the published numbers to their 3 decimals.
  np.testing.assert_allclose(summary['certified_accuracy'], published['acc'],
                             atol=1e-3)
  assert summary['acr'] == pytest.approx(published['acr'], abs=1e-3)
  assert summary['clean_accuracy'] == summary['certified_accuracy'][0]
  assert summary['num_examples'] == 500
  assert summary['path'] == peer(sigma)
  json.dumps(summary)  # JSON-serialisable.


def test_peer_summaries_exact():
  s25 = analysis.summarize(peer('0.25'))
  assert s25['acr'] == pytest.approx(0.42888364, abs=1e-8)
  assert s25['abstain_rate'] == pytest.approx(0.086)
  s100 = analysis.summarize(peer('1.00'), (0.0, 1.0, 2.0, 3.0))
  np.testing.assert_allclose(s100['certified_accuracy'],
                             [0.472, 0.216, 0.100, 0.020])
  assert s100['abstain_rate'] == pytest.approx(0.29)
  s12 = analysis.summarize(peer('0.12'), (0.0, 0.25, 0.5))
  np.testing.assert_allclose(s12['certified_accuracy'], [0.814, 0.586, 0.0])
  assert s12['mean_time_s'] == pytest.approx(14.1, abs=0.1)


# ---------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------


def test_certified_accuracy_boundaries():
  radius = np.array([0.0, 0.25, 0.5, 1.0, 0.75])
  correct = np.array([0, 1, 1, 1, 0])
  acc = analysis.certified_accuracy(radius, correct, [0.0, 0.25, 0.26, 1.0,
                                                      1.01])
  np.testing.assert_allclose(acc, [0.6, 0.6, 0.4, 0.2, 0.0])
  # Same as the definition, on random data.
  rng = np.random.default_rng(0)
  radius = rng.exponential(0.5, 1000) * (rng.random(1000) < 0.9)
  correct = (rng.random(1000) < 0.7).astype(int)
  grid = np.linspace(0, 3, 77)
  brute = [np.mean((correct == 1) & (radius >= r)) for r in grid]
  np.testing.assert_allclose(
      analysis.certified_accuracy(radius, correct, grid), brute)
  with pytest.raises(errors.InputError):
    analysis.certified_accuracy([], [], [0.0])
  with pytest.raises(errors.InputError):
    analysis.certified_accuracy([1.0, -0.5], [1, 1], [0.0])


def test_clopper_pearson_matches_scipy_binomtest():
  rng = np.random.default_rng(1)
  n = rng.integers(1, 2000, size=40)
  k = np.minimum(rng.integers(0, 2000, size=40), n)
  k[:5] = 0
  k[5:10] = n[5:10]
  n[10], k[10] = 1, 0
  n[11], k[11] = 1, 1
  lo, hi = analysis.clopper_pearson_interval(k, n)
  assert lo.shape == hi.shape == (40,)
  for i in range(40):
    ref = stats.binomtest(int(k[i]), int(n[i])).proportion_ci(
        0.95, method='exact')
    assert lo[i] == pytest.approx(ref.low, abs=1e-10)
    assert hi[i] == pytest.approx(ref.high, abs=1e-10)
  assert np.all(lo[:5] == 0) and np.all(hi[5:10] == 1)
  # Scalars give floats; other levels agree too.
  lo, hi = analysis.clopper_pearson_interval(300, 500, level=0.99)
  ref = stats.binomtest(300, 500).proportion_ci(0.99, method='exact')
  assert isinstance(lo, float) and isinstance(hi, float)
  assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-10)


@pytest.mark.parametrize('k,n,level', [(-1, 5, 0.95), (6, 5, 0.95),
                                       (0, 0, 0.95), (1.5, 5, 0.95),
                                       (1, 5, 1.0)])
def test_clopper_pearson_rejects_bad_input(k, n, level):
  with pytest.raises(errors.InputError):
    analysis.clopper_pearson_interval(k, n, level)


def test_summarize_alternative_columns():
  columns = {
      'idx': np.arange(4), 'label': np.array([1, 2, 3, 4]),
      'predict': np.array([1, 2, -1, 0]),
      'radius': np.array([0.5, 0.3, 0.0, 0.2]),
      'correct': np.array([1, 1, 0, 0]),
      'predict_mem': np.array([1, -1, 3, 4]),
      'radius_mem': np.array([0.4, 0.0, 0.1, 0.6]),
  }
  base = analysis.summarize(columns, (0.0, 0.35))
  assert base['certified_accuracy'] == [0.5, 0.25]
  assert base['abstain_rate'] == 0.25
  assert base['acr'] == pytest.approx(0.2)
  assert base['mean_time_s'] is None
  mem = analysis.summarize(columns, (0.0, 0.35), radius_key='radius_mem',
                           predict_key='predict_mem')
  # correct_mem = predict_mem == label: rows 0, 2, 3.
  assert mem['certified_accuracy'] == [0.75, 0.5]
  assert mem['abstain_rate'] == 0.25
  assert mem['acr'] == pytest.approx((0.4 + 0.1 + 0.6) / 4)
  with pytest.raises(errors.InputError, match='radius_x'):
    analysis.summarize(columns, radius_key='radius_x')


# ---------------------------------------------------------------------------
# Writing, round trip, malformed files.
# ---------------------------------------------------------------------------


def test_write_read_round_trip_with_extra_columns(tmp_path):
  path = tmp_path / 'sub' / 'certify.tsv'
  columns = {
      'idx': [0, 20, 40], 'label': [3, 7, 4], 'predict': [3, -1, 5],
      'radius': np.array([0.378123456, 0.0, 1.0]),
      'correct': np.array([1, 0, 0]), 'time': [15.4, 0.25, 3723.5],
      'sigma': [0.25, 0.25, 0.25], 'p_lower': np.float32([0.9, 0.5, 0.99]),
      'predict_mem': [3, 3, -1], 'radius_mem': [0.1, 0.2, 0.0],
      'changed': np.array([False, True, True]), 'note': ['a', 'b c', 'd'],
  }
  order = list(columns)
  analysis.write_tsv(path, columns, order)
  back = analysis.read_tsv(path)
  assert list(back) == order
  for name in ('idx', 'label', 'predict', 'correct', 'predict_mem'):
    np.testing.assert_array_equal(back[name], columns[name])
    assert back[name].dtype == np.int64
  np.testing.assert_allclose(back['radius'], columns['radius'], rtol=5e-6)
  assert back['radius'][2] == 1.0
  for name in ('time', 'sigma', 'radius_mem'):
    np.testing.assert_allclose(back[name], columns[name], rtol=5e-6)
    assert back[name].dtype == np.float64
  np.testing.assert_allclose(back['p_lower'], columns['p_lower'], rtol=5e-6)
  np.testing.assert_array_equal(back['changed'], [0, 1, 1])  # Bools as 1/0.
  assert list(back['note']) == ['a', 'b c', 'd']
  # Float columns stay floats even when every value is integral.
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  assert lines[0].split('\t') == order
  assert lines[3].split('\t')[3] == '1.0'
  # No temporary files left behind.
  assert sorted(os.listdir(path.parent)) == ['certify.tsv']


def test_write_lossless_and_default_order(tmp_path):
  path = tmp_path / 'x.tsv'
  rng = np.random.default_rng(2)
  columns = {'extra': rng.random(5), 'radius': rng.random(5),
             'correct': [1, 0, 1, 1, 0], 'predict': [1, 2, 3, 4, 5],
             'label': [1, 0, 3, 4, 0], 'idx': np.arange(5),
             'time': np.full(5, 1.5)}
  analysis.write_tsv(path, columns, float_format=None)
  back = analysis.read_tsv(path)
  assert list(back) == list(analysis.REQUIRED_COLUMNS) + ['extra']
  np.testing.assert_array_equal(back['radius'], columns['radius'])
  np.testing.assert_array_equal(back['extra'], columns['extra'])


def test_write_errors(tmp_path):
  with pytest.raises(errors.InputError, match='not in'):
    analysis.write_tsv(tmp_path / 'a.tsv', {'idx': [1]}, ['idx', 'radius'])
  with pytest.raises(errors.InputError, match='length'):
    analysis.write_tsv(tmp_path / 'a.tsv', {'a': [1], 'b': [1, 2]}, ['a', 'b'])
  with pytest.raises(errors.InputError, match='tab'):
    analysis.write_tsv(tmp_path / 'a.tsv', {'a': ['x\ty']}, ['a'])
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('body,line,what', [
    ('idx\tlabel\tpredict\tradius\ttime\n0\t1\t1\t0.5\t1.0\n', 1, 'correct'),
    (HEADER + '0\t1\t1\t0.5\t1\t1.0\n1\t1\t1\tabc\t1\t1.0\n', 3, 'abc'),
    (HEADER + '0\t1\t1\t0.5\t1\t1.0\n1\t1\t1\t0.5\t1\n', 3, 'fields'),
    (HEADER + '0\t1\tcat\t0.5\t1\t1.0\n', 2, 'predict'),
    (HEADER + '0\t1\t1\t0.5\t2\t1.0\n', 2, '0 or 1'),
    (HEADER + '0\t1\t1\t-0.5\t1\t1.0\n', 2, '>= 0'),
    (HEADER + '0\t1\t1\tnan\t1\t1.0\n', 2, 'finite'),
    (HEADER + '\n0\t1\t1\t0.5\t1\tyesterday\n', 3, 'time'),
    (HEADER.replace('time', 'radius'), 1, 'duplicate'),
    ('idx label predict radius correct time\n0 1 1 0.5 1 1.0\n', 1,
     'tab-separated'),
])
def test_malformed_file_names_file_and_line(tmp_path, body, line, what):
  path = write(tmp_path / 'bad.tsv', body)
  with pytest.raises(errors.InputError) as info:
    analysis.read_tsv(path)
  message = str(info.value)
  assert f'{path}:{line}:' in message
  assert what in message


def test_empty_and_missing_files(tmp_path):
  with pytest.raises(errors.InputError, match='empty'):
    analysis.read_tsv(write(tmp_path / 'empty.tsv', '\n'))
  with pytest.raises(errors.DataError, match='no such file'):
    analysis.read_tsv(tmp_path / 'missing.tsv')
  with pytest.raises(errors.DataError):
    analysis.summarize(str(tmp_path / 'missing.tsv'))
  with pytest.raises(errors.DataError, match='directory'):
    analysis.read_tsv(tmp_path)
  # A header alone reads as zero rows, which cannot be summarised.
  header_only = write(tmp_path / 'h.tsv', HEADER)
  assert all(len(c) == 0 for c in analysis.read_tsv(header_only).values())
  with pytest.raises(errors.InputError, match='h.tsv'):
    analysis.summarize(header_only)


def test_crlf_and_extra_column_inference(tmp_path):
  path = write(tmp_path / 'crlf.tsv',
               'idx\tlabel\tpredict\tradius\tcorrect\ttime\tflag\tname\r\n'
               '0\t1\t1\t0.5\t1\t0:00:01.5\tTrue\tx\r\n')
  columns = analysis.read_tsv(path)
  assert columns['time'][0] == 1.5
  assert columns['flag'].dtype == bool and columns['flag'][0]
  assert columns['name'][0] == 'x'


# ---------------------------------------------------------------------------
# Presentation.
# ---------------------------------------------------------------------------


def test_format_table():
  summaries = {
      'a': analysis.summarize(peer('0.25'), (0.0, 0.25)),
      'b': analysis.summarize(peer('0.50'), (0.25, 1.0)),
  }
  md = analysis.format_table(summaries)
  lines = md.splitlines()
  assert len(lines) == 4
  assert 'r=0.25' in lines[0] and 'ACR' in lines[0]
  assert '0.600 [0.556, 0.643]' in lines[2]
  assert '0.429' in lines[2]
  assert lines[3].split('|')[3].strip() == '-'  # b has no r=0.
  assert len({len(line) for line in lines}) == 1  # Aligned.
  short = analysis.format_table(summaries, ci=False)
  assert '[' not in short and '0.600' in short
  csv_text = analysis.format_table(summaries, fmt='csv')
  rows = [r.split(',') for r in csv_text.splitlines()]
  assert rows[0][:5] == ['name', 'n', 'acc@0', 'ci_low@0', 'ci_high@0']
  assert rows[1][0] == 'a' and float(rows[1][5]) == 0.6
  with pytest.raises(errors.InputError):
    analysis.format_table(summaries, fmt='html')


def test_default_run_names():
  names = analysis.default_run_names(['x/noise_0.25.tsv', 'y/noise_0.5.tsv'])
  assert names == ['noise_0.25', 'noise_0.5']
  names = analysis.default_run_names(['a/s1/certify.tsv', 'b/s1/certify.tsv'])
  assert names == ['a/s1', 'b/s1']
  names = analysis.default_run_names(['r/fixed/certify.tsv', 'r/ds/certify.tsv'])
  assert names == ['fixed', 'ds']
  names = analysis.default_run_names(['a/c.tsv', 'a/c.tsv'])
  assert names == ['c#0', 'c#1']


def test_plot(tmp_path):
  columns = analysis.read_tsv(peer('0.25'))
  path = tmp_path / 'plot.png'
  analysis.plot_certified_accuracy(
      {'columns': columns,
       'pair': (columns['radius'] * 0.5, columns['correct']),
       'summary': analysis.summarize(columns)},
      path, title='t')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(errors.InputError):
    analysis.plot_certified_accuracy({'bad': 3}, tmp_path / 'b.png')
  with pytest.raises(errors.InputError):
    analysis.plot_certified_accuracy({}, tmp_path / 'b.png')


# ---------------------------------------------------------------------------
# The launcher, end to end.
# ---------------------------------------------------------------------------


def run_analyze(*args):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  return subprocess.run(
      [sys.executable, '-m', 'launch.analyze', *map(str, args)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)


def test_launcher_end_to_end(tmp_path):
  out = tmp_path / 'out'
  result = run_analyze(peer('0.25'), peer('0.50'), '--radii=0,0.25,0.5,1',
                       f'--out={out}')
  assert result.returncode == 0, result.stderr
  assert '| noise_0.25 |' in result.stdout
  assert '0.600 [0.556, 0.643]' in result.stdout
  assert '| noise_0.50 |' in result.stdout
  assert 'Traceback' not in result.stderr
  with open(out / 'certified_accuracy.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(out / 'summary_table.md', encoding='utf-8') as f:
    assert '0.600 [0.556, 0.643]' in f.read()
  with open(out / 'analysis.json', encoding='utf-8') as f:
    summary = json.load(f)
  assert summary['noise_0.50']['certified_accuracy'][3] == pytest.approx(0.234)

  result = run_analyze(peer('0.25'), '--format=csv', '--names=x',
                       f'--out={out}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('name,n,acc@0,')
  assert (out / 'summary_table.csv').exists()


@pytest.mark.parametrize('args,what', [
    (['{missing}'], 'no such file'),
    (['{peer}', '--radii=0,a'], '--radii'),
    (['{peer}', '--names=a,b'], '--names'),
    (['{bad}'], 'bad.tsv:2:'),
])
def test_launcher_errors_are_one_line(tmp_path, args, what):
  bad = write(tmp_path / 'bad.tsv', HEADER + '0\t1\t1\tx\t1\t1\n')
  args = [a.format(missing=tmp_path / 'missing.tsv', peer=peer('0.25'),
                   bad=bad) for a in args]
  result = run_analyze(*args, f'--out={tmp_path}')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('analyze: error: ') and what in lines[0]
  assert not (tmp_path / 'certified_accuracy.png').exists()


def _run(ids, radius, correct):
  ids = np.asarray(ids)
  correct = np.asarray(correct)
  return {'idx': ids, 'label': np.zeros(ids.size, int),
          'predict': np.where(correct == 1, 0, 1), 'radius':
          np.asarray(radius, float), 'correct': correct}


def test_paired_comparison_counts_discordant_images_by_id():
  base = _run([0, 1, 2, 3, 4], [0.3, 0.6, 0.0, 0.2, 0.9], [1, 1, 0, 1, 1])
  # The same images in another order; image 2 wrong in base, right here.
  other = _run([4, 3, 2, 1, 0], [0.1, 0.7, 0.55, 0.6, 0.3], [1, 1, 1, 0, 1])
  c = analysis.paired_comparison(base, other, [0.0, 0.25, 0.5])
  # r = 0: base right on 0,1,3,4; other right on 0,2,3,4.
  assert (c['only_other'][0], c['only_base'][0], c['both'][0]) == (1, 1, 3)
  # r = 0.25: base {0,1,4}; other {0,2,3}.
  assert (c['only_other'][1], c['only_base'][1], c['both'][1]) == (2, 2, 1)
  # r = 0.5: base {1,4}; other {2,3}.
  assert (c['only_other'][2], c['only_base'][2], c['neither'][2]) == (2, 2, 1)
  assert c['difference'] == pytest.approx([0.0, 0.0, 0.0])
  assert c['p_value'][2] == pytest.approx(stats.binomtest(2, 4).pvalue)
  for lo, d, hi in zip(c['ci_low'], c['difference'], c['ci_high']):
    assert lo < d < hi
  with pytest.raises(errors.InputError, match='different examples'):
    analysis.paired_comparison(base, _run([0, 1, 2, 3, 5], [0] * 5, [0] * 5))


def test_paired_table_and_radius_cap_marks():
  base = _run(range(40), [0.5] * 30 + [0.0] * 10, [1] * 30 + [0] * 10)
  other = _run(range(40), [0.6] * 38 + [0.0] * 2, [1] * 38 + [0] * 2)
  c = analysis.paired_comparison(base, other, [0.25, 1.0])
  assert c['only_other'][0] == 8 and c['only_base'][0] == 0
  text = analysis.format_paired({'other': c}, {'other': 0.8})
  assert '+0.200 [' in text and '8:0' in text
  assert f"p={stats.binomtest(8, 8).pvalue:.2g}" in text
  assert 'beyond cap' in text.splitlines()[-1].split('|')[-2]
  s = analysis.summarize(base, [0.25, 1.0])
  assert '0.000 [' in analysis.format_table({'b': s})  # no cap: a zero
  s['radius_cap'] = 0.8
  row = analysis.format_table({'b': s}).splitlines()[-1]
  assert row.count('beyond cap') == 1 and '0.750 [' in row


def test_wins_by_bucket_of_the_baseline_p_lower():
  base = _run(range(6), [0.0, 0.1, 0.5, 0.6, 0.8, 0.8], [0, 1, 1, 1, 1, 1])
  base['p_lower'] = np.array([0.3, 0.6, 0.95, 0.995, 0.9993, 0.9993])
  base['sigma'] = np.full(6, 0.25)
  # Listed in another order: ids 5..0.
  other = _run([5, 4, 3, 2, 1, 0], [0.9, 0.5, 0.7, 0.5, 0.0, 0.2],
               [1, 1, 1, 1, 0, 1])
  other['sigma'] = np.array([0.3, 0.15, 0.2, 0.25, 0.3, 0.3])
  rows = analysis.wins_by_bucket(base, other)
  assert [r['n'] for r in rows] == [1, 1, 1, 1, 2]
  # id 0: base wrong (0), other 0.2: a win; id 1: other wrong: a loss; id 2
  # ties; id 3: 0.7 > 0.6; ids 4, 5: 0.5 < 0.8 and 0.9 > 0.8.
  assert [(r['wins'], r['losses']) for r in rows] == [
      (1, 0), (0, 1), (0, 0), (1, 0), (1, 1)]
  assert rows[-1]['mean_radius_base'] == pytest.approx(0.8)
  assert rows[-1]['mean_radius_other'] == pytest.approx(0.7)
  assert rows[-1]['mean_sigma_other'] == pytest.approx(0.225)
  del base['p_lower']
  with pytest.raises(errors.InputError, match='p_lower'):
    analysis.wins_by_bucket(base, other)


def _certify_dir(root, name, radius, correct, sigma, *, memory=None, cap=None):
  """A certification's TSV (and summary.json when cap is given) in root/name."""
  d = root / name
  d.mkdir()
  cols = _run(range(len(radius)), radius, correct)
  cols['time'] = np.ones(len(radius))
  cols['sigma'] = np.asarray(sigma, float)
  cols['p_lower'] = np.linspace(0.4, 0.9995, len(radius))
  if memory is not None:
    cols['predict_mem'] = np.where(np.asarray(memory) > 0, 0, -1)
    cols['radius_mem'] = np.asarray(memory, float)
    cols['changed'] = np.zeros(len(radius), int)
  analysis.write_tsv(d / 'certify.tsv', cols)
  if cap is not None:
    summary = {'n0': 10, 'radius_cap': cap, 'data_dependent_sigma': memory
               is not None, 'sigma_stats': {'mean': float(np.mean(sigma)),
                                            'min': 0.0, 'max': 1.0},
               'sigma_forward_passes': 40, 'certify_forward_passes': 110}
    if memory is not None:
      summary['memory'] = {'num_stored': 12, 'num_changed_this_run': 0,
                           'union_bound': 0.012}
    write(d / 'summary.json', json.dumps(summary))
  return str(d / 'certify.tsv')


def test_paired_report_sections_and_sigma_distribution():
  base = _run(range(8), [0.5] * 6 + [0.0] * 2, [1] * 6 + [0] * 2)
  base['p_lower'] = np.full(8, 0.95)
  base['sigma'] = np.full(8, 0.25)
  other = _run(range(8), [0.6] * 8, [1] * 8)
  other['sigma'] = np.array([0.2] * 6 + [0.3, 0.35])
  result, text = analysis.paired_report(
      {'base': {'columns': base, 'summary': analysis.summarize(base, [0.5])},
       'other': {'columns': other,
                 'summary': analysis.summarize(other, [0.5])}}, [0.5])
  assert result['paired']['other']['only_other'] == [2]
  assert result['buckets']['other'][2]['wins'] == 8   # all in [0.9, 0.99)
  d = result['sigma_minus_sigma0']['other']            # sigma0: base median
  assert d['fraction_below'] == 0.75 and d['quantiles']['max'] == (
      pytest.approx(0.1))
  assert 'base' not in result['sigma_minus_sigma0']   # constant sigma
  assert 'McNemar' in text and "by the baseline's p_lower" in text
  assert '75% below' in text
  with pytest.raises(errors.InputError, match='baseline'):
    analysis.paired_report({'base': {'columns': base, 'summary': {}}}, [0.5])


def test_launcher_paired_adds_memory_rows_and_reads_summaries(tmp_path):
  base = _certify_dir(tmp_path, 'fixed', [0.5] * 10 + [0.0] * 2,
                      [1] * 10 + [0] * 2, [0.25] * 12, cap=0.8)
  ds = _certify_dir(tmp_path, 'grid', [0.9] * 12, [1] * 12,
                    [0.3] * 6 + [0.2] * 6, memory=[0.9] * 11 + [0.0], cap=0.85)
  before = open(os.path.join(tmp_path, 'grid', 'summary.json')).read()
  out = tmp_path / 'out'
  result = run_analyze(base, ds, '--paired', '--radii=0,0.5,1',
                       f'--out={out}')
  assert result.returncode == 0, result.stderr
  comp = json.load(open(out / 'comparison.json'))
  assert list(comp['paired']) == ['grid', 'grid + memory']
  i = comp['paired']['grid']['radii'].index(0.5)
  assert comp['paired']['grid']['only_other'][i] == 2
  assert comp['paired']['grid + memory']['only_other'][i] == 1
  assert list(comp['buckets']) == ['grid + memory']  # the sound row only
  text = open(out / 'comparison.md').read()
  assert 'beyond cap' in text                         # r = 1 > 0.85
  assert '0.36x' in text and '12 stored certificates' in text
  assert open(os.path.join(tmp_path, 'grid', 'summary.json')).read() == before
  result = run_analyze(base, '--paired', f'--out={out}')
  assert result.returncode == 1 and '--paired' in result.stderr
