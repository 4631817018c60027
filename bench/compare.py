r"""dds_jax against the PyTorch reference code: same models, inputs, settings.

Usage (from the repository root)::

  PYTHONPATH=. python bench/compare.py [--quick] [--models=small_cnn,resnet18]
      [--reps=2] [--out=bench/results/compare.json]

For each model (random-init dds_jax parameters; the PyTorch twin gets the same
weights through `dds_jax.convert.to_torch_state_dict`, see
`bench/reference_torch.py`, and the run stops unless both give the same
logits) on the same images, sigma and N:

1. certification samples/s = images x (n0 + N) / wall time:
   `dds_jax.certify.certify(..., batch_size=1000)` on all images in one call
   vs the reference `Smooth.certify` (Cohen's loop, batch 1000) image after
   image, as DDRS's `certify_ds.py` runs it. Only requested samples count:
   the JAX sampler computes whole blocks of 100, n0 and N in one pass, in
   steps of 1000 images and one smaller tail step; what it computes beyond
   the request is `jax_computed_samples`.
2. sigma-optimization examples/s = images / wall time:
   `dds_jax.sigma_opt.optimize_sigma(steps=K, num_samples=m,
   examples_per_device=images)` vs the official batched ascent
   (`OptimzeSigma`) on the same images at once; both plain ascent, lr 1e-4.
   (JAX also evaluates the proxy once more after the last step.)
3. profile, per framework: the bare forward pass at the certification batch
   (1000 images: jitted `apply_fn` / `torch.no_grad()`), the noise alone for
   one such batch (the sampler's per-block noise, jitted / `randn_like *
   sigma + x`), and the JAX sampler's samples/s over the estimation phase
   (the n draws) against the jitted forward pass.

Compilation (JAX) and first calls (PyTorch) are excluded by a warm-up on the
same shapes. Repetitions alternate between the frameworks so that load from
other processes hits both alike; medians are reported. PyTorch uses
`torch.set_num_threads(os.cpu_count())`; XLA uses all cores by default.
`os.getloadavg()` is recorded at the start and end of the run and of every
model, with each timing's CPU seconds per wall second (`cpu_per_wall`).

Writes every measurement and a machine description to --out as JSON and
prints a Markdown table last.
"""

from __future__ import annotations

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
import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common as bench_common
from bench import reference_torch
from dds_jax.certify import certify as jax_certify
from dds_jax import models
from dds_jax import noise as noise_lib
from dds_jax import sampler
from dds_jax import sigma_opt
# pylint: enable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list('models', ['small_cnn', 'resnet18'],
                            'Models to compare (32x32x3 inputs).')
_NUM_IMAGES = flags.DEFINE_list(
    'num_images', ['small_cnn:2', 'resnet18:2'],
    'Images per model, as MODEL:INT pairs.')
_CERTIFY_N = flags.DEFINE_list(
    'certify_n', ['small_cnn:5000', 'resnet18:1000'],
    'N (estimation draws) per model, as MODEL:INT pairs.')
_SIGMA_STEPS = flags.DEFINE_list(
    'sigma_steps', ['small_cnn:100', 'resnet18:10'],
    'Ascent steps K per model, as MODEL:INT pairs.')
_SIGMA_M = flags.DEFINE_list(
    'sigma_m', ['small_cnn:8', 'resnet18:8'],
    'Noise draws m per ascent step per model, as MODEL:INT pairs.')
_REPS = flags.DEFINE_integer(
    'reps', 2, 'Timed repetitions of certify and sigma-opt (median taken); '
    'the forward / noise profile runs once.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 1000, 'Certification batch, both frameworks (certify_ds.py '
    'default 1000); a multiple of 100.')
_JAX_BATCH_SIZE = flags.DEFINE_integer(
    'jax_batch_size', None, 'Noisy images per device per step for JAX only '
    '(default: --batch_size): the sampler\'s batch is a tuning knob, the '
    'reference keeps Cohen\'s.')
_TORCH_1THREAD_PROBE = flags.DEFINE_bool(
    'torch_1thread_probe', True,
    'Also time the PyTorch sigma ascent once with torch.set_num_threads(1): '
    'its many small ops are sensitive to how the threads get the cores.')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'Tiny sizes (a smoke test, about a minute).')
_OUT = flags.DEFINE_string('out', 'bench/results/compare.json',
                           'Where to write the JSON results.')

