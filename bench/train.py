r"""Training throughput of `dds_jax.train.make_train_step` (img/s per method).

Usage (from the repository root)::

  PYTHONPATH=. python bench/train.py [--quick] [--models=small_cnn,resnet18]
      [--methods=gaussian,smoothadv,macer] [--reps=3] [--skip_devices]
      [--skip_heavy_ds] [--resnet_ds_all_methods] [--rep_seconds=1.0]
      [--out=bench/results/train.json]

For every case (model, input shape, method, data-dependent sigma setting) it
builds the config in code from `dds_jax/configs/cifar10.py` (32x32x3: ResNet-18,
or `small` for the small CNN with its default widths, crop 4 + flip) or
`dds_jax/configs/digits.py` (8x8x1: small CNN (16, 32, 32), crop 1), sets
`train.method`, `train.batch_size`, `train.num_noise` and `train.ds.*`, and
times the jitted step of `make_train_step(bundle, tx, config, ds_active)`
exactly as `train_and_evaluate` drives it: variables, optimizer state and a
10,000-entry sigma table replicated on `make_mesh(n)`, each batch a dict of
numpy arrays (random images, labels, example ids, mask, pos = sigma-table row)
`jax.device_put` with `NamedSharding(mesh, P('data'))` every step (the
transfer is inside the timing, as in training), the state donated and fed
back. Random-init parameters and random data: the speed does not depend on
either.

Cases (`_cases`): the small CNN at 32x32x3 and 8x8x1, batch 128, every
method with DS off and with cheap DS (ds.steps=1, ds.num_samples=1), and
Gaussian with a heavier DS (steps=10, num_samples=4); ResNet-18 at 32x32x3,
Gaussian at batch 32 with DS off and cheap DS, SmoothAdv at batch 16 and
MACER (num_noise 4) at batch 8 with DS off (on this shared CPU a ResNet-18
SmoothAdv step at batch 32 takes ~10 s and MACER ~20 s, and each compiles in
~25-50 s; --resnet_ds_all_methods adds their DS cases). MACER num_noise: 8
for the small CNN (the digits config's value), 4 for ResNet-18.

Compilation is excluded: the first call (compile + one step) is timed
separately (`compile_s`); for the small CNN a second warm step
(`warm_step_s`) then sets steps_per_rep so a repetition lasts about
--rep_seconds; ResNet-18 runs one step per repetition with no extra warm
step. Then `reps` repetitions, `jax.block_until_ready` at the end of each,
and the median rate. The jit cache size is checked after the timing: a
recompilation inside the timed steps would be reported (`recompiled`).

img/s counts INPUT EXAMPLES (batch_size per step). MACER and Gaussian with
num_noise > 1 push num_noise noisy copies of each through the model
(`noisy img/s` = img/s x num_noise); SmoothAdv first runs `smoothadv.steps`
PGD steps on the soft smoothed classifier (num_noise draws each, BatchNorm in
eval mode). With DS, each batch first takes `ds.steps` ascent steps with
`ds.num_samples` draws (forward-mode jvp) on its sigma entries.

1 vs 2 devices: in a child process with
`XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu`, the
small CNN Gaussian step at the same global batch on `make_mesh(1)` and
`make_mesh(2)` (and at twice the global batch on 2 devices, i.e. the same
per-device batch), repetitions alternating, in the same process. On a 2-core
machine the two "devices" share the cores XLA already uses for intra-op
parallelism on one.

Other processes may share the machine: `os.getloadavg()` is recorded at the
start and end of the run and of every case, and cpu_per_wall (CPU seconds
this process got per wall second, at most the core count) of the timed steps.

The GPU target (one epoch of Gaussian ResNet-18 CIFAR-10 training in under
10 s on an H100) is not measured by this CPU run; the JSON says so and gives
the CPU epoch time implied by the ResNet-18 Gaussian rate.

Writes every measurement and a machine description to --out as JSON and
prints Markdown tables last.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from bench import common as bench_common
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dds_jax import losses
from dds_jax import models
from dds_jax import noise as noise_lib
from dds_jax import sampler
from dds_jax import sigma_opt as sigma_opt_lib
from dds_jax import train as train_lib
from dds_jax.configs import cifar10 as cifar10_config
from dds_jax.configs import common
from dds_jax.configs import digits as digits_config
# pylint: enable=g-import-not-at-top,wrong-import-position

# CPU donation of buffers that cannot be reused only warns; keep output clean.
warnings.filterwarnings('ignore', message='Some donated buffers')


def _source_sha(path: str) -> str:
  """sha256 (first 16 hex) of a source file: which version was measured."""
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


# The code this process runs (others may edit it while a benchmark runs).
_SOURCES = {
    'dds_jax/train.py': train_lib.__file__,
    'dds_jax/losses.py': losses.__file__,
    'dds_jax/sigma_opt.py': sigma_opt_lib.__file__,
}
_SHAS = {k: _source_sha(v) for k, v in _SOURCES.items()}

_MODELS = flags.DEFINE_list('models', ['small_cnn', 'resnet18'],
                            'Models to benchmark.')
_METHODS = flags.DEFINE_list('methods', list(common.METHODS),
                             'Training methods to benchmark.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed repetitions (median taken).')
_REP_SECONDS = flags.DEFINE_float(
    'rep_seconds', 1.0, 'Target wall time of one repetition (steps_per_rep '
    'is chosen from the warm step; at least one step).')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'Small CNN 8x8x1 Gaussian at batch 32 only (DS off, cheap '
    'DS; 1 vs 2 devices without the 2x batch), one repetition: a smoke test '
    'that runs in under a minute.')
_SKIP_DEVICES = flags.DEFINE_bool(
    'skip_devices', False, 'Skip the 1 vs 2 device child process.')
_SKIP_HEAVY_DS = flags.DEFINE_bool(
    'skip_heavy_ds', False, 'Skip the heavier DS setting (small CNN Gaussian).')
_RESNET_DS_ALL = flags.DEFINE_bool(
    'resnet_ds_all_methods', False, 'ResNet-18: DS for SmoothAdv and MACER '
    'too (adds ~2 minutes).')
_OUT = flags.DEFINE_string('out', 'bench/results/train.json',
                           'Where to write the JSON results.')
_CHILD_OUT = flags.DEFINE_string(
    'child_out', None, 'Internal: run the device comparison, write JSON here.')

_TABLE_SIZE = 10_000      # sigma-table rows (training examples)
_CIFAR_TRAIN = 50_000     # for the implied CPU epoch time
_DS_CHEAP = (1, 1)        # (ds.steps, ds.num_samples)
_DS_HEAVY = (10, 4)
_NUM_NOISE_MACER = {'small_cnn': 8, 'resnet18': 4}  # digits config: 8
_SHAPES = {'small_cnn': [(32, 32, 3), (8, 8, 1)], 'resnet18': [(32, 32, 3)]}
_GPU_NOTE = (
    'GPU target NOT measured: one epoch of Gaussian ResNet-18 CIFAR-10 '
    'training (50,000 images) in under 10 s on an H100 (>= 5,000 img/s) was '
    'not checked, because no GPU was available in this session; all numbers '
    'here are from a shared 2-core CPU. cpu_epoch_estimate_s is 50,000 / the '
    'measured ResNet-18 Gaussian CPU rate, for scale only.')


def _config(model: str, shape, method: str, batch: int,
            ds: tuple[int, int] | None, num_noise: int | None = None):
  """The training config of one case, from the repository's config files."""
  if shape == (8, 8, 1):
    c = digits_config.get_config(f'small,method={method}')
    if model != 'small_cnn':
      raise app.UsageError(f'{model} is not run on 8x8x1')
  else:
    c = cifar10_config.get_config('small' if model == 'small_cnn' else None)
    c.train.method = method
  c.model.name = model
  c.train.batch_size = batch
  if num_noise is not None:
    c.train.num_noise = num_noise
  elif method == 'macer':
    c.train.num_noise = _NUM_NOISE_MACER[model]
  c.train.ds.enabled = ds is not None
  if ds is not None:
    c.train.ds.start_epoch = 0
    c.train.ds.steps, c.train.ds.num_samples = ds
  common.validate(c)
  return c


