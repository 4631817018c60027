r"""Input pipelines: images/s into the CIFAR-10 train step, grain vs in memory.

Usage (from the repository root)::

  PYTHONPATH=. python bench/pipeline.py --zip=<cifar10-jpeg-q75.zip> \
      [--reps=2] [--epochs=2] [--threads=4] \
      [--out=bench/results/pipeline.json]

Trains the small CNN of the CIFAR-10 CPU study (`cifar10.py:cpu`, batch 128,
crop + flip on the device; a fast consumer, so the input pipeline shows) with
`dds_jax.train.train_and_evaluate`, once per pipeline and repetition
(alternating: memory, grain, memory, grain, ...):

  * memory: the split decoded once into RAM (from the decode cache, outside
    the timing), batches by `iterate_batches`;
  * grain: `data.pipeline=grain`, each JPEG read from the zip and decoded when
    its batch is due, by grain's reader threads (`--threads`);
  * grain_in_ram: `data.pipeline=grain` with `data.in_ram`: the same grain
    pipeline over the split decoded once as uint8 (the decode cache).

The rate is the last epoch's `images_per_s` (metrics.jsonl: training images
over the epoch's wall time, the 500-image evaluation included; the first
epoch holds the compilation). Reports the median per pipeline and its ratio
to memory; the target is >= 0.9.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top
from dds_jax import train  # pylint: disable=g-import-not-at-top
from dds_jax.configs import cifar10  # pylint: disable=g-import-not-at-top

ZIP = flags.DEFINE_string('zip', '', 'The CIFAR-10 JPEG zip.')
REPS = flags.DEFINE_integer('reps', 2, 'Runs per pipeline.')
EPOCHS = flags.DEFINE_integer('epochs', 2, 'Epochs per run (the last is timed).')
THREADS = flags.DEFINE_integer('threads', 4, 'grain reader threads.')
MAX_TRAIN = flags.DEFINE_integer(
    'max_train', 0, 'Train on the first k images only (0: all 50,000; for a '
    'quick check of the script).')
OUT = flags.DEFINE_string('out', 'bench/results/pipeline.json', 'JSON out.')


PIPELINES = ('memory', 'grain', 'grain_in_ram')


def _config(pipeline: str):
  c = cifar10.get_config(f'data={ZIP.value},cpu,epochs={EPOCHS.value}')
  c.data.pipeline = 'memory' if pipeline == 'memory' else 'grain'
  c.data.in_ram = pipeline == 'grain_in_ram'
  c.data.threads = THREADS.value
  c.ckpt.every_steps = 10**9  # no checkpoint inside the timing
  if MAX_TRAIN.value:
    c.data.train_split = 'train'
    c.data.holdout = 50_000 - MAX_TRAIN.value  # keeps MAX_TRAIN training images
  return c


def main(argv):
  del argv
  if not ZIP.value:
    raise app.UsageError('--zip is required')
  result = common.machine(reps=REPS.value, epochs=EPOCHS.value,
                          threads=THREADS.value, max_train=MAX_TRAIN.value)
  start = time.time()
  runs = {k: [] for k in PIPELINES}
  for rep in range(REPS.value):
    for pipeline in PIPELINES:
      with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        train.train_and_evaluate(_config(pipeline), work)
        with open(os.path.join(work, 'metrics.jsonl')) as f:
          last = json.loads(f.read().splitlines()[-1])
      runs[pipeline].append(dict(rep=rep, images_per_s=last['images_per_s'],
                                 epoch_time_s=last['epoch_time_s'],
                                 run_s=time.time() - t0,
                                 loadavg=list(os.getloadavg())))
      print(f'{pipeline} rep {rep}: {last["images_per_s"]:.0f} img/s',
            flush=True)
  med = {k: float(np.median([r['images_per_s'] for r in v]))
         for k, v in runs.items()}
  ratios = {k: med[k] / med['memory'] for k in PIPELINES}
  result.update(runs=runs, median_images_per_s=med, ratio_over_memory=ratios,
                target_ratio=0.9, wall_s=time.time() - start,
                loadavg_end=list(os.getloadavg()))
  print(f'| pipeline | img/s (median of {REPS.value}) | / memory |\n'
        '| --- | ---: | ---: |')
  for k in PIPELINES:
    print(f'| {k} | {med[k]:.0f} | {ratios[k]:.3f} |')
  print('target: >= 0.9 x memory')
  common.write_result(OUT.value, result)


if __name__ == '__main__':
  app.run(main)
