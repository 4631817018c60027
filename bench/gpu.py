r"""The one command for a lent GPU: smoke tests, speed, a first CIFAR-10 run.

Usage (from the repository root; `bench/gpu.sh` installs the carried wheels
and calls this)::

  python bench/gpu.py --zip=.gpu/cifar10-gpu.zip --out=$OUT \
      [--deadline_s=540] [--dry]

The device tool gives one command of at most 10 minutes and returns only
what is under $OUT, so the phases run in order, each under its own time cap,
and each phase's files go into `--out/gpu_results.tar` as it finishes (the
tar is rewritten after every phase, so a kill keeps what is done; the device
returns at most 8 files, so --out holds only the tar and `summary.json`; the
files themselves are in `<--runs>/out`).

0. `env.json`: GPU, driver (nvidia-smi), Python, jax, jaxlib, flax, optax,
   orbax, torch versions, the devices JAX sees.
1. smoke (cap --smoke_s): the core tests (stats, sampler, certify) on the
   device's jax and GPU. If they fail they run again on its CPU backend
   (`smoke_cpu.log`): a failure there too means the jax API differs, and
   the run stops, since a library that fails them must not produce numbers;
   a GPU-only failure is recorded and the run goes on.
2. speed (cap --speed_s): `bench/compare.py` on ResNet-18, float32 and
   bfloat16 on both sides, 20 images, a sweep of JAX batch sizes, the bf16
   vs fp32 prediction agreement, the 500-image N = 100,000 extrapolation,
   sampler vs bare forward, on random-init weights -> `speed.json`,
   `speed.log`.
3. train: ResNet-18 at Gaussian sigma 0.25 in bf16 (`cifar10.py:...,gpu`).
   A 2-epoch probe gives the steady epoch time; the run then gets as many
   epochs as fit in what is left of --deadline_s after the certifications'
   estimated time -> `train_metrics.jsonl`, `train.log`.
4. certify: the 500 test images of the carried zip at N = 10,000, fixed
   sigma (`fixed/`) and the grid with the memory (`grid_memory/`), each
   certify.tsv, summary.json, sigma.tsv -> `<cond>_certify.tsv`, ...; a
   certification cut by the deadline leaves its partial TSV (resumable).
   In the carried zip test image i is official test image 20 i
   (bench/gpu_data.py); `idx_map.tsv` gives the map.
5. agreement (what time is left): bench/compare.py on the trained model,
   bf16 vs fp32 predictions on the same 10,000 noisy inputs ->
   `agreement.json` (random-init weights predict one class, so phase 2's
   agreement would say nothing).

`--dry`: the same steps at tiny sizes (the small CNN, one epoch, N = 1,000
on 20 images, compare.py --quick), to check on a CPU that the one GPU
command has no typo, missing path or missing package.

`summary.json` lists every phase with its status, wall time and cap.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

from absl import app
from absl import flags

_ZIP = flags.DEFINE_string('zip', '.gpu/cifar10-gpu.zip',
                           'The carried CIFAR-10 zip (bench/gpu_data.py).')
_OUT = flags.DEFINE_string('out', None, 'Where results go ($OUT).')
_DEADLINE = flags.DEFINE_float('deadline_s', 540.0,
                               'Wall seconds for the whole command.')
_SMOKE_S = flags.DEFINE_float('smoke_s', 100.0, 'Cap of the smoke tests.')
_SPEED_S = flags.DEFINE_float('speed_s', 120.0, 'Cap of the speed phase.')
_TRAIN_MAX_S = flags.DEFINE_float('train_max_s', 210.0,
                                  'The most seconds of training.')
_RUNS = flags.DEFINE_string('runs', 'runs/gpu', 'Scratch workdirs.')
_DRY = flags.DEFINE_bool('dry', False, 'Tiny sizes: a CPU check.')

_SMOKE_TESTS = ('tests/stats_test.py', 'tests/sampler_test.py',
                'tests/certify_test.py')
_SKIP = 20           # the carried test split holds every 20th test image
_N = 10_000
_IMAGES = 500


class Run:
  """The phases' shared state: start time, output folder, the summary."""

  def __init__(self, out: str, stage: str, deadline_s: float):
    self.t0 = time.time()
    self.out = stage        # every file; `out` gets the tar and summary.json
    self.final = out
    self.deadline = self.t0 + deadline_s
    self.phases = []
    os.makedirs(stage, exist_ok=True)
    os.makedirs(out, exist_ok=True)

  def left(self) -> float:
    return self.deadline - time.time()

  def path(self, name: str) -> str:
    return os.path.join(self.out, name)

  def write_json(self, name: str, obj) -> None:
    tmp = self.path(name) + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, self.path(name))

  def phase(self, name: str, cap_s: float, status: str, wall_s: float,
            **extra) -> None:
    self.phases.append(dict(phase=name, status=status, wall_s=round(wall_s, 1),
                            cap_s=round(cap_s, 1), **extra))
    self.write_json('summary.json', dict(
        elapsed_s=round(time.time() - self.t0, 1), phases=self.phases,
        dry=_DRY.value))
    _bundle(self)
    print(f'[gpu] {name}: {status} in {wall_s:.0f} s (cap {cap_s:.0f} s); '
          f'{self.left():.0f} s left', flush=True)

  def sh(self, name: str, argv: list[str], cap_s: float,
         env: dict[str, str] | None = None) -> tuple[str, float]:
    """Runs argv with its output in <name>.log, killed at cap_s."""
    cap_s = max(1.0, min(cap_s, self.left()))
    log = self.path(f'{name}.log')
    t = time.time()
    with open(log, 'w') as f:
      f.write('$ ' + shlex.join(argv) + '\n')
      f.flush()
      try:
        p = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                           timeout=cap_s, env=env or _env())
        status = 'ok' if p.returncode == 0 else f'failed (rc {p.returncode})'
      except subprocess.TimeoutExpired:
        status = 'cut at its cap'
    return status, time.time() - t


