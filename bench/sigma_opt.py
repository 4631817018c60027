r"""Throughput of `dds_jax.sigma_opt.optimize_sigma` (per-input sigma ascent).

Usage (from the repository root)::

  PYTHONPATH=. python bench/sigma_opt.py [--quick] [--models=small_cnn,resnet18]
      [--reps=3] [--skip_devices] [--out=bench/results/sigma_opt.json]

The target workload is the paper's: K = 100 ascent steps per input, with
m = 1 (ImageNet) or m = 64 (CIFAR MACER script) noise draws per step. Every
case uses random-init parameters (the speed does not depend on training),
sigma0 = 0.25, the plain ascent (lr = 1e-4) and the Gaussian proxy. For each
case (model, input shape, m, examples per device) it measures, compilation
excluded (one warm-up call on the same shapes first):

1. sigma-opt examples/s: one `optimize_sigma(..., mesh=make_mesh(1))` call on
   one chunk (`examples_per_device` examples, so the call compiles exactly one
   shape), wall time including host transfers and the result copy back; the
   median over repetitions. ResNet-18 runs only `steps=10` (at m = 64 one
   example at steps=100 is 6,400 noisy jvp passes, over a minute on 2 cores);
   its examples/s at steps=100 is then an ESTIMATE, the measured rate times
   steps_run / 100 (time is linear in the steps of the scan; the one extra
   proxy evaluation at the end makes this slightly pessimistic). Estimates
   are marked with `*` in the table and `examples_per_s_is_estimate` in the
   JSON.
2. noisy img/s = examples/s x steps x m: noisy images pushed through the
   model per second. Each is a forward-mode jvp (about two forward passes'
   worth of work), so compare it with:
3. forward img/s: `jax.jit(bundle.apply_fn)` at the same batch
   (examples_per_device x m images), back-to-back calls. Forward and
   sigma-opt repetitions alternate so that load from other processes hits
   both alike. noisy/forward is the cost of one jvp step relative to a plain
   forward pass (0.5 would be "a jvp costs two forwards").
4. 1 vs 2 devices: in a child process with
   `XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu`,
   the small CNN 32x32x3 m = 1 case with `make_mesh(1)` and `make_mesh(2)` at
   the same examples per device (so two devices do twice the examples per
   call), and their ratio. On a 2-core machine the two "devices" share the
   cores XLA already uses for intra-op parallelism on one. The 1-device
   rate in that child is not the same as in this (default, 1-device)
   process, so the table also gives 2-dev over the part-1 rate of the same
   case (`ratio_2dev_over_main_1dev`).

Other processes may share the machine: `os.getloadavg()` is recorded at the
start and end of the run and of every case.

Writes every measurement and a machine description to --out as JSON and prints
Markdown tables last.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
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

from dds_jax import models
from dds_jax import sampler
from dds_jax import sigma_opt as sigma_opt_lib
from dds_jax.sigma_opt import optimize_sigma
# pylint: enable=g-import-not-at-top,wrong-import-position


def _source_sha(path: str = sigma_opt_lib.__file__) -> str:
  """sha256 (first 16 hex) of a source file: which version was measured."""
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


# Read right after the import: the code this process runs (others may edit
# dds_jax/sigma_opt.py while a benchmark runs).
_SIGMA_OPT_SHA = _source_sha()

_MODELS = flags.DEFINE_list('models', ['small_cnn', 'resnet18'],
                            'Models to benchmark.')
_REPS = flags.DEFINE_integer(
    'reps', 3, 'Timed repetitions (median taken); cases with their own, '
    'smaller count (ResNet-18 m=64) keep it.')
_TARGET_STEPS = flags.DEFINE_integer(
    'target_steps', 100, 'Steps the examples/s column is reported at.')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'Tiny sizes (a smoke test that runs in under a minute).')
_SKIP_DEVICES = flags.DEFINE_bool(
    'skip_devices', False, 'Skip the 1 vs 2 device child process.')
_OUT = flags.DEFINE_string('out', 'bench/results/sigma_opt.json',
                           'Where to write the JSON results.')
_CHILD_OUT = flags.DEFINE_string(
    'child_out', None, 'Internal: run the device comparison, write JSON here.')

_NUM_CLASSES = 10
_SIGMA0 = 0.25
_LR = 1e-4

# model, input shape, m, examples per device, steps run, reps (None: --reps).
# Sizes keep the full run under ~8 minutes on 2 loaded cores.
_CASES = [
    dict(model='small_cnn', shape=(8, 8, 1), m=1, epd=32, steps=100),
    dict(model='small_cnn', shape=(8, 8, 1), m=64, epd=4, steps=100),
    dict(model='small_cnn', shape=(32, 32, 3), m=1, epd=16, steps=100),
    dict(model='small_cnn', shape=(32, 32, 3), m=64, epd=1, steps=100),
    dict(model='resnet18', shape=(32, 32, 3), m=1, epd=8, steps=10),
    dict(model='resnet18', shape=(32, 32, 3), m=64, epd=1, steps=10, reps=2),
]
_DEVICE_CASE = dict(model='small_cnn', shape=(32, 32, 3), m=1, epd=16,
                    steps=100)

# --quick: the 8x8 small CNN only, few steps (the estimate path included).
_QUICK_CASES = [
    dict(model='small_cnn', shape=(8, 8, 1), m=1, epd=8, steps=5),
    dict(model='small_cnn', shape=(8, 8, 1), m=8, epd=2, steps=5),
]
_QUICK_DEVICE_CASE = dict(model='small_cnn', shape=(8, 8, 1), m=1, epd=8,
                          steps=5)


def _cases() -> list[dict[str, Any]]:
  """Cases to run in this process, filtered by --models, reps filled in."""
  if _QUICK.value:
    cases = [dict(c, reps=1) for c in _QUICK_CASES]
  else:
    cases = [dict(c, reps=min(c.get('reps') or _REPS.value, _REPS.value))
             for c in _CASES]
  unknown = set(_MODELS.value) - {c['model'] for c in _CASES}
  if unknown:
    raise app.UsageError(f'unknown models {sorted(unknown)}')
  return [c for c in cases if c['model'] in _MODELS.value]


def _device_case() -> dict[str, Any]:
  if _QUICK.value:
    return dict(_QUICK_DEVICE_CASE, reps=1)
  return dict(_DEVICE_CASE, reps=_REPS.value)


def _timed(fn: Callable[[], Any]) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def _summary(times: list[float], work: int) -> dict[str, Any]:
  """Median/min rate over repetitions of `work` items."""
  return dict(times_s=times, items_per_rep=work,
              median_per_s=work / statistics.median(times),
              best_per_s=work / min(times))


def _loadavg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


class _Case:
  """One model, input shape, m and examples per device."""

  def __init__(self, c: dict[str, Any]):
    self.c = c
    self.bundle = models.build(c['model'], _NUM_CLASSES, c['shape'])
    self.apply_fn = self.bundle.apply_fn  # one object: the ascent cache key
    self.variables = self.bundle.init(0)
    self.key = jax.random.key(0)
    self.rng = np.random.default_rng(0)

  def sigma_fn(self, mesh):
    """A zero-argument call of optimize_sigma on one chunk of examples."""
    n = self.c['epd'] * mesh.shape[sampler.DATA_AXIS]
    x = self.rng.uniform(size=(n,) + tuple(self.c['shape'])).astype(
        np.float32)

    def run():
      sigma = optimize_sigma(
          self.apply_fn, self.variables, x, _SIGMA0, self.key,
          steps=self.c['steps'], lr=_LR, num_samples=self.c['m'],
          examples_per_device=self.c['epd'], mesh=mesh)
      if sigma.shape != (n,) or not np.all(np.isfinite(sigma)):
        raise RuntimeError(f'bad sigma {sigma}')
      return sigma
    return run, n

  def forward_fn(self, calls: int):
    """`calls` back-to-back jitted forward passes at the ascent's batch."""
    fwd = jax.jit(self.apply_fn)
    batch = self.c['epd'] * self.c['m']
    xb = jnp.asarray(self.rng.uniform(
        size=(batch,) + tuple(self.c['shape'])).astype(np.float32))
    jax.block_until_ready(fwd(self.variables, xb))

    def run():
      out = None
      for _ in range(calls):
        out = fwd(self.variables, xb)
      return out
    return run, calls * batch