_SHAPE = (32, 32, 3)
_NUM_CLASSES = 10
_SIGMA = 0.25
_N0 = 100
_ALPHA = 0.001
_LR = 1e-4
_QUICK_SETTINGS = dict(num_images=1, certify_n=200, sigma_steps=2, sigma_m=2,
                       reps=1, batch_size=100)


def _per_model(values: list[str], what: str) -> dict[str, int]:
  out = {}
  for item in values:
    name, _, n = item.partition(':')
    out[name] = int(n)
  missing = [m for m in _MODELS.value if m not in out]
  if missing:
    raise app.UsageError(f'--{what} has no value for {missing}')
  return out


def _settings() -> dict[str, Any]:
  for m in _MODELS.value:
    if m not in ('small_cnn', 'resnet18'):
      raise app.UsageError(f'unknown model {m!r}')
  if _QUICK.value:
    q = _QUICK_SETTINGS
    per = {k: {m: q[k] for m in _MODELS.value}
           for k in ('num_images', 'certify_n', 'sigma_steps', 'sigma_m')}
    return dict(per, reps=q['reps'], batch_size=q['batch_size'],
                jax_batch_size=q['batch_size'])
  if _BATCH_SIZE.value % sampler.DEFAULT_SAMPLES_PER_BLOCK:
    raise app.UsageError('--batch_size must be a multiple of 100')
  jax_batch = _JAX_BATCH_SIZE.value or _BATCH_SIZE.value
  if jax_batch % sampler.DEFAULT_SAMPLES_PER_BLOCK:
    raise app.UsageError('--jax_batch_size must be a multiple of 100')
  return dict(batch_size=_BATCH_SIZE.value, jax_batch_size=jax_batch,
              num_images=_per_model(_NUM_IMAGES.value, 'num_images'),
              certify_n=_per_model(_CERTIFY_N.value, 'certify_n'),
              sigma_steps=_per_model(_SIGMA_STEPS.value, 'sigma_steps'),
              sigma_m=_per_model(_SIGMA_M.value, 'sigma_m'),
              reps=_REPS.value)


def _timed(fn: Callable[[], Any], out: list[tuple[float, float]]) -> Any:
  """Appends (wall s, process CPU s) of one call of fn; returns its result."""
  c, t = os.times(), time.perf_counter()
  result = jax.block_until_ready(fn())
  t, c2 = time.perf_counter() - t, os.times()
  out.append((t, c2.user - c.user + c2.system - c.system))
  return result


