r"""dds_jax against the PyTorch reference code: same models, inputs, settings.

Usage (from the repository root)::

  PYTHONPATH=. python bench/compare.py [--quick] [--models=small_cnn,resnet18]
      [--reps=2] [--dtypes=float32,bfloat16] [--torch_device=auto|cpu|cuda]
      [--batch_sweep=1000,2000,4000,8000] [--checkpoint=EXPORT_DIR,...]
      [--images=IMAGES.npz] [--time_budget_s=0]
      [--out=bench/results/compare.json]

The GPU run (ResNet-18, float32 and bfloat16, JAX and PyTorch on the GPU)::

  PYTHONPATH=. python bench/compare.py --models=resnet18 \
      --dtypes=float32,bfloat16 --num_images=resnet18:20 \
      --certify_n=resnet18:8000 --batch_sweep=1000,2000,4000,8000 \
      [--checkpoint=<export dir of a trained resnet18>] --time_budget_s=300 \
      --out=/tmp/compare_gpu.json

For each model (random-init dds_jax parameters, or trained ones from
`--checkpoint`, a `dds_jax.checkpoint.export_params` directory; the PyTorch
twin gets the same weights through `dds_jax.convert.to_torch_state_dict`, see
`bench/reference_torch.py`, and the run stops unless both give the same
logits, checked at full float32 precision, TF32 off) and each compute dtype
of `--dtypes` (one row each), on the same images, sigma and N:

1. certification samples/s = images x (n0 + N) / wall time:
   `dds_jax.certify.certify(..., batch_size=B)` on all images in one call
   vs the reference `Smooth.certify` (Cohen's loop, batch 1000) image after
   image, as DDRS's `certify_ds.py` runs it, at the same dtype: JAX builds
   the model with `models.build(..., dtype=jnp.bfloat16)` (parameters stay
   float32, the same variables), PyTorch runs under
   `torch.autocast(device_type, dtype=torch.bfloat16)`. The headline is
   JAX/PyTorch at equal dtype and batch (`--batch_size`, default 1000). Only
   requested samples count: the JAX sampler computes whole blocks of 100,
   n0 and N in one pass, in steps of B images and one smaller tail step;
   what it computes beyond the request is `jax_computed_samples`.
2. best batch (`--batch_sweep`): JAX certification once at each per-device
   batch of the list (after compiling its shapes); the fastest is measured
   again with the headline's repetitions, and so is PyTorch's loop at that
   batch (`--torch_best_batch`). `extrapolated_500_images_n100000_s` is
   500 x (100 + 100,000) / the JAX samples/s (the faster of --batch_size
   and the best batch, both with --reps): an extrapolation, meaningful from
   20 images on (PyTorch's in `extrapolation`).
3. sigma-optimization examples/s = images / wall time (`--sigma_opt`):
   `dds_jax.sigma_opt.optimize_sigma(steps=K, num_samples=m,
   examples_per_device=images)` vs the official batched ascent
   (`OptimzeSigma`) on the same images at once; both plain ascent, lr 1e-4.
   (JAX also evaluates the proxy once more after the last step.)
4. profile, per framework: the bare forward pass at each certification batch
   (jitted `apply_fn` / `torch.no_grad()`), `sampler_over_forward` =
   certification samples/s / forward img/s at the same batch, and the noise
   alone for one batch (the sampler's per-block noise, jitted /
   `randn_like * sigma + x`).
5. bfloat16 agreement (rows of dtype bfloat16): `--agreement_samples` noisy
   copies of the benchmark's images (sigma 0.25, one fixed key, drawn once),
   the fraction whose argmax differs between bfloat16 and float32, in JAX
   and between autocast and float32 in PyTorch. With random-init weights
   most predictions fall in one class (`fp32_top_class_fraction`), which
   makes agreement trivially high: give `--checkpoint` (and `--images`).

PyTorch runs on CUDA when available (`--torch_device=auto`), model and
tensors on the GPU, the noise drawn there (`randn_like`), with
`torch.cuda.synchronize()` inside every timed region; JAX on its default
backend. Compilation (JAX: every shape a timed call uses) and first calls
(PyTorch: every batch shape) are excluded by a warm-up. Repetitions alternate
between the frameworks so that load from other processes hits both alike;
medians are reported. PyTorch uses `torch.set_num_threads(os.cpu_count())`
(it matters on CPU only); XLA uses all cores by default. `os.getloadavg()` is
recorded at the start and end of the run and of every row, with each
timing's CPU seconds per wall second (`cpu_per_wall`). On a GPU,
`XLA_PYTHON_CLIENT_MEM_FRACTION` defaults to 0.5 here (JAX would take 75%),
leaving PyTorch its share.

Writes every measurement and a machine description (devices, driver) to --out
as JSON after every completed row (`truncated: true` until the end), stops
starting measurements once `--time_budget_s` is spent (the row in progress is
dropped, `truncated: true`) and prints a Markdown table last.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
# JAX preallocates 75% of a GPU's memory by default; PyTorch shares the GPU.
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from bench import common as bench_common
from bench import reference_torch
from dds_jax.certify import certify as jax_certify
from dds_jax import checkpoint as ckpt_lib
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
    'the forward / noise profile and the batch sweep run once.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 1000, 'Certification batch, both frameworks (certify_ds.py '
    'default 1000); a multiple of 100.')
_JAX_BATCH_SIZE = flags.DEFINE_integer(
    'jax_batch_size', None, 'Noisy images per device per step for JAX only '
    '(default: --batch_size): the sampler\'s batch is a tuning knob, the '
    'reference keeps Cohen\'s.')
_DTYPES = flags.DEFINE_list(
    'dtypes', ['float32'], 'Compute dtypes, one row each: float32, bfloat16 '
    '(JAX: models.build(dtype=jnp.bfloat16); PyTorch: torch.autocast).')
_TORCH_DEVICE = flags.DEFINE_enum(
    'torch_device', 'auto', ['auto', 'cpu', 'cuda'],
    'Where PyTorch runs; auto: CUDA when torch.cuda.is_available().')
_BATCH_SWEEP = flags.DEFINE_list(
    'batch_sweep', [], 'JAX per-device certification batches to try (one '
    'rep each, multiples of 100, e.g. 1000,2000,4000,8000); the fastest is '
    'measured again with --reps. Empty: no sweep.')
_TORCH_BEST_BATCH = flags.DEFINE_bool(
    'torch_best_batch', True, 'Also time PyTorch\'s loop at the best JAX '
    'batch of --batch_sweep (when it differs from --batch_size).')
_SIGMA_OPT = flags.DEFINE_bool(
    'sigma_opt', True, 'Time the sigma ascent in both frameworks.')
_CHECKPOINT = flags.DEFINE_list(
    'checkpoint', [], 'Trained parameters: dds_jax.checkpoint.export_params '
    'directories (params.msgpack, export.json naming the model; the '
    'architecture from a train_config.json there or one folder up), at most '
    'one per model of --models. Models without one: random init.')
_IMAGES = flags.DEFINE_string(
    'images', '', 'An .npz with an `images` array [N, 32, 32, 3] (uint8, or '
    'float in [0, 1]; dds_jax\'s data cache writes such files): its first '
    'images replace the uniform random ones.')
_AGREEMENT_SAMPLES = flags.DEFINE_integer(
    'agreement_samples', 10000, 'Noisy inputs of the bfloat16 vs float32 '
    'prediction agreement (rows of dtype bfloat16; --quick: 500 unless '
    'given); 0: skip.')
_TIME_BUDGET_S = flags.DEFINE_float(
    'time_budget_s', 0.0, 'Start no new measurement after this many seconds '
    '(0: no budget); the row in progress is dropped, the JSON says '
    'truncated.')
_TORCH_1THREAD_PROBE = flags.DEFINE_bool(
    'torch_1thread_probe', True,
    'Also time the PyTorch sigma ascent once with torch.set_num_threads(1): '
    'its many small ops are sensitive to how the threads get the cores '
    '(PyTorch on CPU only).')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'Tiny sizes (a smoke test, a minute or two).')
_OUT = flags.DEFINE_string('out', 'bench/results/compare.json',
                           'Where to write the JSON results.')

_SHAPE = (32, 32, 3)
_NUM_CLASSES = 10
_SIGMA = 0.25
_N0 = 100
_ALPHA = 0.001
_LR = 1e-4
_DTYPE_NAMES = ('float32', 'bfloat16')
_AGREEMENT_KEY = 1
_EXTRAPOLATE_IMAGES, _EXTRAPOLATE_N, _EXTRAPOLATE_MIN_IMAGES = 500, 100_000, 20
_QUICK_SETTINGS = dict(num_images=1, certify_n=200, sigma_steps=2, sigma_m=2,
                       reps=1, batch_size=100, agreement_samples=500)
_RANDOM_INIT = 'random init (bundle.init(key 0)), same in both'
_SPB = sampler.DEFAULT_SAMPLES_PER_BLOCK


def _per_model(values: list[str], what: str) -> dict[str, int]:
  out = {}
  for item in values:
    name, _, n = item.partition(':')
    out[name] = int(n)
  missing = [m for m in _MODELS.value if m not in out]
  if missing:
    raise app.UsageError(f'--{what} has no value for {missing}')
  return out


def _torch_device() -> str:
  want = _TORCH_DEVICE.value
  if want == 'auto':
    return 'cuda' if torch.cuda.is_available() else 'cpu'
  if want == 'cuda' and not torch.cuda.is_available():
    raise app.UsageError('--torch_device=cuda but torch.cuda.is_available() '
                         'is False')
  return want


def _checkpoints() -> dict[str, str]:
  """model name -> export directory, from --checkpoint."""
  out = {}
  for directory in _CHECKPOINT.value:
    try:
      with open(os.path.join(directory, ckpt_lib.EXPORT_META)) as f:
        name = json.load(f).get('model')
    except (OSError, ValueError) as e:
      raise app.UsageError(f'--checkpoint={directory}: no readable '
                           f'{ckpt_lib.EXPORT_META} ({e})') from e
    if name not in _MODELS.value:
      raise app.UsageError(f'--checkpoint={directory} holds model {name!r}, '
                           f'not one of --models={_MODELS.value}')
    if name in out:
      raise app.UsageError(f'two --checkpoint directories for {name!r}')
    out[name] = directory
  return out


def _settings() -> dict[str, Any]:
  for m in _MODELS.value:
    if m not in ('small_cnn', 'resnet18'):
      raise app.UsageError(f'unknown model {m!r}')
  dtypes = list(dict.fromkeys(d.strip() for d in _DTYPES.value))
  if not dtypes or any(d not in _DTYPE_NAMES for d in dtypes):
    raise app.UsageError(f'--dtypes must name some of {_DTYPE_NAMES}; got '
                         f'{_DTYPES.value}')
  sweep = sorted({int(b) for b in _BATCH_SWEEP.value})
  if any(b <= 0 or b % _SPB for b in sweep):
    raise app.UsageError('--batch_sweep must be positive multiples of 100')
  agreement = _AGREEMENT_SAMPLES.value
  if _QUICK.value and not flags.FLAGS['agreement_samples'].present:
    agreement = _QUICK_SETTINGS['agreement_samples']
  common = dict(dtypes=dtypes, torch_device=_torch_device(), batch_sweep=sweep,
                torch_best_batch=_TORCH_BEST_BATCH.value,
                sigma_opt=_SIGMA_OPT.value, agreement_samples=max(agreement, 0),
                checkpoints=_checkpoints(), images=_IMAGES.value or None,
                time_budget_s=_TIME_BUDGET_S.value)
  if _QUICK.value:
    q = _QUICK_SETTINGS
    per = {k: {m: q[k] for m in _MODELS.value}
           for k in ('num_images', 'certify_n', 'sigma_steps', 'sigma_m')}
    return dict(per, reps=q['reps'], batch_size=q['batch_size'],
                jax_batch_size=q['batch_size'], **common)
  if _BATCH_SIZE.value % _SPB:
    raise app.UsageError('--batch_size must be a multiple of 100')
  jax_batch = _JAX_BATCH_SIZE.value or _BATCH_SIZE.value
  if jax_batch % _SPB:
    raise app.UsageError('--jax_batch_size must be a multiple of 100')
  return dict(batch_size=_BATCH_SIZE.value, jax_batch_size=jax_batch,
              num_images=_per_model(_NUM_IMAGES.value, 'num_images'),
              certify_n=_per_model(_CERTIFY_N.value, 'certify_n'),
              sigma_steps=_per_model(_SIGMA_STEPS.value, 'sigma_steps'),
              sigma_m=_per_model(_SIGMA_M.value, 'sigma_m'),
              reps=_REPS.value, **common)


class _OverBudget(Exception):
  """--time_budget_s is spent: no new measurement starts."""


class _Budget:
  """Wall-clock budget, checked before every measurement."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.t0 = time.perf_counter()

  def check(self, what: str) -> None:
    elapsed = time.perf_counter() - self.t0
    if self.seconds > 0 and elapsed > self.seconds:
      raise _OverBudget(f'time budget {self.seconds:g} s spent after '
                        f'{elapsed:.0f} s, before: {what}')