def _rates(c: dict[str, Any], summary: dict[str, Any],
           target_steps: int) -> dict[str, Any]:
  """examples/s at the steps run and at target_steps, and noisy img/s."""
  ex_s = summary['median_per_s']
  return dict(
      examples_per_s_measured=ex_s,
      examples_per_s=ex_s * c['steps'] / target_steps,
      examples_per_s_is_estimate=c['steps'] != target_steps,
      noisy_img_per_s=ex_s * c['steps'] * c['m'])


def _row_base(c: dict[str, Any], target_steps: int) -> dict[str, Any]:
  return dict(model=c['model'], input_shape=list(c['shape']),
              num_samples=c['m'], examples_per_device=c['epd'],
              forward_batch=c['epd'] * c['m'], steps_run=c['steps'],
              target_steps=target_steps, reps=c['reps'])


def _measure_main(cases, target_steps: int) -> list[dict[str, Any]]:
  """Parts 1-3: sigma-opt and forward throughput on one device."""
  mesh = sampler.make_mesh(1)
  rows = []
  for c in cases:
    load0 = _loadavg()
    t0 = time.perf_counter()
    case = _Case(c)
    smp, n = case.sigma_fn(mesh)
    compile_s = _timed(smp)  # warm-up: compiles this shape (and runs once)
    # Forward reps cover a quarter of the ascent's noisy images: enough to time.
    noisy = n * c['steps'] * c['m']
    calls = max(1, math.ceil(noisy / 4 / (c['epd'] * c['m'])))
    fwd, fwd_work = case.forward_fn(calls)
    t_s, t_f = [], []
    for _ in range(c['reps']):
      t_s.append(_timed(smp))
      t_f.append(_timed(fwd))
    row = _row_base(c, target_steps)
    row.update(examples_per_call=n, warmup_s=compile_s,
               sigma_opt=_summary(t_s, n), forward=_summary(t_f, fwd_work))
    row.update(_rates(c, row['sigma_opt'], target_steps))
    row['noisy_over_forward'] = (row['noisy_img_per_s'] /
                                 row['forward']['median_per_s'])
    row.update(case_wall_s=time.perf_counter() - t0, loadavg_start=load0,
               loadavg_end=_loadavg())
    print(f'[1 dev] {c["model"]} {c["shape"]} m={c["m"]} epd={c["epd"]} '
          f'steps={c["steps"]}: {row["examples_per_s"]:.3g} ex/s at '
          f'steps={target_steps}{" (est.)" if c["steps"] != target_steps else ""}'
          f', noisy {row["noisy_img_per_s"]:.0f} img/s, forward '
          f'{row["forward"]["median_per_s"]:.0f} img/s, ratio '
          f'{row["noisy_over_forward"]:.2f} (load {load0[0]:.1f})', flush=True)
    rows.append(row)
  return rows


