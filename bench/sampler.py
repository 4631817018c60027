r"""Throughput of `dds_jax.sampler.sample_counts` against the bare forward pass.

Usage (from the repository root)::

  PYTHONPATH=. python bench/sampler.py [--quick] [--models=small_cnn,resnet18]
      [--batch_sizes=100,400] [--num_samples=small_cnn:2400,resnet18:400]
      [--out=bench/results/sampler.json]

For every model, input shape and per-device batch size it measures, with
random-init parameters and compilation excluded (one warm-up call first):

1. forward img/s: `jax.jit(bundle.apply_fn)` on a fixed batch of `batch_size`
   images, back-to-back calls covering the sampler's sample count,
   `jax.block_until_ready` at the end;
   sampler samples/s: `sample_counts(..., mesh=make_mesh(1))` on
   `--num_examples` images with `num_samples` draws each (noise included);
   their ratio. Forward and sampler repetitions alternate so that load from
   other processes hits both alike; the median over repetitions is reported.
2. 1 vs 2 devices: in a child process with
   `XLA_FLAGS=--xla_force_host_platform_device_count=2`, sampler samples/s
   with `make_mesh(1)` and `make_mesh(2)` at the same per-device batch size
   (so two devices do twice the work per step), and their ratio.

Also reported: noise-only img/s (the jitted per-block noise of one step, no
model), which bounds what the sampler can reach on a CPU where noise and model
share the cores.

Every timing also records cpu_per_wall, the CPU seconds the process got per
wall second: below the core count, other processes shared the machine and the
absolute rates (less so the interleaved ratios) are low.

Writes every measurement and a machine description to --out as JSON and prints
a Markdown table last.
"""

from __future__ import annotations

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
from dds_jax import noise as noise_lib
from dds_jax import sampler
# pylint: enable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list('models', ['small_cnn', 'resnet18'],
                            'Models to benchmark.')
_BATCH_SIZES = flags.DEFINE_list(
    'batch_sizes', ['100', '400'],
    'Per-device batch sizes (noisy images per forward pass), each a multiple '
    'of --samples_per_block; for all models.')
_NUM_SAMPLES = flags.DEFINE_list(
    'num_samples', ['small_cnn:2400', 'resnet18:400'],
    'Draws per example, as one int for all models or MODEL:INT pairs.')
_NUM_EXAMPLES = flags.DEFINE_integer(
    'num_examples', 2, 'Examples per sample_counts call.')
_SAMPLES_PER_BLOCK = flags.DEFINE_integer(
    'samples_per_block', 100, 'Noisy copies per block.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed repetitions (median taken).')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'Tiny sizes (a smoke test that runs in under a minute).')
_SKIP_DEVICES = flags.DEFINE_bool(
    'skip_devices', False, 'Skip the 1 vs 2 device child process.')
_OUT = flags.DEFINE_string('out', 'bench/results/sampler.json',
                           'Where to write the JSON results.')
_CHILD_OUT = flags.DEFINE_string(
    'child_out', None, 'Internal: run the device comparison, write JSON here.')

# (model, input shape) pairs; small_cnn at CIFAR and at digits size.
_CASES = {
    'small_cnn': [(32, 32, 3), (8, 8, 1)],
    'resnet18': [(32, 32, 3)],
    'resnet50': [(32, 32, 3)],
}
_NUM_CLASSES = 10
_SIGMA = 0.25
_QUICK_SETTINGS = dict(batch_sizes=[20], samples_per_block=10, num_samples=40,
                       reps=1)