_TORCH_SYNC = [lambda: None]  # torch.cuda.synchronize when PyTorch is on CUDA


def _timed(fn: Callable[[], Any], out: list[tuple[float, float]]) -> Any:
  """Appends (wall s, process CPU s) of one call of fn; returns its result."""
  _TORCH_SYNC[0]()
  c, t = os.times(), time.perf_counter()
  result = jax.block_until_ready(fn())
  _TORCH_SYNC[0]()
  t, c2 = time.perf_counter() - t, os.times()
  out.append((t, c2.user - c.user + c2.system - c.system))
  return result


def _summary(timed: list[tuple[float, float]], work: float) -> dict[str, Any]:
  times = [t for t, _ in timed]
  return dict(times_s=times, items_per_rep=work,
              median_per_s=work / statistics.median(times),
              best_per_s=work / min(times),
              cpu_per_wall=sum(c for _, c in timed) / sum(times))


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None,
           key: str = 'median_per_s') -> float | None:
  if not a or not b:
    return None
  return a[key] / b[key]


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@contextlib.contextmanager
def _full_precision():
  """float32 matmuls and convolutions in both frameworks (no TF32)."""
  saved = (torch.backends.cudnn.allow_tf32,
           torch.backends.cuda.matmul.allow_tf32)
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  try:
    with jax.default_matmul_precision('highest'):
      yield
  finally:
    (torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved


def _images(b: int, path: str | None) -> np.ndarray:
  """b images NHWC float32 in [0, 1]: uniform random, or the file's first."""
  if not path:
    rng = np.random.default_rng(0)
    return rng.uniform(size=(b,) + _SHAPE).astype(np.float32)
  with np.load(path) as z:
    x = z['images'][:b]
  if x.shape[1:] != _SHAPE or len(x) < b:
    raise app.UsageError(f'--images={path}: need {b} images of shape {_SHAPE}'
                         f', got {x.shape}')
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255
  return np.clip(x, 0, 1).astype(np.float32)


def _restore(name: str, directory: str):
  """(float32 bundle, variables, build kwargs, description) of an export."""
  config_path = next(
      (p for p in (os.path.join(directory, 'train_config.json'),
                   os.path.join(os.path.dirname(os.path.abspath(directory)),
                                'train_config.json')) if os.path.exists(p)),
      None)
  kwargs = {}
  if config_path:
    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    config.certify.checkpoint = directory
    # The float32 model (build_from_config takes certify.dtype where a
    # config has it); the bfloat16 one is built from it (_Model.bundle).
    config.certify.dtype = 'float32'
    bundle, variables, meta = ckpt_lib.restore_params_and_meta(
        config, directory, _SHAPE)
    if config.model.conv_features:  # as models.build_from_config
      kwargs['conv_features'] = tuple(config.model.conv_features)
  else:  # the model's default architecture
    bundle = models.build(name, _NUM_CLASSES, _SHAPE)
    variables, meta = ckpt_lib.load_exported(
        directory, jax.eval_shape(bundle.init, jax.random.key(0)))
  if bundle.module.dtype != jnp.float32:
    raise AssertionError(f'{directory}: restored a {bundle.module.dtype} model')
  if bundle.name != name:
    raise app.UsageError(f'--checkpoint={directory}: model {bundle.name!r}, '
                         f'not {name!r}')
  what = dict(kind='checkpoint', directory=directory, config=config_path,
              **{k: meta.get(k) for k in ('model', 'step', 'method', 'data',
                                          'dtype')})
  return bundle, variables, kwargs, what


class _Model:
  """One architecture: its variables, PyTorch twin, images and forwards."""

  def __init__(self, name: str, s: dict[str, Any], device: torch.device):
    self.name = name
    self.device = device
    directory = s['checkpoints'].get(name)
    if directory:
      bundle, self.variables, self.build_kwargs, self.weights = _restore(
          name, directory)
    else:
      bundle = models.build(name, _NUM_CLASSES, _SHAPE)
      self.variables = jax.jit(bundle.init)(jax.random.key(0))
      self.build_kwargs, self.weights = {}, dict(kind='random init',
                                                 description=_RANDOM_INIT)
    self.num_classes = bundle.num_classes
    self.bundles = {'float32': bundle}
    self.torch_model = reference_torch.from_flax(
        bundle, self.variables).to(device)
    self.b = s['num_images'][name]
    self.x = _images(self.b, s['images'])
    self.xt = _nchw(self.x).to(device)
    self._fwd = {}
    self._same = None

  def bundle(self, dtype: str) -> models.ModelBundle:
    if dtype not in self.bundles:
      b = models.build(self.name, self.num_classes, _SHAPE,
                       dtype=getattr(jnp, dtype), **self.build_kwargs)
      want = jax.tree.map(lambda a: (a.shape, a.dtype), self.variables)
      got = jax.tree.map(lambda a: (a.shape, a.dtype),
                         jax.eval_shape(b.init, jax.random.key(0)))
      if want != got:
        raise AssertionError(f'the {dtype} {self.name} has other variables '
                             'than the float32 one')
      self.bundles[dtype] = b
    return self.bundles[dtype]

  def fwd(self, dtype: str):
    """The jitted forward pass of dtype (one object: shapes compile once)."""
    if dtype not in self._fwd:
      self._fwd[dtype] = jax.jit(self.bundle(dtype).apply_fn)
    return self._fwd[dtype]

  def autocast(self, dtype: str):
    if dtype == 'float32':
      return contextlib.nullcontext()
    return torch.autocast(device_type=self.device.type,
                          dtype=getattr(torch, dtype))

  def same_function(self) -> dict[str, Any]:
    """Logits of both frameworks at float32 (TF32 off); raises if not same."""
    if self._same is None:
      noisy = self.x[np.arange(8) % self.b] + _SIGMA * np.random.default_rng(
          1).normal(size=(8,) + _SHAPE)
      probe = np.concatenate([self.x, np.clip(noisy, 0, 1).astype(np.float32)])
      with _full_precision():
        self._same = reference_torch.check_same_function(
            self.bundles['float32'], self.variables, self.torch_model, probe)
      self._same['precision'] = 'float32, no TF32 (jax highest)'
    return self._same

  def agreement(self, m: int, chunk: int) -> dict[str, Any]:
    """Argmax of bfloat16 vs float32 on m noisy copies of the images."""
    idx = np.arange(m) % self.b
    eps = np.asarray(jax.random.normal(jax.random.key(_AGREEMENT_KEY),
                                       (m,) + _SHAPE, jnp.float32))
    noisy = self.x[idx] + _SIGMA * eps
    del eps
    preds = {}
    for dtype in ('float32', 'bfloat16'):
      fwd, out = self.fwd(dtype), []
      for i in range(0, m, chunk):
        xb = noisy[i:i + chunk]
        pad = np.resize(xb, (chunk,) + _SHAPE) if len(xb) < chunk else xb
        out.append(np.asarray(fwd(self.variables, pad)).argmax(1)[:len(xb)])
      preds['jax', dtype] = np.concatenate(out)
      out = []
      with torch.no_grad(), self.autocast(dtype):
        for i in range(0, m, chunk):
          xb = _nchw(noisy[i:i + chunk]).to(self.device)
          out.append(self.torch_model(xb).argmax(1).cpu().numpy())
      preds['torch', dtype] = np.concatenate(out)

    def differ(a, b):
      n = int(np.sum(preds[a] != preds[b]))
      return dict(bf16_vs_fp32_pred_disagreement=n / m, disagreements=n)

    hist = np.bincount(preds['jax', 'float32'], minlength=self.num_classes)
    return dict(
        noisy_inputs=m, images=self.b, sigma=_SIGMA,
        noise=f'x + sigma * jax.random.normal(key({_AGREEMENT_KEY})), '
        'unclipped, copy i of image i % images',
        chunk=chunk, weights=self.weights,
        jax=differ(('jax', 'bfloat16'), ('jax', 'float32')),
        torch=differ(('torch', 'bfloat16'), ('torch', 'float32')),
        jax_vs_torch_fp32_pred_disagreement=float(np.mean(
            preds['jax', 'float32'] != preds['torch', 'float32'])),
        jax_vs_torch_bf16_pred_disagreement=float(np.mean(
            preds['jax', 'bfloat16'] != preds['torch', 'bfloat16'])),
        fp32_class_histogram=hist.tolist(),
        fp32_top_class_fraction=float(hist.max() / m),
        fp32_classes_predicted=int(np.sum(hist > 0)))


class _Case:
  """One model at one dtype: its JAX and PyTorch callables on fixed inputs."""

  def __init__(self, model: _Model, dtype: str, s: dict[str, Any]):
    self.model = model
    self.name = model.name
    self.dtype = dtype
    self.bundle = model.bundle(dtype)
    self.apply_fn = self.bundle.apply_fn  # one object: the step cache key
    self.variables = model.variables
    self.torch_model = model.torch_model
    self.device = model.device
    self.num_classes = model.num_classes
    self.b = model.b
    self.n = s['certify_n'][self.name]
    self.steps = s['sigma_steps'][self.name]
    self.m = s['sigma_m'][self.name]
    self.batch = s['batch_size']
    self.jax_batch = s['jax_batch_size']
    self.x, self.xt = model.x, model.xt
    self.key = jax.random.key(0)

  def autocast(self):
    return self.model.autocast(self.dtype)

  # --- certification -------------------------------------------------------

  def jax_certify(self, batch: int):
    # n0 and N are drawn in one sampler pass (dds_jax.sampler.sample_streams),
    # so there is no separate estimation phase to time here.
    return jax_certify(
        self.apply_fn, self.variables, self.x, _SIGMA, self.key, n0=_N0,
        n=self.n, alpha=_ALPHA, batch_size=batch)

  def _jax_steps(self, batch: int) -> list[int]:
    blocks = self.b * (-(-_N0 // _SPB) + -(-self.n // _SPB))
    return sampler._step_sizes(blocks, batch // _SPB, jax.device_count())  # pylint: disable=protected-access

  def jax_warm(self, batch: int) -> None:
    """Compiles every sampler step shape `jax_certify(batch)` runs."""
    ndev = jax.device_count()
    for blocks in sorted(set(self._jax_steps(batch))):
      # blocks * ndev blocks of one image: one step of exactly that shape.
      sampler.sample_counts(self.apply_fn, self.variables, self.x[:1], _SIGMA,
                            self.key, blocks * ndev * _SPB, self.num_classes,
                            batch)

  def jax_computed_samples(self, batch: int) -> int:
    """Noisy images the JAX sampler pushes through, padding included."""
    return sum(self._jax_steps(batch)) * jax.device_count() * _SPB

  def torch_certify(self, batch: int):
    smooth = reference_torch.Smooth(self.torch_model, self.num_classes, _SIGMA)
    with self.autocast():
      return [smooth.certify(self.xt[i], _N0, self.n, _ALPHA, batch)
              for i in range(self.b)]

  def torch_warm(self, batch: int) -> None:
    """One forward pass of every batch shape `torch_certify(batch)` runs."""
    sizes = {min(batch, _N0), _N0 % batch, min(batch, self.n), self.n % batch}
    with torch.no_grad(), self.autocast():
      for size in sorted(sizes - {0}):
        self.torch_model(self.xt[:1].repeat((size, 1, 1, 1))).argmax(1).cpu()

  # --- sigma optimization --------------------------------------------------

  def jax_sigma(self, steps=None):
    return sigma_opt.optimize_sigma(
        self.apply_fn, self.variables, self.x, _SIGMA, self.key,
        steps=steps or self.steps, lr=_LR, num_samples=self.m,
        examples_per_device=-(-self.b // jax.device_count()))

  def torch_sigma(self, steps=None):
    with self.autocast():
      return reference_torch.optimize_sigma(
          self.torch_model, self.xt, _LR,
          torch.full((self.b,), _SIGMA, device=self.device),
          steps or self.steps, self.m, self.num_classes).cpu().numpy()

  # --- profile ---------------------------------------------------------------

  def jax_forward(self, batch: int):
    fwd = self.model.fwd(self.dtype)
    xb = jnp.asarray(np.resize(self.x, (batch,) + _SHAPE))
    jax.block_until_ready(fwd(self.variables, xb))
    return lambda: fwd(self.variables, xb)

  def jax_noise(self, batch: int):
    """One sampler step's noise (batch / 100 blocks of 100 copies), jitted."""
    p = batch // _SPB

    @jax.jit
    def gen(key, x, sigma, ids, blocks):
      def one(xi, si, idi, bi):
        k = noise_lib.block_key(key, int(noise_lib.Purpose.ESTIMATE), idi, bi)
        return xi[None] + noise_lib.draw(k, (_SPB,) + _SHAPE, si)
      return jax.vmap(one)(x, sigma, ids, blocks)

    args = (self.key, jnp.asarray(np.resize(self.x, (p,) + _SHAPE)),
            jnp.full((p,), _SIGMA, jnp.float32), jnp.zeros((p, 2), jnp.uint32),
            jnp.arange(p, dtype=jnp.int32))
    jax.block_until_ready(gen(*args))
    return lambda: gen(*args)

  def torch_forward(self, batch: int):
    xb = self.xt[0].repeat((batch, 1, 1, 1))

    def run():
      with torch.no_grad(), self.autocast():
        return self.torch_model(xb).argmax(1).cpu().numpy()
    run()
    return run

  def torch_noise(self, batch: int):
    def run():
      xb = self.xt[0].repeat((batch, 1, 1, 1))
      return xb + torch.randn_like(xb) * _SIGMA  # synced by _timed
    run()
    _TORCH_SYNC[0]()
    return run


def _extrapolate(per_s: float | None) -> float | None:
  if not per_s:
    return None
  return _EXTRAPOLATE_IMAGES * (_N0 + _EXTRAPOLATE_N) / per_s


def _measure(case: _Case, s: dict[str, Any], budget: _Budget
             ) -> dict[str, Any]:
  """All timings of one (model, dtype)."""
  name, dtype = case.name, case.dtype
  tag = f'[{name} {dtype}]'
  load_start = list(os.getloadavg())
  budget.check(f'{name} {dtype}')
  same = case.model.same_function()
  print(f'{tag} same function: argmax agreement {same["agreement"]:.3f} '
        f'on {case.b + 8} images, max |logit diff| '
        f'{same["max_abs_diff"]:.2e} (scale {same["logit_scale"]:.2f})',
        flush=True)
  on_cpu = case.device.type == 'cpu'
  samples = case.b * (_N0 + case.n)

  # Warm-up: compile every JAX shape (the sampler's steps, the ascent, the
  # bare forward pass, the noise) and call every torch shape once (the
  # forward passes at n0, at the batch size and the tail, one ascent step).
  t = time.perf_counter()
  case.jax_warm(case.jax_batch)
  if s['sigma_opt']:
    case.jax_sigma()
  jax_fwd = {case.jax_batch: case.jax_forward(case.jax_batch)}
  jax_noise = case.jax_noise(case.jax_batch)
  warm_jax = time.perf_counter() - t
  t = time.perf_counter()
  case.torch_warm(case.batch)
  torch_fwd = {case.batch: case.torch_forward(case.batch)}
  torch_noise = case.torch_noise(case.batch)
  if s['sigma_opt']:
    case.torch_sigma(steps=1)
  _TORCH_SYNC[0]()
  warm_torch = time.perf_counter() - t
  print(f'{tag} warm-up: JAX {warm_jax:.1f} s (compilation), PyTorch '
        f'{warm_torch:.1f} s', flush=True)

  # Batch sweep (JAX): one rep per batch after compiling its shapes.
  sweep = []
  for batch in s['batch_sweep']:
    budget.check(f'{name} {dtype} sweep at batch {batch}')
    t = time.perf_counter()
    case.jax_warm(batch)
    compile_s = time.perf_counter() - t
    timed = []
    _timed(lambda batch=batch: case.jax_certify(batch), timed)
    sweep.append(dict(jax_batch_size=batch, compile_s=compile_s,
                      jax_computed_samples=case.jax_computed_samples(batch),
                      **_summary(timed, samples)))
    print(f'{tag} sweep: batch {batch}: {sweep[-1]["median_per_s"]:,.0f} '
          f'samples/s', flush=True)
  best = (max(sweep, key=lambda r: r['median_per_s'])['jax_batch_size']
          if sweep else None)
  jax_batches = list(dict.fromkeys([case.jax_batch] + ([best] if best else [])))
  torch_batches = list(dict.fromkeys(
      [case.batch] + ([best] if best and s['torch_best_batch'] else [])))
  if best and (best not in jax_fwd or best not in torch_fwd):
    budget.check(f'{name} {dtype} warm-up at the best batch {best}')
  for batch in jax_batches:
    if batch not in jax_fwd:
      jax_fwd[batch] = case.jax_forward(batch)
  for batch in torch_batches:
    if batch not in torch_fwd:
      case.torch_warm(batch)
      torch_fwd[batch] = case.torch_forward(batch)

  t_jc = {b: [] for b in jax_batches}
  t_tc = {b: [] for b in torch_batches}
  t_jf = {b: [] for b in jax_batches}
  t_tf = {b: [] for b in torch_batches}
  t_js, t_ts, t_jn, t_tn, t_ts1 = [], [], [], [], []
  jax_cert, torch_cert = {}, {}
  jax_sig = torch_sig = None
  for rep in range(s['reps']):
    for i in range(max(len(jax_batches), len(torch_batches))):
      if i < len(jax_batches):
        b = jax_batches[i]
        budget.check(f'{name} {dtype} rep {rep} JAX certify at batch {b}')
        jax_cert[b] = _timed(lambda b=b: case.jax_certify(b), t_jc[b])
      if i < len(torch_batches):
        b = torch_batches[i]
        budget.check(f'{name} {dtype} rep {rep} PyTorch certify at batch {b}')
        torch_cert[b] = _timed(lambda b=b: case.torch_certify(b), t_tc[b])
    if s['sigma_opt']:
      budget.check(f'{name} {dtype} rep {rep} sigma-opt')
      jax_sig = _timed(case.jax_sigma, t_js)
      torch_sig = _timed(case.torch_sigma, t_ts)
    if rep == 0:  # the profile, once
      budget.check(f'{name} {dtype} profile')
      for b in jax_batches:
        _timed(jax_fwd[b], t_jf[b])
      for b in torch_batches:
        _timed(torch_fwd[b], t_tf[b])
      _timed(jax_noise, t_jn)
      _timed(torch_noise, t_tn)
    if (rep == 0 and s['sigma_opt'] and on_cpu
        and _TORCH_1THREAD_PROBE.value):
      budget.check(f'{name} {dtype} PyTorch 1-thread probe')
      threads = torch.get_num_threads()
      torch.set_num_threads(1)
      try:
        case.torch_sigma(steps=1)
        _timed(case.torch_sigma, t_ts1)
      finally:
        torch.set_num_threads(threads)
    line = ', '.join(
        [f'JAX b{b} {t_jc[b][-1][0]:.1f} s' for b in jax_batches] +
        [f'PyTorch b{b} {t_tc[b][-1][0]:.1f} s' for b in torch_batches])
    if s['sigma_opt']:
      line += (f'; sigma-opt JAX {t_js[-1][0]:.1f} s / PyTorch '
               f'{t_ts[-1][0]:.1f} s')
    print(f'{tag} rep {rep}: certify {line}', flush=True)

  agreement = None
  if dtype == 'bfloat16' and s['agreement_samples']:
    budget.check(f'{name} agreement')
    t = time.perf_counter()
    agreement = case.model.agreement(s['agreement_samples'], case.jax_batch)
    agreement['wall_s'] = time.perf_counter() - t
    print(f'{tag} bf16 vs fp32 prediction disagreement: JAX '
          f'{agreement["jax"]["disagreements"]} / {agreement["noisy_inputs"]}'
          f', PyTorch {agreement["torch"]["disagreements"]}; fp32 top class '
          f'{agreement["fp32_top_class_fraction"]:.2f} of inputs', flush=True)

  jc = {b: _summary(t, samples) for b, t in t_jc.items()}
  tc = {b: _summary(t, samples) for b, t in t_tc.items()}
  jf = {b: _summary(t, b) for b, t in t_jf.items()}
  tf = {b: _summary(t, b) for b, t in t_tf.items()}

  def certs(cert):
    return (cert.pred.tolist(), cert.radius.tolist())

  certify = dict(
      jax=jc[case.jax_batch], torch=tc[case.batch],
      samples_per_rep=samples,
      jax_computed_samples=case.jax_computed_samples(case.jax_batch),
      jax_pred=certs(jax_cert[case.jax_batch])[0],
      jax_radius=certs(jax_cert[case.jax_batch])[1],
      torch_pred=[int(p) for p, _ in torch_cert[case.batch]],
      torch_radius=[float(r) for _, r in torch_cert[case.batch]],
      ratio_jax_over_torch=_ratio(jc[case.jax_batch], tc[case.batch]),
      sampler_over_forward=dict(
          jax=_ratio(jc[case.jax_batch], jf[case.jax_batch]),
          torch=_ratio(tc[case.batch], tf[case.batch]),
          jax_batch_size=case.jax_batch, torch_batch_size=case.batch),
      batch_sweep=sweep, best_jax_batch_size=best)
  if best:
    tb = tc.get(best)
    certify['best_batch'] = dict(
        batch_size=best, jax=jc[best], torch=tb,
        jax_computed_samples=case.jax_computed_samples(best),
        jax_same_certificates_as_batch_size=(
            certs(jax_cert[best]) == certs(jax_cert[case.jax_batch])),
        ratio_jax_over_torch=_ratio(jc[best], tb),
        ratio_jax_over_torch_at_batch_size=_ratio(jc[best], tc[case.batch]),
        sampler_over_forward=dict(jax=_ratio(jc[best], jf[best]),
                                  torch=_ratio(tb, tf.get(best))))
    if tb:
      certify['best_batch'].update(
          torch_pred=[int(p) for p, _ in torch_cert[best]],
          torch_radius=[float(r) for _, r in torch_cert[best]])
  # The faster of the two JAX measurements (both with the headline's reps).
  jax_basis = max(jax_batches, key=lambda b: jc[b]['median_per_s'])
  warning = None
  if case.b < _EXTRAPOLATE_MIN_IMAGES:
    warning = (f'measured on {case.b} images (< {_EXTRAPOLATE_MIN_IMAGES}): '
               'a rough extrapolation')
  certify['extrapolated_500_images_n100000_s'] = _extrapolate(
      jc[jax_basis]['median_per_s'])
  certify['extrapolation'] = dict(
      what=f'{_EXTRAPOLATE_IMAGES} x ({_N0} + {_EXTRAPOLATE_N}) samples / '
      'measured median samples/s: an extrapolation, not a measurement',
      jax_batch_size=jax_basis, num_images=case.b, n=case.n, warning=warning,
      jax_at_batch_size_s=_extrapolate(jc[case.jax_batch]['median_per_s']),
      jax_at_best_batch_s=_extrapolate(jc[best]['median_per_s'])
      if best else None,
      torch_at_batch_size_s=_extrapolate(tc[case.batch]['median_per_s']),
      torch_at_best_batch_s=_extrapolate(tc[best]['median_per_s'])
      if best in tc else None)

  profile = dict(
      jax_forward=jf[case.jax_batch], torch_forward=tf[case.batch],
      jax_noise=_summary(t_jn, case.jax_batch),
      torch_noise=_summary(t_tn, case.batch),
      ratio_forward_jax_over_torch=_ratio(jf[case.jax_batch], tf[case.batch]))
  if best:
    profile['best_batch'] = dict(
        batch_size=best, jax_forward=jf[best], torch_forward=tf.get(best),
        ratio_forward_jax_over_torch=_ratio(jf[best], tf.get(best)))

  row = dict(
      model=name, dtype=dtype, input_shape=list(_SHAPE), num_images=case.b,
      n0=_N0, n=case.n, alpha=_ALPHA, sigma=_SIGMA, batch_size=case.batch,
      jax_batch_size=case.jax_batch, jax_devices=jax.device_count(),
      torch_device=str(case.device), sigma_steps=case.steps, sigma_m=case.m,
      lr=_LR, params=models.count_params(case.variables),
      weights=case.model.weights, same_function=same,
      warmup_s=dict(jax=warm_jax, torch=warm_torch),
      certify=certify, profile=profile, agreement=agreement,
      loadavg_start=load_start, loadavg_end=list(os.getloadavg()))
  if s['sigma_opt']:
    g = row['sigma_opt'] = dict(
        jax=_summary(t_js, case.b), torch=_summary(t_ts, case.b),
        noisy_images_per_rep=case.b * case.m * case.steps,
        jax_sigma=np.asarray(jax_sig).tolist(),
        torch_sigma=np.asarray(torch_sig).tolist())
    g['ratio_jax_over_torch'] = _ratio(g['jax'], g['torch'])
    if t_ts1:
      g['torch_1thread'] = _summary(t_ts1, case.b)
      g['ratio_jax_over_torch_1thread'] = _ratio(g['jax'], g['torch_1thread'])
  c = certify
  msg = (f'{tag} certify {c["jax"]["median_per_s"]:,.0f} vs '
         f'{c["torch"]["median_per_s"]:,.0f} samples/s '
         f'({c["ratio_jax_over_torch"]:.2f}x)')
  if best:
    msg += (f'; JAX at best batch {best}: '
            f'{c["best_batch"]["jax"]["median_per_s"]:,.0f}')
  if s['sigma_opt']:
    g = row['sigma_opt']
    msg += (f'; sigma-opt {g["jax"]["median_per_s"]:.3f} vs '
            f'{g["torch"]["median_per_s"]:.3f} examples/s '
            f'({g["ratio_jax_over_torch"]:.2f}x)')
  print(msg, flush=True)
  return row


def _nvidia_smi() -> dict[str, Any] | None:
  """GPU names and the driver version from nvidia-smi, or None without it."""
  try:
    out = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
         '--format=csv,noheader'], capture_output=True, text=True, check=True,
        timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  gpus = [dict(zip(('name', 'driver_version', 'memory_total'),
                   (f.strip() for f in line.split(','))))
          for line in out.strip().splitlines() if line.strip()]
  return dict(driver_version=gpus[0]['driver_version'] if gpus else None,
              gpus=gpus)


def _machine(device: torch.device) -> dict[str, Any]:
  extra = dict(
      torch=torch.__version__, torch_threads=torch.get_num_threads(),
      torch_interop_threads=torch.get_num_interop_threads(),
      torch_mkldnn=torch.backends.mkldnn.is_available(),
      torch_device=str(device), jax_device_kind=jax.devices()[0].device_kind,
      jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
      xla_python_client_mem_fraction=os.environ.get(
          'XLA_PYTHON_CLIENT_MEM_FRACTION'),
      nvidia_smi=_nvidia_smi())
  if device.type == 'cuda':
    extra.update(
        torch_device_name=torch.cuda.get_device_name(device),
        torch_cuda=torch.version.cuda,
        torch_cudnn=torch.backends.cudnn.version(),
        torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        torch_cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        torch_cudnn_benchmark=torch.backends.cudnn.benchmark)
  return bench_common.machine(**extra)


def _fmt(v: float | None, digits: int = 0) -> str:
  return '-' if v is None else f'{v:,.{digits}f}'


def _row(model: str, dtype: str, task: str, setting: str,
         jax_s: dict[str, Any], torch_s: dict[str, Any] | None,
         digits: int = 0, bold: bool = False) -> str:
  """One table line: medians, JAX/PyTorch of medians and of bests."""
  ratio, best = _ratio(jax_s, torch_s), _ratio(jax_s, torch_s, 'best_per_s')
  ratio_s = '-' if ratio is None else f'{ratio:.2f}x'
  if bold and ratio is not None:
    ratio_s = f'**{ratio_s}**'
  torch_cpu = '-' if torch_s is None else f'{torch_s["cpu_per_wall"]:.2f}'
  return (f'| {model} | {dtype} | {task} | {setting} | '
          f'{_fmt(jax_s["median_per_s"], digits)} | '
          f'{_fmt(torch_s and torch_s["median_per_s"], digits)} | {ratio_s} | '
          f'{"-" if best is None else f"{best:.2f}x"} | '
          f'{jax_s["cpu_per_wall"]:.2f}, {torch_cpu} |')


def _table(rows: list[dict[str, Any]], result: dict[str, Any]) -> str:
  """The Markdown summary."""
  lines = []
  if result.get('truncated'):
    lines += [f'**Truncated** ({result.get("truncated_reason")}): '
              f'{len(rows)} rows completed.', '']
  if not rows:
    return '\n'.join(lines[:1] or ['no rows'])
  lines += [
      '| model | dtype | task | setting | JAX | PyTorch | JAX/PyTorch '
      '(median) | JAX/PyTorch (best) | CPU/wall JAX, PyTorch |',
      '|---|---|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    c, p, m, d = r['certify'], r['profile'], r['model'], r['dtype']
    base = f'{r["num_images"]} images, n0={r["n0"]}, N={r["n"]:,}'
    lines.append(_row(
        m, d, 'certify, samples/s',
        f'{base}, batch {r["batch_size"]}' + (
            f' (JAX {r["jax_batch_size"]} x {r["jax_devices"]} dev)'
            if (r['jax_batch_size'], r['jax_devices']) != (r['batch_size'], 1)
            else ''), c['jax'], c['torch'], bold=True))
    bb = c.get('best_batch')
    if bb and bb['batch_size'] != r['jax_batch_size']:
      lines.append(_row(
          m, d, 'certify, samples/s',
          f'JAX best batch {bb["batch_size"]}, PyTorch {r["batch_size"]}',
          bb['jax'], c['torch']))
    if bb and bb['torch'] and bb['batch_size'] != r['batch_size']:
      lines.append(_row(m, d, 'certify, samples/s',
                        f'both at batch {bb["batch_size"]}', bb['jax'],
                        bb['torch']))
    g = r.get('sigma_opt')
    if g:
      lines.append(_row(
          m, d, 'sigma-opt, examples/s',
          f'{r["num_images"]} images, K={r["sigma_steps"]}, m={r["sigma_m"]}',
          g['jax'], g['torch'], digits=3, bold=True))
      if 'torch_1thread' in g:
        lines.append(_row(m, d, 'sigma-opt, PyTorch on 1 thread',
                          '(same, 1 rep)', g['jax'], g['torch_1thread'],
                          digits=3))
    lines.append(_row(m, d, 'forward, img/s', f'batch {r["batch_size"]}',
                      p['jax_forward'], p['torch_forward']))
    pb = p.get('best_batch')
    if pb and pb['batch_size'] not in (r['jax_batch_size'], r['batch_size']):
      lines.append(_row(m, d, 'forward, img/s', f'batch {pb["batch_size"]}',
                        pb['jax_forward'], pb['torch_forward']))
    lines.append(_row(m, d, 'noise only, img/s', f'batch {r["batch_size"]}',
                      p['jax_noise'], p['torch_noise']))

  lines += ['', '| model | dtype | batch | JAX sampler/forward | PyTorch '
            'sampler/forward | JAX computed/requested samples |',
            '|---|---|---:|---:|---:|---:|']
  for r in rows:
    c = r['certify']
    sof = c['sampler_over_forward']
    lines.append(
        f'| {r["model"]} | {r["dtype"]} | {r["jax_batch_size"]}'
        + ('' if r['jax_batch_size'] == r['batch_size']
           else f' / {r["batch_size"]}') +
        f' | {_fmt(sof["jax"], 2)} | {_fmt(sof["torch"], 2)} | '
        f'{c["jax_computed_samples"] / c["samples_per_rep"]:.2f} |')
    bb = c.get('best_batch')
    if bb and bb['batch_size'] not in (r['jax_batch_size'], r['batch_size']):
      lines.append(
          f'| {r["model"]} | {r["dtype"]} | {bb["batch_size"]} | '
          f'{_fmt(bb["sampler_over_forward"]["jax"], 2)} | '
          f'{_fmt(bb["sampler_over_forward"]["torch"], 2)} | '
          f'{bb["jax_computed_samples"] / c["samples_per_rep"]:.2f} |')

  if any(r['certify']['batch_sweep'] for r in rows):
    lines += ['', '| model | dtype | JAX batch / device | JAX certify '
              'samples/s (1 rep) | compile s |', '|---|---|---:|---:|---:|']
    for r in rows:
      best = r['certify']['best_jax_batch_size']
      for e in r['certify']['batch_sweep']:
        mark = ' (best)' if e['jax_batch_size'] == best else ''
        lines.append(f'| {r["model"]} | {r["dtype"]} | {e["jax_batch_size"]}'
                     f'{mark} | {_fmt(e["median_per_s"])} | '
                     f'{e["compile_s"]:.1f} |')

  agreements = [r for r in rows if r.get('agreement')]
  if agreements:
    lines += ['', '| model | weights | noisy inputs | JAX bf16 vs fp32: '
              'argmax differs | PyTorch autocast vs fp32 | JAX vs PyTorch, '
              'fp32 / bf16 | fp32 top class share |',
              '|---|---|---:|---:|---:|---:|---:|']
    for r in agreements:
      a = r['agreement']
      w = a['weights']
      w = ('random init' if w['kind'] == 'random init'
           else f'checkpoint {w["directory"]}')
      lines.append(
          f'| {r["model"]} | {w} | {a["noisy_inputs"]:,} | '
          f'{a["jax"]["bf16_vs_fp32_pred_disagreement"]:.4f} '
          f'({a["jax"]["disagreements"]}) | '
          f'{a["torch"]["bf16_vs_fp32_pred_disagreement"]:.4f} '
          f'({a["torch"]["disagreements"]}) | '
          f'{a["jax_vs_torch_fp32_pred_disagreement"]:.4f} / '
          f'{a["jax_vs_torch_bf16_pred_disagreement"]:.4f} | '
          f'{a["fp32_top_class_fraction"]:.2f} |')

  lines.append('')
  for r in rows:
    e = r['certify']['extrapolation']
    text = (f'{r["model"]} {r["dtype"]}: {_EXTRAPOLATE_IMAGES} images at '
            f'N = {_EXTRAPOLATE_N:,} would take '
            f'{_fmt(r["certify"]["extrapolated_500_images_n100000_s"])} s '
            f'with JAX (batch {e["jax_batch_size"]}) and '
            f'{_fmt(e["torch_at_batch_size_s"])} s with PyTorch (batch '
            f'{r["batch_size"]}'
            + (f'; {_fmt(e["torch_at_best_batch_s"])} s at '
               f'{r["certify"]["best_jax_batch_size"]}'
               if e['torch_at_best_batch_s'] else '') +
            f'), extrapolated from {e["num_images"]} images at '
            f'N = {e["n"]:,}, not measured')
    if e['warning']:
      text += f' (**warning**: {e["warning"]})'
    lines.append(text + '.')
  weights = sorted({'random init' if r['weights']['kind'] == 'random init'
                    else f'{r["model"]}: checkpoint '
                    f'{r["weights"]["directory"]}' for r in rows})
  lines.append(
      '\nWeights: ' + '; '.join(weights) + '. Medians over repetitions (the '
      'profile rows and the sweep: one); samples/s counts the requested '
      'samples, images x (n0 + N); sampler/forward: certification samples/s '
      'over the bare forward pass img/s at the same batch. CPU/wall: cores '
      'the process got (of os.cpu_count()); less means other processes took '
      'them. Certification and sigma-opt repetitions alternate between the '
      'frameworks.')
  return '\n'.join(lines)


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  s = _settings()
  device = torch.device(s['torch_device'])
  if device.type == 'cuda':
    _TORCH_SYNC[0] = torch.cuda.synchronize
  budget = _Budget(s['time_budget_s'])
  machine = _machine(device)
  t0 = time.perf_counter()
  rows, weights = [], {}
  total = len(_MODELS.value) * len(s['dtypes'])
  state = dict(truncated=True, truncated_reason='in progress')

  def result():
    machine['loadavg_end'] = list(os.getloadavg())
    params = (_RANDOM_INIT if all(w['kind'] == 'random init'
                                  for w in weights.values()) else weights)
    return dict(machine=machine, settings=s, quick=_QUICK.value,
                params=params, wall_s=time.perf_counter() - t0, **state,
                rows=rows)

  try:
    for name in _MODELS.value:
      budget.check(f'{name}')
      model = _Model(name, s, device)
      weights[name] = model.weights
      for dtype in s['dtypes']:
        rows.append(_measure(_Case(model, dtype, s), s, budget))
        state['truncated_reason'] = (f'in progress: {len(rows)} of {total} '
                                     'rows written')
        if _OUT.value and len(rows) < total:
          bench_common.write_result(_OUT.value, result())
      del model
    state.update(truncated=False, truncated_reason=None)
  except _OverBudget as e:
    state['truncated_reason'] = str(e)
    print(f'stopped: {e}', flush=True)
  out = result()
  if _OUT.value:
    bench_common.write_result(_OUT.value, out)
  print(_table(rows, out))


if __name__ == '__main__':
  app.run(main)