def _env() -> dict[str, str]:
  env = dict(os.environ)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([repo] + [
      p for p in [env.get('PYTHONPATH')] if p])
  env.setdefault('JAX_COMPILATION_CACHE_DIR',
                 os.path.join(os.path.abspath(_RUNS.value), 'jax_cache'))
  env.setdefault('DDS_JAX_CACHE',
                 os.path.join(os.path.abspath(_RUNS.value), 'data_cache'))
  return env


def _versions() -> dict[str, object]:
  out = dict(python=platform.python_version(), machine=platform.machine())
  for mod in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'numpy',
              'torch', 'ml_collections', 'grain'):
    try:
      m = __import__(mod, fromlist=['__version__'])
      out[mod] = getattr(m, '__version__', '?')
    except Exception as e:  # pylint: disable=broad-except
      out[mod] = f'missing ({type(e).__name__}: {e})'
  try:
    import jax  # pylint: disable=g-import-not-at-top
    out['jax_devices'] = [f'{d.platform}:{d.device_kind}'
                          for d in jax.devices()]
  except Exception as e:  # pylint: disable=broad-except
    out['jax_devices'] = f'error: {e}'
  try:
    out['nvidia_smi'] = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
         '--format=csv,noheader'], capture_output=True, text=True,
        timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    out['nvidia_smi'] = None
  out['nproc'] = os.cpu_count()
  return out


def _config(extra: str = '') -> str:
  variant = 'small' if _DRY.value else 'gpu'
  return f'dds_jax/configs/cifar10.py:data={_ZIP.value},{variant}{extra}'


def _certify_flags() -> list[str]:
  flags_ = ['--config.certify.skip=1']
  if _DRY.value:
    flags_ += ['--config.certify.max=20', '--config.certify.n=1000']
  return flags_


def _speed(run: Run) -> dict | None:
  if _DRY.value:
    argv = ['--quick', '--models=small_cnn', '--dtypes=float32,bfloat16',
            '--batch_sweep=100,200']
  else:
    # 20 x (1 + 39) blocks divide evenly into steps at every swept batch.
    argv = ['--models=resnet18', '--dtypes=bfloat16,float32',
            '--num_images=resnet18:20', '--certify_n=resnet18:3900',
            '--reps=1', '--sigma_opt=false', '--agreement_samples=0',
            '--batch_sweep=1000,2000,4000,8000']
  argv += [f'--time_budget_s={_SPEED_S.value - 15:.0f}',
           f'--out={run.path("speed.json")}']
  status, wall = run.sh('speed', [sys.executable, 'bench/compare.py'] + argv,
                        _SPEED_S.value)
  try:
    with open(run.path('speed.json')) as f:
      speed = json.load(f)
  except (OSError, ValueError):
    speed = None
  run.phase('speed', _SPEED_S.value, status, wall, targets=_targets(speed))
  return speed