def _settings() -> dict[str, Any]:
  """Flag values, with --quick overrides."""
  if _QUICK.value:
    s = dict(_QUICK_SETTINGS)
    s['num_samples'] = {m: s['num_samples'] for m in _MODELS.value}
  else:
    per_model = {}
    for item in _NUM_SAMPLES.value:
      if ':' in item:
        name, n = item.split(':')
        per_model[name] = int(n)
      else:
        per_model = {m: int(item) for m in _MODELS.value}
    missing = [m for m in _MODELS.value if m not in per_model]
    if missing:
      raise app.UsageError(f'--num_samples has no value for {missing}')
    s = dict(batch_sizes=[int(b) for b in _BATCH_SIZES.value],
             samples_per_block=_SAMPLES_PER_BLOCK.value,
             num_samples=per_model, reps=_REPS.value)
  s['num_examples'] = _NUM_EXAMPLES.value
  for b in s['batch_sizes']:
    if b % s['samples_per_block']:
      raise app.UsageError(f'batch size {b} is not a multiple of '
                           f'samples_per_block={s["samples_per_block"]}')
  for m in _MODELS.value:
    if m not in _CASES:
      raise app.UsageError(f'unknown model {m!r}; known: {sorted(_CASES)}')
  for b in s['batch_sizes']:
    for m in _MODELS.value:
      work = s['num_examples'] * s['num_samples'][m]
      if work % (2 * b):
        print(f'note: {m} at batch {b}: {work} samples per call is not a '
              f'multiple of 2 x {b}, so part of a step is padding (see '
              'padding_fraction)', flush=True)
  return s


def _configs(s: dict[str, Any]):
  """Yields (model, input_shape, batch_size, num_samples) to measure."""
  for m in _MODELS.value:
    for shape in _CASES[m]:
      for bs in s['batch_sizes']:
        yield m, shape, bs, s['num_samples'][m]


def _timed(fn: Callable[[], Any], out: list[tuple[float, float]]) -> None:
  """Appends (wall s, process CPU s) of one call of fn to out."""
  c, t = os.times(), time.perf_counter()
  jax.block_until_ready(fn())
  t, c2 = time.perf_counter() - t, os.times()
  out.append((t, c2.user - c.user + c2.system - c.system))


def _summary(timed: list[tuple[float, float]], work: int) -> dict[str, Any]:
  """Median/best rate over repetitions of `work` items.

  cpu_per_wall is the CPU time this process got per second (at most the core
  count): well below it means other processes took the cores.
  """
  times = [t for t, _ in timed]
  return dict(times_s=times, items_per_rep=work,
              median_per_s=work / statistics.median(times),
              best_per_s=work / min(times),
              cpu_per_wall=sum(c for _, c in timed) / sum(times))


def _paired(num, num_work, den, den_work) -> float:
  """Median over repetitions of the rate ratio of back-to-back timings.

  Each repetition times both sides within seconds of each other, so this
  ratio is less sensitive than a ratio of medians to load that drifts.
  """
  return statistics.median((num_work / n) / (den_work / d)
                           for (n, _), (d, _) in zip(num, den))


class _Case:
  """One model, input shape and batch size, with its compiled functions."""

  def __init__(self, model: str, shape, batch_size: int, num_samples: int,
               s: dict[str, Any]):
    self.bundle = models.build(model, _NUM_CLASSES, shape)
    self.apply_fn = self.bundle.apply_fn  # one object: the step cache key
    self.variables = self.bundle.init(0)
    self.batch_size = batch_size
    self.num_samples = num_samples
    self.spb = s['samples_per_block']
    rng = np.random.default_rng(0)
    self.x = rng.uniform(size=(s['num_examples'],) + shape).astype(np.float32)
    self.total = s['num_examples'] * num_samples
    self.key = jax.random.key(0)

  def sampler_fn(self, mesh, num_samples=None):
    """A zero-argument call of sample_counts on this case."""
    return lambda: sampler.sample_counts(
        self.apply_fn, self.variables, self.x, _SIGMA, self.key,
        num_samples or self.num_samples, _NUM_CLASSES, self.batch_size,
        samples_per_block=self.spb, mesh=mesh)

  def padding(self, ndev: int) -> float:
    """Fraction of computed samples that are padding at `ndev` devices."""
    blocks = self.x.shape[0] * math.ceil(self.num_samples / self.spb)
    per_step = self.batch_size // self.spb * ndev
    return 1.0 - self.total / (math.ceil(blocks / per_step) * per_step *
                               self.spb)

  def warm_sampler(self, mesh) -> None:
    """Compiles the step (one short call; the step is cached by shape)."""
    self.sampler_fn(mesh, num_samples=self.spb)()

  def forward_fn(self, calls: int):
    """`calls` back-to-back jitted forward passes on a fixed batch."""
    fwd = jax.jit(self.apply_fn)
    xb = jnp.asarray(np.resize(self.x, (self.batch_size,) + self.x.shape[1:]))
    jax.block_until_ready(fwd(self.variables, xb))

    def run():
      out = None
      for _ in range(calls):
        out = fwd(self.variables, xb)
      return out
    return run

  def noise_fn(self, calls: int):
    """`calls` times the noise of one step (per-device blocks) alone."""
    p = self.batch_size // self.spb
    shape = self.x.shape[1:]

    @jax.jit
    def gen(key, x, sigma, ids, blocks):
      def one(xi, si, idi, bi):
        k = noise_lib.block_key(key, int(noise_lib.Purpose.ESTIMATE), idi, bi)
        return xi[None] + noise_lib.draw(k, (self.spb,) + shape, si)
      return jax.vmap(one)(x, sigma, ids, blocks)

    args = (self.key, jnp.asarray(np.resize(self.x, (p,) + shape)),
            jnp.full((p,), _SIGMA, jnp.float32), jnp.zeros((p, 2), jnp.uint32),
            jnp.arange(p, dtype=jnp.int32))
    jax.block_until_ready(gen(*args))

    def run():
      out = None
      for _ in range(calls):
        out = gen(*args)
      return out
    return run