def _measure_devices(c: dict[str, Any], target_steps: int) -> dict[str, Any]:
  """Part 4 (in the child): 1 vs 2 devices, same examples per device."""
  load0 = _loadavg()
  meshes = {1: sampler.make_mesh(1), 2: sampler.make_mesh(2)}
  case = _Case(c)
  fns, n = {}, {}
  for d, mesh in meshes.items():
    fns[d], n[d] = case.sigma_fn(mesh)
    _timed(fns[d])  # warm-up
  times = {1: [], 2: []}
  for _ in range(c['reps']):
    for d in meshes:
      times[d].append(_timed(fns[d]))
  row = _row_base(c, target_steps)
  for d in meshes:
    s = _summary(times[d], n[d])
    row[f'{d}dev'] = dict(examples_per_call=n[d], sigma_opt=s,
                          **_rates(c, s, target_steps))
  row['ratio_2dev_over_1dev'] = (row['2dev']['examples_per_s'] /
                                 row['1dev']['examples_per_s'])
  row.update(loadavg_start=load0, loadavg_end=_loadavg())
  print(f'[1 vs 2 dev] {c["model"]} {c["shape"]} m={c["m"]} epd={c["epd"]}: '
        f'{row["1dev"]["examples_per_s"]:.3g} -> '
        f'{row["2dev"]["examples_per_s"]:.3g} ex/s, ratio '
        f'{row["ratio_2dev_over_1dev"]:.2f}', flush=True)
  return row


def _machine() -> dict[str, Any]:
  m = bench_common.machine(**_git())
  m['loadavg_start'] = _loadavg()
  return m


def _git() -> dict[str, Any]:
  """HEAD and whether dds_jax/sigma_opt.py differs from it."""
  git = bench_common.git
  status = git('status', '--porcelain', '--', 'dds_jax/sigma_opt.py')
  return dict(git_head=git('rev-parse', 'HEAD'),
              sigma_opt_dirty=None if status is None else bool(status),
              sigma_opt_sha256=_SIGMA_OPT_SHA)


def _fmt(v: float | None, digits: int = 0) -> str:
  if v is None:
    return '-'
  if digits < 0:  # 3 significant digits
    return f'{v:,.3g}' if v < 1000 else f'{v:,.0f}'
  return f'{v:,.{digits}f}'