def _targets(speed: dict | None) -> list[dict]:
  """The issue's speed targets, measured (per dtype row of speed.json)."""
  out = []
  for row in (speed or {}).get('rows', []):
    c = row.get('certify') or {}
    b = c.get('best_batch') or {}
    ratio = max(v for v in (c.get('ratio_jax_over_torch'),
                            b.get('ratio_jax_over_torch'), 0.0) if v)
    sof = max(v for v in ((c.get('sampler_over_forward') or {}).get('jax'),
                          (b.get('sampler_over_forward') or {}).get('jax'),
                          0.0) if v)
    ext = c.get('extrapolated_500_images_n100000_s')
    out.append(dict(
        dtype=row.get('dtype'), jax_over_torch=ratio,
        jax_over_torch_at_least_2=ratio >= 2.0,
        sampler_over_forward=sof, sampler_at_least_0_9=sof >= 0.9,
        extrapolated_500_at_100k_s=ext,
        under_300_s=(ext is not None and ext < 300.0)))
  return out


def _jax_rate(speed: dict | None) -> tuple[float | None, int | None]:
  """The best bf16 JAX certification samples/s in speed.json, and its batch."""
  best = (None, None)
  for row in (speed or {}).get('rows', []):
    if row.get('dtype') != 'bfloat16':
      continue
    c = row.get('certify') or {}
    cands = [(c.get('jax', {}).get('median_per_s'), row.get('jax_batch_size'))]
    b = c.get('best_batch') or {}
    cands.append((b.get('jax', {}).get('median_per_s'), b.get('batch_size')))
    for rate, batch in cands:
      if rate and (best[0] is None or rate > best[0]):
        best = (rate, batch)
  return best


def _epoch_time(metrics: str) -> float | None:
  """The last epoch's time in a metrics.jsonl (the first includes compiling)."""
  try:
    with open(metrics) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except OSError:
    return None
  times = [r['epoch_time_s'] for r in rows if 'epoch_time_s' in r]
  return times[-1] if times else None


def _copy(src: str, dst: str) -> None:
  if os.path.exists(src):
    shutil.copyfile(src, dst)