def _measure_main(s: dict[str, Any]) -> list[dict[str, Any]]:
  """Part 1: forward vs sampler on one device, this process."""
  mesh = sampler.make_mesh(1)
  rows = []
  for model, shape, bs, n in _configs(s):
    case = _Case(model, shape, bs, n, s)
    # Forward reps do the sampler's work (its samples, rounded up to batches).
    calls = max(1, math.ceil(case.total / bs))
    fwd = case.forward_fn(calls)
    case.warm_sampler(mesh)
    smp = case.sampler_fn(mesh)
    noise = case.noise_fn(calls)
    t_f, t_s, t_n = [], [], []
    for _ in range(s['reps']):
      _timed(fwd, t_f)
      _timed(smp, t_s)
      _timed(noise, t_n)
    row = dict(model=model, input_shape=list(shape), batch_size=bs,
               loadavg=list(os.getloadavg()),
               num_examples=s['num_examples'], num_samples_per_example=n,
               samples_per_block=case.spb, padding_fraction=case.padding(1),
               forward=_summary(t_f, calls * bs),
               sampler=_summary(t_s, case.total),
               noise_only=_summary(t_n, calls * bs))
    row['ratio_sampler_over_forward'] = (row['sampler']['median_per_s'] /
                                         row['forward']['median_per_s'])
    row['ratio_best'] = (row['sampler']['best_per_s'] /
                         row['forward']['best_per_s'])
    row['ratio_paired'] = _paired(t_s, case.total, t_f, calls * bs)
    print(f'[1 dev] {model} {shape} bs={bs}: forward '
          f'{row["forward"]["median_per_s"]:.0f} img/s, sampler '
          f'{row["sampler"]["median_per_s"]:.0f} samples/s, ratio '
          f'{row["ratio_sampler_over_forward"]:.2f}', flush=True)
    rows.append(row)
  return rows