def _cases() -> list[dict[str, Any]]:
  """The cases of part 1, filtered by --models/--methods.

  Small CNN (both shapes, batch 128): every method with DS off and cheap DS,
  and the heavy DS setting for Gaussian. ResNet-18 (about 10x slower to
  compile and 500x slower per image on this CPU): one step per repetition,
  no separate warm step; Gaussian at batch 32 with DS off and cheap DS,
  SmoothAdv at batch 16 and MACER (num_noise 4) at batch 8, DS off (DS too
  with --resnet_ds_all_methods).
  """
  unknown = set(_MODELS.value) - set(_SHAPES)
  unknown |= set(_METHODS.value) - set(common.METHODS)
  if unknown:
    raise app.UsageError(f'unknown models/methods {sorted(unknown)}')
  reps = _REPS.value
  if _QUICK.value:
    cases = [dict(model='small_cnn', shape=(8, 8, 1), method='gaussian',
                  batch=32, ds=None, reps=1),
             dict(model='small_cnn', shape=(8, 8, 1), method='gaussian',
                  batch=32, ds=_DS_CHEAP, reps=1)]
    return [c for c in cases if c['method'] in _METHODS.value]
  cases = []
  for model in _MODELS.value:
    for shape in _SHAPES[model]:
      for method in _METHODS.value:
        if model == 'small_cnn':
          dss = [None, _DS_CHEAP]
          if method == 'gaussian' and not _SKIP_HEAVY_DS.value:
            dss.append(_DS_HEAVY)
          for ds in dss:
            cases.append(dict(model=model, shape=shape, method=method,
                              batch=128, ds=ds, reps=reps))
        else:
          batch = dict(gaussian=32, smoothadv=16, macer=8)[method]
          dss = [None]
          if method == 'gaussian' or _RESNET_DS_ALL.value:
            dss.append(_DS_CHEAP)
          for ds in dss:
            cases.append(dict(model=model, shape=shape, method=method,
                              batch=batch, ds=ds,
                              reps=reps if method == 'gaussian'
                              else min(reps, 2),
                              steps_per_rep=1))
  return cases