def _train(run: Run, certify_reserve_s: float) -> str | None:
  """Probe, then train for what fits; returns the export dir or None."""
  runs = _RUNS.value
  probe = os.path.join(runs, 'probe')
  t = time.time()
  status, wall = run.sh('train_probe', [
      sys.executable, '-m', 'launch.train', f'--config={_config(",epochs=2")}',
      f'--workdir={probe}'], 150.0)
  epoch_s = _epoch_time(os.path.join(probe, 'metrics.jsonl'))
  run.phase('train_probe', 150.0, status, wall, epoch_s=epoch_s)
  if epoch_s is None:
    return None
  budget = min(_TRAIN_MAX_S.value, run.left() - certify_reserve_s)
  # Start-up, decoding (cached now), compiling (cached) and the per-epoch
  # evaluation are in epoch_s or the constant.
  overhead = 25.0 if not _DRY.value else 10.0
  epochs = 1 if _DRY.value else max(1, int((budget - overhead) // epoch_s))
  workdir = os.path.join(runs, 'train')
  status, wall = run.sh('train', [
      sys.executable, '-m', 'launch.train',
      f'--config={_config(f",epochs={epochs}")}', f'--workdir={workdir}'],
                        budget + 60.0)
  _copy(os.path.join(workdir, 'metrics.jsonl'), run.path('train_metrics.jsonl'))
  run.phase('train', budget + 60.0, status, wall, epochs=epochs,
            probe_epoch_s=epoch_s, since_probe_s=round(time.time() - t, 1))
  export = os.path.join(workdir, 'export')
  return export if os.path.isdir(export) else None


def _certify(run: Run, export: str, cond: str, extra: list[str],
             batch: int | None, cap_s: float) -> None:
  workdir = os.path.join(_RUNS.value, cond)
  argv = [sys.executable, '-m', 'launch.certify', f'--config={_config()}',
          f'--workdir={workdir}', f'--config.certify.checkpoint={export}'
          ] + _certify_flags() + extra
  if batch and not _DRY.value:
    argv.append(f'--config.certify.batch_size={batch}')
  status, wall = run.sh(f'certify_{cond}', argv, cap_s)
  for name in ('certify.tsv', 'summary.json', 'sigma.tsv'):
    _copy(os.path.join(workdir, name), run.path(f'{cond}_{name}'))
  run.phase(f'certify_{cond}', cap_s, status, wall)


def _agreement(run: Run, export: str) -> None:
  """bf16 vs fp32 predictions of the trained model on the same noise."""
  cap = run.left() - 5.0
  if cap < 20.0:
    run.phase('agreement', cap, 'skipped (no time left)', 0.0)
    return
  model = 'small_cnn' if _DRY.value else 'resnet18'
  argv = [sys.executable, 'bench/compare.py', f'--models={model}',
          '--dtypes=bfloat16', f'--num_images={model}:20',
          f'--certify_n={model}:100', '--reps=1', '--sigma_opt=false',
          '--batch_sweep=', '--agreement_samples=10000',
          f'--checkpoint={export}', f'--time_budget_s={cap - 10:.0f}',
          f'--out={run.path("agreement.json")}']
  status, wall = run.sh('agreement', argv, cap)
  run.phase('agreement', cap, status, wall)


def _bundle(run: Run) -> None:
  """All files so far -> out/gpu_results.tar (the device returns 8 files)."""
  names = sorted(n for n in os.listdir(run.out) if not n.endswith('.tmp'))
  tmp = os.path.join(run.final, 'gpu_results.tar.tmp')
  with tarfile.open(tmp, 'w') as tar:
    for n in names:
      tar.add(run.path(n), arcname=n)
  os.replace(tmp, os.path.join(run.final, 'gpu_results.tar'))
  _copy(run.path('summary.json'), os.path.join(run.final, 'summary.json'))


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError('--out is required')
  if not os.path.exists(_ZIP.value):
    raise app.UsageError(f'--zip={_ZIP.value} does not exist '
                         '(bench/gpu_data.py writes it)')
  run = Run(_OUT.value, os.path.join(_RUNS.value, 'out'), _DEADLINE.value)
  try:
    run.write_json('env.json', _versions())
    with open(run.path('idx_map.tsv'), 'w') as f:
      f.write('idx\tofficial_idx\n')
      f.writelines(f'{i}\t{_SKIP * i}\n' for i in range(_IMAGES))

    tests = list(_SMOKE_TESTS)
    status, wall = run.sh('smoke', [sys.executable, '-m', 'pytest', '-q', '-x',
                                    '-p', 'no:cacheprovider', '--durations=5']
                          + tests, _SMOKE_S.value)
    run.phase('smoke', _SMOKE_S.value, status, wall, tests=tests)
    if status != 'ok':  # the device's jax API, or numbers on its GPU?
      status, wall = run.sh('smoke_cpu', [
          sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider'] +
                            tests, _SMOKE_S.value,
                            env=dict(_env(), JAX_PLATFORMS='cpu'))
      run.phase('smoke_cpu', _SMOKE_S.value, status, wall,
                note='the same tests on the device jax CPU backend')
    if status != 'ok':
      print('[gpu] the core tests did not pass on this machine\'s jax: '
            'stopping before any measurement (smoke.log)', flush=True)
      return 1

    speed = _speed(run)
    rate, batch = _jax_rate(speed)
    # Two certifications: fixed (n0 + N per image) and the grid (about twice
    # that), plus start-up and compilation for each.
    samples = _IMAGES * (100 + _N)
    reserve = (3 * samples / rate + 2 * 45.0 if rate and not _DRY.value
               else 150.0)
    run.phase('plan', 0.0, 'ok', 0.0, jax_bf16_samples_per_s=rate,
              certify_batch=batch, certify_reserve_s=round(reserve, 1))

    export = _train(run, reserve)
    if export is None:
      print('[gpu] no trained model: skipping certification', flush=True)
      return 1
    left = run.left() - 10.0
    _certify(run, export, 'fixed', [], batch, left / 3)
    _certify(run, export, 'grid_memory', [
        '--config.certify.sigma_method=grid',
        '--config.certify.soundness=memory'], batch, run.left() - 45.0)
    _agreement(run, export)
    return 0
  finally:
    _bundle(run)


if __name__ == '__main__':
  sys.exit(app.run(main))