def _measure_devices(s: dict[str, Any]) -> list[dict[str, Any]]:
  """Part 2 (in the child): sampler at 1 vs 2 devices, same per-device batch."""
  meshes = {1: sampler.make_mesh(1), 2: sampler.make_mesh(2)}
  rows = []
  for model, shape, bs, n in _configs(s):
    case = _Case(model, shape, bs, n, s)
    fns = {}
    for d, mesh in meshes.items():
      case.warm_sampler(mesh)
      fns[d] = case.sampler_fn(mesh)
    times = {1: [], 2: []}
    for _ in range(s['reps']):
      for d in meshes:
        _timed(fns[d], times[d])
    row = dict(model=model, input_shape=list(shape), batch_size=bs,
               loadavg=list(os.getloadavg()),
               num_examples=s['num_examples'], num_samples_per_example=n)
    for d in meshes:
      row[f'sampler_{d}dev'] = _summary(times[d], case.total)
      row[f'padding_fraction_{d}dev'] = case.padding(d)
    row['ratio_2dev_over_1dev'] = (row['sampler_2dev']['median_per_s'] /
                                   row['sampler_1dev']['median_per_s'])
    row['ratio_best'] = (row['sampler_2dev']['best_per_s'] /
                         row['sampler_1dev']['best_per_s'])
    row['ratio_paired'] = _paired(times[2], case.total, times[1], case.total)
    print(f'[1 vs 2 dev] {model} {shape} bs={bs}: '
          f'{row["sampler_1dev"]["median_per_s"]:.0f} -> '
          f'{row["sampler_2dev"]["median_per_s"]:.0f} samples/s, ratio '
          f'{row["ratio_2dev_over_1dev"]:.2f}', flush=True)
    rows.append(row)
  return rows


def _machine() -> dict[str, Any]:
  return bench_common.machine()


def _fmt(v: float | None, digits: int = 0) -> str:
  return '-' if v is None else f'{v:,.{digits}f}'


def _table(main_rows, dev_rows) -> str:
  """The Markdown summary."""
  dev = {(r['model'], tuple(r['input_shape']), r['batch_size']): r
         for r in dev_rows}
  lines = [
      '| model | input | batch/dev | forward img/s | noise-only img/s | '
      'sampler samples/s | sampler/forward | 1-dev samples/s | '
      '2-dev samples/s | 2-dev/1-dev | CPU/wall |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in main_rows:
    d = dev.get((r['model'], tuple(r['input_shape']), r['batch_size']), {})
    lines.append(
        f'| {r["model"]} | {"x".join(map(str, r["input_shape"]))} | '
        f'{r["batch_size"]} | {_fmt(r["forward"]["median_per_s"])} | '
        f'{_fmt(r["noise_only"]["median_per_s"])} | '
        f'{_fmt(r["sampler"]["median_per_s"])} | '
        f'{_fmt(r["ratio_sampler_over_forward"], 2)}x '
        f'({_fmt(r["ratio_paired"], 2)}x) | '
        f'{_fmt(d.get("sampler_1dev", {}).get("median_per_s"))} | '
        f'{_fmt(d.get("sampler_2dev", {}).get("median_per_s"))} | '
        f'{_fmt(d.get("ratio_2dev_over_1dev"), 2)}'
        f'{"x (" + _fmt(d["ratio_paired"], 2) + "x)" if d else ""} | '
        f'{_fmt(r["sampler"]["cpu_per_wall"], 2)} |')
  lines.append('\nRatios: of median rates (in brackets: median of per-'
               'repetition ratios, sturdier under drifting load).')
  lines.append('CPU/wall: cores this process got while the 1-device '
               'sampler ran (of os.cpu_count()); less means contention.')
  return '\n'.join(lines)


def main(argv):
  del argv
  s = _settings()
  if _CHILD_OUT.value:
    if len(jax.devices()) < 2:
      raise RuntimeError('child needs 2 devices; XLA_FLAGS not applied?')
    rows = _measure_devices(s)
    with open(_CHILD_OUT.value, 'w') as f:
      json.dump(dict(devices=[str(d) for d in jax.devices()], rows=rows), f)
    return
  machine = _machine()
  t0 = time.perf_counter()
  main_rows = _measure_main(s)
  child = None if _SKIP_DEVICES.value else bench_common.run_child(__file__)
  machine['loadavg_end'] = list(os.getloadavg())
  result = dict(machine=machine, settings=s, sigma=_SIGMA,
                num_classes=_NUM_CLASSES, wall_s=time.perf_counter() - t0,
                forward_vs_sampler=main_rows,
                devices_1_vs_2=child['rows'] if child else [],
                child_devices=child['devices'] if child else [])
  if _OUT.value:
    bench_common.write_result(_OUT.value, result)
  print(_table(main_rows, result['devices_1_vs_2']))


if __name__ == '__main__':
  app.run(main)