def _device_cases() -> list[dict[str, Any]]:
  if _QUICK.value:
    return [dict(model='small_cnn', shape=(8, 8, 1), method='gaussian',
                 batch=32, ds=None, reps=1)]
  return [dict(model='small_cnn', shape=s, method='gaussian', batch=128,
               ds=None, reps=_REPS.value) for s in _SHAPES['small_cnn']]


def _loadavg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


class _Trainer:
  """One case's jitted step, state on a mesh, and random batches."""

  def __init__(self, c: dict[str, Any], mesh, batch: int | None = None):
    self.c = c
    self.batch = batch or c['batch']
    self.config = _config(c['model'], tuple(c['shape']), c['method'],
                          self.batch, c['ds'])
    tc = self.config.train
    self.num_noise = tc.num_noise
    self.bundle = models.build_from_config(self.config, c['shape'], training=True)
    tx = train_lib.make_optimizer(tc, steps_per_epoch=_TABLE_SIZE // self.batch)
    self.step = train_lib.make_train_step(self.bundle, tx, self.config,
                                          ds_active=c['ds'] is not None)
    replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P(sampler.DATA_AXIS))
    variables = self.bundle.init(jax.random.key(0))
    self.state = (
        jax.device_put(variables, replicated),
        jax.device_put(tx.init(variables['params']), replicated),
        jax.device_put(jnp.full((_TABLE_SIZE,), self.config.noise.sigma,
                                jnp.float32), replicated))
    self.key = jax.random.key(0)
    self.eps_adv = jnp.float32(losses.smoothadv_epsilon(
        1, tc.smoothadv.eps, tc.smoothadv.warmup_epochs))
    rng = np.random.default_rng(0)
    self.batches = []
    for _ in range(2):
      ids = rng.choice(_TABLE_SIZE, self.batch, replace=False)
      self.batches.append(dict(
          images=rng.uniform(size=(self.batch,) + tuple(c['shape'])).astype(
              np.float32),
          labels=rng.integers(0, self.config.model.num_classes,
                              self.batch).astype(np.int32),
          id_words=noise_lib.id_words(ids),
          mask=np.ones(self.batch, bool),
          pos=ids.astype(np.int32)))
    self.calls = 0

  def run(self, steps: int):
    """`steps` training steps; returns the last metrics (not blocked)."""
    metrics = None
    for _ in range(steps):
      b = self.batches[self.calls % len(self.batches)]
      b = {k: jax.device_put(v, self.batch_sharding) for k, v in b.items()}
      *state, metrics = self.step(*self.state, b, self.key, self.calls,
                                  self.eps_adv)
      self.state = tuple(state)
      self.calls += 1
    return metrics

  def check(self) -> None:
    m = jax.device_get(self.run(1))
    if not np.isfinite(m['loss']) or int(m['count']) != self.batch:
      raise RuntimeError(f'bad metrics {m}')


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall s, process CPU s) of one call of fn, blocked."""
  c, t = os.times(), time.perf_counter()
  jax.block_until_ready(fn())
  t, c2 = time.perf_counter() - t, os.times()
  return t, c2.user - c.user + c2.system - c.system


def _summary(timed: list[tuple[float, float]], work: int) -> dict[str, Any]:
  times = [t for t, _ in timed]
  return dict(times_s=times, items_per_rep=work,
              median_per_s=work / statistics.median(times),
              best_per_s=work / min(times),
              cpu_per_wall=sum(c for _, c in timed) / sum(times))


def _warm(tr: _Trainer, steps: int | None = None) -> dict[str, Any]:
  """Compiles (first call); unless `steps` is given, runs one warm step and
  picks steps_per_rep from it."""
  compile_s, _ = _timed(lambda: tr.run(1))
  warm_s = None
  if steps is None:
    warm_s, _ = _timed(lambda: tr.run(1))
    rep_s = 0.3 if _QUICK.value else _REP_SECONDS.value
    steps = max(1, min(200, round(rep_s / warm_s)))
  return dict(compile_s=compile_s, warm_step_s=warm_s, steps_per_rep=steps,
              cache_size=tr.step._cache_size())  # pylint: disable=protected-access


def _row_base(c: dict[str, Any], tr: _Trainer) -> dict[str, Any]:
  tc = tr.config.train
  return dict(
      model=c['model'], input_shape=list(c['shape']), method=c['method'],
      batch_size=tr.batch, num_noise=tr.num_noise,
      ds=None if c['ds'] is None else dict(steps=tc.ds.steps,
                                           num_samples=tc.ds.num_samples,
                                           lr=tc.ds.lr, bn_mode=tc.ds.bn_mode),
      smoothadv_steps=tc.smoothadv.steps if c['method'] == 'smoothadv' else None,
      conv_features=list(tr.config.model.conv_features) or None,
      crop_padding=tc.crop_padding, flip=tc.flip, dtype=tc.dtype,
      reps=c['reps'])


def _ds_label(ds) -> str:
  return 'off' if ds is None else f'{ds["steps"]}x{ds["num_samples"]}'


def _measure_main(cases) -> list[dict[str, Any]]:
  """Part 1: img/s per case, one device, this process."""
  mesh = sampler.make_mesh(1)
  rows = []
  for c in cases:
    load0 = _loadavg()
    t0 = time.perf_counter()
    tr = _Trainer(c, mesh)
    w = _warm(tr, c.get('steps_per_rep'))
    n = w['steps_per_rep']
    timed = [_timed(lambda: tr.run(n)) for _ in range(c['reps'])]
    recompiled = tr.step._cache_size() != w['cache_size']  # pylint: disable=protected-access
    tr.check()
    row = _row_base(c, tr)
    row.update(w, recompiled=recompiled, train=_summary(timed, n * tr.batch))
    row['img_per_s'] = row['train']['median_per_s']
    row['noisy_img_per_s'] = row['img_per_s'] * tr.num_noise
    row.update(case_wall_s=time.perf_counter() - t0, loadavg_start=load0,
               loadavg_end=_loadavg())
    print(f'[1 dev] {c["model"]} {c["shape"]} {c["method"]} '
          f'm={tr.num_noise} ds={_ds_label(row["ds"])} bs={tr.batch}: '
          f'{row["img_per_s"]:.1f} img/s (compile {w["compile_s"]:.1f} s, '
          f'{n} steps/rep, cpu/wall {row["train"]["cpu_per_wall"]:.2f}, '
          f'load {load0[0]:.1f})', flush=True)
    del tr
    rows.append(row)
  return rows


def _measure_devices(c: dict[str, Any]) -> dict[str, Any]:
  """Part 2 (in the child): 1 vs 2 devices, repetitions alternating."""
  load0 = _loadavg()
  variants = {'1dev': (1, c['batch']), '2dev': (2, c['batch'])}
  if not _QUICK.value:
    variants['2dev_2x_batch'] = (2, 2 * c['batch'])
  trs, warm = {}, {}
  for name, (d, bs) in variants.items():
    trs[name] = _Trainer(c, sampler.make_mesh(d), batch=bs)
    warm[name] = _warm(trs[name])
  # One steps_per_rep for all (the 1-device one) so reps are comparable.
  n = warm['1dev']['steps_per_rep']
  times = {k: [] for k in variants}
  for _ in range(c['reps']):
    for name, tr in trs.items():
      times[name].append(_timed(lambda tr=tr: tr.run(n)))
  row = _row_base(c, trs['1dev'])
  for name, (d, bs) in variants.items():
    tr = trs[name]
    recompiled = tr.step._cache_size() != warm[name]['cache_size']  # pylint: disable=protected-access
    tr.check()
    row[name] = dict(devices=d, global_batch=bs, per_device_batch=bs // d,
                     **warm[name], steps_per_rep_used=n, recompiled=recompiled,
                     train=_summary(times[name], n * bs))
    row[name]['img_per_s'] = row[name]['train']['median_per_s']
  row['ratio_2dev_over_1dev'] = (row['2dev']['img_per_s'] /
                                 row['1dev']['img_per_s'])
  row['ratio_2dev_2x_batch_over_1dev'] = (
      row['2dev_2x_batch']['img_per_s'] / row['1dev']['img_per_s']
      if '2dev_2x_batch' in row else None)
  row.update(loadavg_start=load0, loadavg_end=_loadavg())
  print(f'[1 vs 2 dev] {c["model"]} {c["shape"]} {c["method"]} '
        f'bs={c["batch"]}: {row["1dev"]["img_per_s"]:.0f} -> '
        f'{row["2dev"]["img_per_s"]:.0f} img/s (ratio '
        f'{row["ratio_2dev_over_1dev"]:.2f}); 2 dev at bs={2 * c["batch"]}: '
        f'{_fmt(row.get("2dev_2x_batch", {}).get("img_per_s"))} img/s',
        flush=True)
  return row


def _git() -> dict[str, Any]:
  """HEAD and whether the measured sources differ from it."""
  git = bench_common.git
  status = git('status', '--porcelain', '--', 'dds_jax')
  return dict(git_head=git('rev-parse', 'HEAD'),
              dds_jax_dirty_files=None if status is None else
              [line[3:] for line in status.splitlines()],
              source_sha256=dict(_SHAS))


def _machine() -> dict[str, Any]:
  import optax  # pylint: disable=g-import-not-at-top
  m = bench_common.machine(optax=optax.__version__, gpu=None, **_git())
  m['loadavg_start'] = _loadavg()
  return m


def _fmt(v: float | None, digits: int = 0) -> str:
  if v is None:
    return '-'
  if digits < 0:  # 3 significant digits
    return f'{v:,.3g}' if v < 1000 else f'{v:,.0f}'
  return f'{v:,.{digits}f}'


def _table(main_rows, dev_rows) -> str:
  """The Markdown summary."""
  lines = [
      '| model | input | method | num_noise | DS (steps x m) | batch | '
      'img/s | noisy img/s | vs same method, DS off | compile s | '
      'CPU/wall | load 1-min |',
      '|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|']
  base = {(r['model'], tuple(r['input_shape']), r['method']): r['img_per_s']
          for r in main_rows if r['ds'] is None}
  for r in main_rows:
    b = base.get((r['model'], tuple(r['input_shape']), r['method']))
    rel = f'{r["img_per_s"] / b:.2f}x' if b and r['ds'] is not None else '-'
    flag = ' (recompiled!)' if r['recompiled'] else ''
    lines.append(
        f'| {r["model"]} | {"x".join(map(str, r["input_shape"]))} | '
        f'{r["method"]} | {r["num_noise"]} | {_ds_label(r["ds"])} | '
        f'{r["batch_size"]} | {_fmt(r["img_per_s"], -1)}{flag} | '
        f'{_fmt(r["noisy_img_per_s"], -1)} | {rel} | '
        f'{_fmt(r["compile_s"], 1)} | {_fmt(r["train"]["cpu_per_wall"], 2)} | '
        f'{r["loadavg_start"][0]:.1f} |')
  lines.append(
      '\nimg/s counts input examples (batch_size per step); noisy img/s = '
      'img/s x num_noise (copies through the training forward/backward). '
      'SmoothAdv adds its PGD steps, DS its ascent (jvp) steps on top. '
      'Median over repetitions, compilation excluded.')
  if dev_rows:
    lines += [
        '',
        '| 1 vs 2 devices (child) | method | global batch | 1-dev img/s | '
        '2-dev img/s | 2-dev/1-dev | 2-dev img/s at 2x batch | ratio |',
        '|---|---|---:|---:|---:|---:|---:|---:|']
    for r in dev_rows:
      lines.append(
          f'| {r["model"]} {"x".join(map(str, r["input_shape"]))} | '
          f'{r["method"]} | {r["batch_size"]} | '
          f'{_fmt(r["1dev"]["img_per_s"], -1)} | '
          f'{_fmt(r["2dev"]["img_per_s"], -1)} | '
          f'{_fmt(r["ratio_2dev_over_1dev"], 2)}x | '
          f'{_fmt(r.get("2dev_2x_batch", {}).get("img_per_s"), -1)} | '
          f'{_fmt(r["ratio_2dev_2x_batch_over_1dev"], 2)}'
          f'{"x" if r["ratio_2dev_2x_batch_over_1dev"] else ""} |')
  lines.append(f'\n{_GPU_NOTE}')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _CHILD_OUT.value:
    if len(jax.devices()) < 2:
      raise RuntimeError('child needs 2 devices; XLA_FLAGS not applied?')
    rows = [_measure_devices(c) for c in _device_cases()]
    with open(_CHILD_OUT.value, 'w') as f:
      json.dump(dict(devices=[str(d) for d in jax.devices()], rows=rows,
                     source_sha256=_SHAS), f)
    return
  cases = _cases()
  machine = _machine()
  t0 = time.perf_counter()
  main_rows = _measure_main(cases)
  child = None if _SKIP_DEVICES.value else bench_common.run_child(__file__)
  machine['loadavg_end'] = _loadavg()
  seen = dict(main=_SHAS,
              on_disk_at_end={k: _source_sha(v) for k, v in _SOURCES.items()})
  if child:
    seen['child'] = child['source_sha256']
  machine['sources_same_throughout'] = all(v == _SHAS for v in seen.values())
  machine['source_sha256_seen'] = seen
  if not machine['sources_same_throughout']:
    print(f'WARNING: measured sources changed during the run: {seen}',
          flush=True)
  resnet = [r for r in main_rows if r['model'] == 'resnet18' and
            r['method'] == 'gaussian' and r['ds'] is None]
  gpu_target = dict(
      target='one epoch of Gaussian ResNet-18 CIFAR-10 training < 10 s on an '
             'H100', measured=False, reason='no GPU in this session',
      note=_GPU_NOTE,
      cpu_resnet18_gaussian_img_per_s=resnet[0]['img_per_s'] if resnet else None,
      cpu_epoch_estimate_s=(_CIFAR_TRAIN / resnet[0]['img_per_s']
                            if resnet else None))
  result = dict(
      machine=machine, quick=_QUICK.value, sigma_table_size=_TABLE_SIZE,
      params='random init', data='random images/labels of the right shape',
      gpu_target=gpu_target,
      note=('img_per_s counts input examples per second (batch_size per '
            'step), median over reps, compilation excluded; '
            'noisy_img_per_s = img_per_s x num_noise. MACER uses num_noise '
            f'copies per example ({_NUM_NOISE_MACER} here; digits config: '
            '8). The batch device_put is inside the timing. Other processes '
            'may share the machine: see loadavg_* and cpu_per_wall.'),
      wall_s=time.perf_counter() - t0, cases=cases, train=main_rows,
      devices_1_vs_2=child['rows'] if child else [],
      child_devices=child['devices'] if child else [])
  if _OUT.value:
    bench_common.write_result(_OUT.value, result)
  print(_table(main_rows, result['devices_1_vs_2']))


if __name__ == '__main__':
  app.run(main)