def _summary(timed: list[tuple[float, float]], work: float) -> dict[str, Any]:
  times = [t for t, _ in timed]
  return dict(times_s=times, items_per_rep=work,
              median_per_s=work / statistics.median(times),
              best_per_s=work / min(times),
              cpu_per_wall=sum(c for _, c in timed) / sum(times))


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class _Case:
  """One model: its JAX and PyTorch callables on fixed inputs."""

  def __init__(self, name: str, s: dict[str, Any]):
    self.name = name
    self.bundle = models.build(name, _NUM_CLASSES, _SHAPE)
    self.apply_fn = self.bundle.apply_fn  # one object: the step cache key
    self.variables = jax.jit(self.bundle.init)(jax.random.key(0))
    self.torch_model = reference_torch.from_flax(self.bundle, self.variables)
    self.b = s['num_images'][name]
    self.n = s['certify_n'][name]
    self.steps = s['sigma_steps'][name]
    self.m = s['sigma_m'][name]
    self.batch = s['batch_size']
    self.jax_batch = s['jax_batch_size']
    rng = np.random.default_rng(0)
    self.x = rng.uniform(size=(self.b,) + _SHAPE).astype(np.float32)
    self.xt = _nchw(self.x)
    self.key = jax.random.key(0)
    self.phase_times = []

  # --- certification -------------------------------------------------------

  def jax_certify(self):
    # n0 and N are drawn in one sampler pass (dds_jax.sampler.sample_streams),
    # so there is no separate estimation phase to time here.
    return jax_certify(
        self.apply_fn, self.variables, self.x, _SIGMA, self.key, n0=_N0,
        n=self.n, alpha=_ALPHA, batch_size=self.jax_batch)

  def torch_certify(self):
    smooth = reference_torch.Smooth(self.torch_model, _NUM_CLASSES, _SIGMA)
    return [smooth.certify(self.xt[i], _N0, self.n, _ALPHA, self.batch)
            for i in range(self.b)]

  def jax_computed_samples(self) -> int:
    """Noisy images the JAX sampler pushes through, padding included."""
    spb = sampler.DEFAULT_SAMPLES_PER_BLOCK
    blocks = self.b * (-(-_N0 // spb) + -(-self.n // spb))
    per_device = self.jax_batch // spb
    ndev = jax.device_count()
    return sum(sampler._step_sizes(blocks, per_device, ndev)) * ndev * spb  # pylint: disable=protected-access

  # --- sigma optimization --------------------------------------------------

  def jax_sigma(self, steps=None):
    return sigma_opt.optimize_sigma(
        self.apply_fn, self.variables, self.x, _SIGMA, self.key,
        steps=steps or self.steps, lr=_LR, num_samples=self.m,
        examples_per_device=-(-self.b // jax.device_count()))

  def torch_sigma(self, steps=None):
    return reference_torch.optimize_sigma(
        self.torch_model, self.xt, _LR, torch.full((self.b,), _SIGMA),
        steps or self.steps, self.m, _NUM_CLASSES).numpy()

  # --- profile ---------------------------------------------------------------

  def jax_forward(self):
    fwd = jax.jit(self.apply_fn)
    xb = jnp.asarray(np.resize(self.x, (self.batch,) + _SHAPE))
    jax.block_until_ready(fwd(self.variables, xb))
    return lambda: fwd(self.variables, xb)

  def jax_noise(self):
    """One sampler step's noise (10 blocks of 100 copies) alone, jitted."""
    spb = sampler.DEFAULT_SAMPLES_PER_BLOCK
    p = self.batch // spb

    @jax.jit
    def gen(key, x, sigma, ids, blocks):
      def one(xi, si, idi, bi):
        k = noise_lib.block_key(key, int(noise_lib.Purpose.ESTIMATE), idi, bi)
        return xi[None] + noise_lib.draw(k, (spb,) + _SHAPE, si)
      return jax.vmap(one)(x, sigma, ids, blocks)

    args = (self.key, jnp.asarray(np.resize(self.x, (p,) + _SHAPE)),
            jnp.full((p,), _SIGMA, jnp.float32), jnp.zeros((p, 2), jnp.uint32),
            jnp.arange(p, dtype=jnp.int32))
    jax.block_until_ready(gen(*args))
    return lambda: gen(*args)

  def torch_forward(self):
    batch = self.xt[0].repeat((self.batch, 1, 1, 1))

    def run():
      with torch.no_grad():
        return self.torch_model(batch).argmax(1).numpy()
    run()
    return run

  def torch_noise(self):
    def run():
      batch = self.xt[0].repeat((self.batch, 1, 1, 1))
      return (batch + torch.randn_like(batch) * _SIGMA).numpy()
    run()
    return run


def _measure(case: _Case, s: dict[str, Any]) -> dict[str, Any]:
  """All timings of one model."""
  name = case.name
  load_start = list(os.getloadavg())
  noisy = case.x[np.arange(8) % case.b] + _SIGMA * np.random.default_rng(
      1).normal(size=(8,) + _SHAPE)
  probe = np.concatenate([case.x, np.clip(noisy, 0, 1).astype(np.float32)])
  same = reference_torch.check_same_function(case.bundle, case.variables,
                                             case.torch_model, probe)
  print(f'[{name}] same function: argmax agreement {same["agreement"]:.3f} '
        f'on {len(probe)} images, max |logit diff| '
        f'{same["max_abs_diff"]:.2e} (scale {same["logit_scale"]:.2f})',
        flush=True)

  # Warm-up: compile every JAX shape (the sampler's step, the ascent, the
  # bare forward pass, the noise) and call every torch shape once (the
  # forward passes at n0 and at the batch size, one ascent step).
  t = time.perf_counter()
  sampler.sample_counts(case.apply_fn, case.variables, case.x[:1], _SIGMA,
                        case.key, _N0, _NUM_CLASSES, case.batch)
  case.jax_sigma()
  jax_fwd, jax_noise = case.jax_forward(), case.jax_noise()
  warm_jax = time.perf_counter() - t
  t = time.perf_counter()
  with torch.no_grad():
    case.torch_model(case.xt[:1].repeat((min(_N0, case.batch), 1, 1, 1)))
  torch_fwd, torch_noise = case.torch_forward(), case.torch_noise()
  case.torch_sigma(steps=1)
  warm_torch = time.perf_counter() - t
  print(f'[{name}] warm-up: JAX {warm_jax:.1f} s (compilation), PyTorch '
        f'{warm_torch:.1f} s', flush=True)

  t_jc, t_tc, t_js, t_ts = [], [], [], []
  t_jf, t_tf, t_jn, t_tn, t_ts1 = [], [], [], [], []
  case.phase_times.clear()
  for rep in range(s['reps']):
    jax_cert = _timed(case.jax_certify, t_jc)
    torch_cert = _timed(case.torch_certify, t_tc)
    jax_sig = _timed(case.jax_sigma, t_js)
    torch_sig = _timed(case.torch_sigma, t_ts)
    if rep == 0:  # the profile, once
      _timed(jax_fwd, t_jf)
      _timed(torch_fwd, t_tf)
      _timed(jax_noise, t_jn)
      _timed(torch_noise, t_tn)
    if rep == 0 and _TORCH_1THREAD_PROBE.value:
      threads = torch.get_num_threads()
      torch.set_num_threads(1)
      try:
        case.torch_sigma(steps=1)
        _timed(case.torch_sigma, t_ts1)
      finally:
        torch.set_num_threads(threads)
    print(f'[{name}] rep {rep}: certify JAX {t_jc[-1][0]:.1f} s / PyTorch '
          f'{t_tc[-1][0]:.1f} s; sigma-opt JAX {t_js[-1][0]:.1f} s / '
          f'PyTorch {t_ts[-1][0]:.1f} s', flush=True)

  samples = case.b * (_N0 + case.n)
  row = dict(
      model=name, input_shape=list(_SHAPE), num_images=case.b, n0=_N0,
      n=case.n, alpha=_ALPHA, sigma=_SIGMA, batch_size=case.batch,
      jax_batch_size=case.jax_batch, jax_devices=jax.device_count(),
      sigma_steps=case.steps, sigma_m=case.m, lr=_LR,
      params=models.count_params(case.variables),
      same_function=same, warmup_s=dict(jax=warm_jax, torch=warm_torch),
      certify=dict(
          jax=_summary(t_jc, samples), torch=_summary(t_tc, samples),
          samples_per_rep=samples,
          jax_computed_samples=case.jax_computed_samples(),
          jax_pred=jax_cert.pred.tolist(),
          jax_radius=jax_cert.radius.tolist(),
          torch_pred=[int(p) for p, _ in torch_cert],
          torch_radius=[float(r) for _, r in torch_cert]),
      sigma_opt=dict(
          jax=_summary(t_js, case.b), torch=_summary(t_ts, case.b),
          noisy_images_per_rep=case.b * case.m * case.steps,
          jax_sigma=np.asarray(jax_sig).tolist(),
          torch_sigma=np.asarray(torch_sig).tolist()),
      profile=dict(
          jax_forward=_summary(t_jf, case.batch),
          torch_forward=_summary(t_tf, case.batch),
          jax_noise=_summary(t_jn, case.batch),
          torch_noise=_summary(t_tn, case.batch)),
      loadavg_start=load_start, loadavg_end=list(os.getloadavg()))
  c, g, p = row['certify'], row['sigma_opt'], row['profile']
  c['ratio_jax_over_torch'] = (c['jax']['median_per_s'] /
                               c['torch']['median_per_s'])
  g['ratio_jax_over_torch'] = (g['jax']['median_per_s'] /
                               g['torch']['median_per_s'])
  p['ratio_forward_jax_over_torch'] = (p['jax_forward']['median_per_s'] /
                                       p['torch_forward']['median_per_s'])
  c['jax_certify_over_forward'] = (c['jax']['median_per_s'] /
                                   p['jax_forward']['median_per_s'])
  c['torch_certify_over_forward'] = (c['torch']['median_per_s'] /
                                     p['torch_forward']['median_per_s'])
  if t_ts1:
    g['torch_1thread'] = _summary(t_ts1, case.b)
    g['ratio_jax_over_torch_1thread'] = (
        g['jax']['median_per_s'] / g['torch_1thread']['median_per_s'])
  if case.phase_times:
    est = statistics.median(t for _, t in case.phase_times)
    c['jax_sampler_estimation'] = dict(
        times_s=[t for _, t in case.phase_times], samples=case.b * case.n,
        median_per_s=case.b * case.n / est,
        over_forward=case.b * case.n / est / p['jax_forward']['median_per_s'])
  print(f'[{name}] certify {c["jax"]["median_per_s"]:.0f} vs '
        f'{c["torch"]["median_per_s"]:.0f} samples/s '
        f'({c["ratio_jax_over_torch"]:.2f}x); sigma-opt '
        f'{g["jax"]["median_per_s"]:.3f} vs {g["torch"]["median_per_s"]:.3f} '
        f'examples/s ({g["ratio_jax_over_torch"]:.2f}x)', flush=True)
  return row


def _machine() -> dict[str, Any]:
  return bench_common.machine(
      torch=torch.__version__, torch_threads=torch.get_num_threads(),
      torch_interop_threads=torch.get_num_interop_threads(),
      torch_mkldnn=torch.backends.mkldnn.is_available())


def _fmt(v: float | None, digits: int = 0) -> str:
  return '-' if v is None else f'{v:,.{digits}f}'


def _row(model: str, task: str, setting: str, jax_s: dict[str, Any],
         torch_s: dict[str, Any], digits: int = 0, bold: bool = False) -> str:
  """One table line: medians, JAX/PyTorch of medians and of bests."""
  ratio = jax_s['median_per_s'] / torch_s['median_per_s']
  best = jax_s['best_per_s'] / torch_s['best_per_s']
  ratio_s = f'{ratio:.2f}x'
  if bold:
    ratio_s = f'**{ratio_s}**'
  return (f'| {model} | {task} | {setting} | '
          f'{_fmt(jax_s["median_per_s"], digits)} | '
          f'{_fmt(torch_s["median_per_s"], digits)} | {ratio_s} | '
          f'{best:.2f}x | {jax_s["cpu_per_wall"]:.2f}, '
          f'{torch_s["cpu_per_wall"]:.2f} |')


def _table(rows: list[dict[str, Any]]) -> str:
  """The Markdown summary."""
  lines = [
      '| model | task | setting | JAX | PyTorch | JAX/PyTorch (median) | '
      'JAX/PyTorch (best) | CPU/wall JAX, PyTorch |',
      '|---|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    c, g, p = r['certify'], r['sigma_opt'], r['profile']
    m = r['model']
    lines.append(_row(
        m, 'certify, samples/s',
        f'{r["num_images"]} images, n0={r["n0"]}, N={r["n"]:,}, batch '
        f'{r["batch_size"]}' + (
            f' (JAX {r["jax_batch_size"]} x {r["jax_devices"]} dev)'
            if (r['jax_batch_size'], r['jax_devices']) != (r['batch_size'], 1)
            else ''), c['jax'], c['torch'], bold=True))
    lines.append(_row(
        m, 'sigma-opt, examples/s',
        f'{r["num_images"]} images, K={r["sigma_steps"]}, m={r["sigma_m"]}',
        g['jax'], g['torch'], digits=3, bold=True))
    if 'torch_1thread' in g:
      lines.append(_row(m, 'sigma-opt, PyTorch on 1 thread', '(same, 1 rep)',
                        g['jax'], g['torch_1thread'], digits=3))
    lines.append(_row(m, 'forward, img/s', f'batch {r["batch_size"]}',
                      p['jax_forward'], p['torch_forward']))
    lines.append(_row(m, 'noise only, img/s', f'batch {r["batch_size"]}',
                      p['jax_noise'], p['torch_noise']))
  lines.append('')
  lines.append('| model | JAX sampler (N draws) samples/s | JAX forward img/s '
               '| sampler/forward | JAX certify/forward | PyTorch '
               'certify/forward | JAX computed/requested samples |')
  lines.append('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    c, p = r['certify'], r['profile']
    est = c.get('jax_sampler_estimation', {})
    lines.append(
        f'| {r["model"]} | {_fmt(est.get("median_per_s"))} | '
        f'{_fmt(p["jax_forward"]["median_per_s"])} | '
        f'{_fmt(est.get("over_forward"), 2)} | '
        f'{_fmt(c["jax_certify_over_forward"], 2)} | '
        f'{_fmt(c["torch_certify_over_forward"], 2)} | '
        f'{c["jax_computed_samples"] / c["samples_per_rep"]:.2f} |')
  lines.append(
      '\nMedians over repetitions (the profile rows: one); samples/s counts '
      'the requested samples, images x (n0 + N). CPU/wall: cores the '
      'process got (of os.cpu_count()); less means other processes took '
      'them. Certification and sigma-opt repetitions alternate between the '
      'frameworks.')
  return '\n'.join(lines)


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  s = _settings()
  machine = _machine()
  t0 = time.perf_counter()
  rows = [_measure(_Case(name, s), s) for name in _MODELS.value]
  machine['loadavg_end'] = list(os.getloadavg())
  result = dict(machine=machine, settings=s, quick=_QUICK.value,
                params='random init (bundle.init(key 0)), same in both',
                wall_s=time.perf_counter() - t0, rows=rows)
  if _OUT.value:
    bench_common.write_result(_OUT.value, result)
  print(_table(rows))


if __name__ == '__main__':
  app.run(main)