def _table(main_rows, dev_rows, target_steps: int) -> str:
  """The Markdown summary."""
  lines = [
      f'| model | input | m | ex/dev | fwd batch | steps run | '
      f'examples/s (steps={target_steps}) | noisy img/s (jvp) | '
      f'forward img/s (same batch) | noisy/forward | load 1-min |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  estimated = False
  for r in main_rows:
    star = '*' if r['examples_per_s_is_estimate'] else ''
    estimated |= bool(star)
    lines.append(
        f'| {r["model"]} | {"x".join(map(str, r["input_shape"]))} | '
        f'{r["num_samples"]} | {r["examples_per_device"]} | '
        f'{r["forward_batch"]} | {r["steps_run"]} | '
        f'{_fmt(r["examples_per_s"], -1)}{star} | '
        f'{_fmt(r["noisy_img_per_s"])} | '
        f'{_fmt(r["forward"]["median_per_s"])} | '
        f'{_fmt(r["noisy_over_forward"], 2)} | '
        f'{r["loadavg_start"][0]:.1f} |')
  if estimated:
    lines.append(
        f'\n\\* estimate: measured at the "steps run", scaled by '
        f'steps_run/{target_steps} (time is linear in steps).')
  for r in dev_rows:
    lines += [
        '',
        f'| 1 vs 2 devices | m | ex/dev | steps run | 1-dev (child) examples/s '
        f'(steps={target_steps}) | 2-dev examples/s | 2-dev/1-dev | '
        f'2-dev / 1-dev of the table above |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
        f'| {r["model"]} {"x".join(map(str, r["input_shape"]))} | '
        f'{r["num_samples"]} | {r["examples_per_device"]} | {r["steps_run"]} |'
        f' {_fmt(r["1dev"]["examples_per_s"], -1)} | '
        f'{_fmt(r["2dev"]["examples_per_s"], -1)} | '
        f'{_fmt(r["ratio_2dev_over_1dev"], 2)}x | '
        f'{_fmt(r.get("ratio_2dev_over_main_1dev"), 2)}'
        f'{"x" if r.get("ratio_2dev_over_main_1dev") else ""} |']
  return '\n'.join(lines)


def main(argv):
  del argv
  target = _TARGET_STEPS.value
  if _CHILD_OUT.value:
    if len(jax.devices()) < 2:
      raise RuntimeError('child needs 2 devices; XLA_FLAGS not applied?')
    row = _measure_devices(_device_case(), target)
    with open(_CHILD_OUT.value, 'w') as f:
      json.dump(dict(devices=[str(d) for d in jax.devices()], rows=[row],
                     sigma_opt_sha256=_SIGMA_OPT_SHA), f)
    return
  cases = _cases()
  machine = _machine()
  t0 = time.perf_counter()
  main_rows = _measure_main(cases, target)
  child = None if _SKIP_DEVICES.value else bench_common.run_child(__file__)
  machine['loadavg_end'] = _loadavg()
  shas = dict(main=_SIGMA_OPT_SHA, on_disk_at_end=_source_sha())
  if child:
    shas['child'] = child['sigma_opt_sha256']
  machine['sigma_opt_sha256_seen'] = shas
  machine['sigma_opt_same_throughout'] = len(set(shas.values())) == 1
  if not machine['sigma_opt_same_throughout']:
    print(f'WARNING: dds_jax/sigma_opt.py changed during the run: {shas}; '
          'the rows may measure different code', flush=True)
  for r in child['rows'] if child else []:
    same = [m for m in main_rows if all(
        m[k] == r[k] for k in ('model', 'input_shape', 'num_samples',
                               'examples_per_device', 'steps_run'))]
    r['ratio_2dev_over_main_1dev'] = (
        r['2dev']['examples_per_s'] / same[0]['examples_per_s']
        if same else None)
  result = dict(
      machine=machine, quick=_QUICK.value, sigma0=_SIGMA0, lr=_LR,
      noise='gaussian', num_classes=_NUM_CLASSES, target_steps=target,
      params='random init (bundle.init(0))',
      note=('examples/s is per-example sigma ascent at target_steps; where '
            'steps_run < target_steps it is an estimate (measured rate x '
            'steps_run / target_steps). noisy_img_per_s = measured examples/s '
            'x steps_run x num_samples; each noisy image is one jvp (~2 '
            'forward passes). Other benchmarks may share the machine: see '
            'loadavg_*.'),
      wall_s=time.perf_counter() - t0, cases=cases,
      sigma_opt=main_rows,
      devices_1_vs_2=child['rows'] if child else [],
      child_devices=child['devices'] if child else [])
  if _OUT.value:
    bench_common.write_result(_OUT.value, result)
  print(_table(main_rows, result['devices_1_vs_2'], target))


if __name__ == '__main__':
  app.run(main)
