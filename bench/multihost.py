r"""Scaling of certification: 1 device, 2 devices, 2 processes.

Usage (from the repository root)::

  PYTHONPATH=. python bench/multihost.py [--quick] [--reps=3]
      [--out=bench/results/multihost.json]

For each model it times `dds_jax.certify` (n0 + N draws per image, random-init
parameters, compilation excluded by a warm-up call) in three layouts, each a
fresh set of child processes on this machine:

  * 1 process x 1 device;
  * 1 process x 2 devices (`--xla_force_host_platform_device_count=2`);
  * 2 processes x 1 device each: `jax.distributed` with a localhost
    coordinator and gloo CPU collectives, each process certifying its own
    half of the images (`dds_jax.distributed.split`), as `launch.certify
    --multihost` does.

Same per-device batch everywhere, so 2 devices do twice the work per step.
Reports samples/s (median over --reps), the ratios to 1 device, and whether
the certificates of every layout are identical. On one 2-core machine the
devices of both layouts share the same two cores: the ratios measure the
overhead of the layout (and what XLA's CPU backend gains from a second
device), not a second machine's worth of compute.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from bench import common as bench_common

_QUICK = flags.DEFINE_bool('quick', False, 'Tiny settings (a smoke run).')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed repetitions per layout.')
_OUT = flags.DEFINE_string('out', 'bench/results/multihost.json',
                           'Where the JSON goes.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run one layout.')

SETTINGS = {  # model: (input shape, images, n0, n, batch per device)
    'small_cnn': ((32, 32, 3), 8, 100, 4000, 400),
    'resnet18': ((32, 32, 3), 4, 100, 400, 200),
}
QUICK = {'small_cnn': ((32, 32, 3), 4, 100, 200, 100)}


def _child(spec: dict) -> None:
  """One process of one layout: times certify, process 0 writes the JSON."""
  from dds_jax import distributed
  if spec['num_processes'] > 1:
    distributed.initialize(f"localhost:{spec['port']}", spec['num_processes'],
                           spec['process_id'])
  import jax
  import numpy as np
  import dds_jax
  from dds_jax import models
  shape, num_images, n0, n, batch = spec['setting']
  bundle = models.build(spec['model'], 10, tuple(shape))
  params = bundle.init(jax.random.key(0))
  x = np.random.default_rng(0).uniform(size=(num_images,) + tuple(shape))
  x, ids = x.astype(np.float32), np.arange(num_images)
  mine = distributed.split(num_images)
  mesh = dds_jax.make_mesh()

  def run():
    return dds_jax.certify(bundle.apply_fn, params, x[mine], 0.25,
                           jax.random.key(1), n0=n0, n=n, alpha=0.001,
                           batch_size=batch, example_ids=ids[mine], mesh=mesh)
  run()  # compile
  times = []
  for _ in range(spec['reps']):
    distributed.barrier('start')
    t0 = time.perf_counter()
    cert = run()
    distributed.barrier('end')
    times.append(time.perf_counter() - t0)
  radius = distributed.gather_rows(cert.radius)
  pred = distributed.gather_rows(cert.pred)
  if distributed.is_main():
    samples = num_images * (n0 + n)
    with open(spec['out'], 'w') as f:
      json.dump({'times_s': times, 'samples': samples,
                 'samples_per_s': samples / statistics.median(times),
                 'devices': jax.device_count(),
                 'processes': jax.process_count(),
                 'radius': radius.tolist(), 'pred': pred.tolist()}, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _layout(model, setting, num_processes, devices_per_process, reps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_REPO)
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count='
                      f'{devices_per_process}')
  port = _free_port()
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    procs = []
    for i in range(num_processes):
      spec = dict(model=model, setting=setting, num_processes=num_processes,
                  process_id=i, port=port, reps=reps, out=out)
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__),
           f'--child={json.dumps(spec)}'], env=env,
          stderr=subprocess.DEVNULL))
    for p in procs:
      if p.wait() != 0:
        raise RuntimeError(f'{model}: a child of layout {num_processes}x'
                           f'{devices_per_process} failed')
    with open(out) as f:
      return json.load(f)


def main(argv):
  del argv
  if _CHILD.value:
    _child(json.loads(_CHILD.value))
    return
  settings = QUICK if _QUICK.value else SETTINGS
  result = {'machine': bench_common.machine(), 'rows': []}
  t_start = time.time()
  for model, setting in settings.items():
    layouts = {name: _layout(model, setting, p, d, _REPS.value)
               for name, p, d in (('1x1', 1, 1), ('1x2', 1, 2),
                                  ('2x1', 2, 1))}
    base = layouts['1x1']['samples_per_s']
    same = all(l['radius'] == layouts['1x1']['radius'] and
               l['pred'] == layouts['1x1']['pred'] for l in layouts.values())
    row = {'model': model, 'input_shape': setting[0], 'images': setting[1],
           'n0': setting[2], 'n': setting[3], 'batch_per_device': setting[4],
           'layouts': layouts, 'identical_certificates': same,
           'ratio_1x2': layouts['1x2']['samples_per_s'] / base,
           'ratio_2x1': layouts['2x1']['samples_per_s'] / base}
    result['rows'].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != 'layouts'}),
          flush=True)
  result['machine']['loadavg_end'] = list(os.getloadavg())
  result['wall_s'] = time.time() - t_start
  bench_common.write_result(_OUT.value, result)
  print('\n| model | images x (n0 + N) | batch/dev | 1 proc x 1 dev '
        'samples/s | 1 proc x 2 dev | 2 proc x 1 dev | identical |')
  print('| --- | --- | --: | --: | --: | --: | --- |')
  for r in result['rows']:
    l = r['layouts']
    print(f"| {r['model']} | {r['images']} x ({r['n0']} + {r['n']:,}) | "
          f"{r['batch_per_device']} | {l['1x1']['samples_per_s']:,.0f} | "
          f"{l['1x2']['samples_per_s']:,.0f} ({r['ratio_1x2']:.2f}x) | "
          f"{l['2x1']['samples_per_s']:,.0f} ({r['ratio_2x1']:.2f}x) | "
          f"{'yes' if r['identical_certificates'] else 'NO'} |")


if __name__ == '__main__':
  app.run(main)
