"""A child process for tests/memory_test.py: inserts random certificates.

Usage::

  python tests/memory_writer.py PATH SEED COUNT EXAMPLE_ID_OFFSET [GO_FILE]

Opens the store at PATH (input shape `SHAPE`), prints "ready", waits for
GO_FILE to exist when given, then inserts COUNT certificates from
`certificates(SEED, COUNT)` one at a time. After each insert returns (i.e.
after its commit) it prints "i id pred radius" (radius as repr) and flushes.
"""

import os
import sys
import time

import numpy as np

SHAPE = (3,)
DATASET = "toy"
FINGERPRINT = "writer-model"


def certificates(seed: int, count: int):
  """Random, heavily overlapping certificates (xs float32, preds, radii)."""
  rng = np.random.default_rng(seed)
  xs = rng.uniform(size=(count,) + SHAPE).astype(np.float32)
  preds = rng.integers(-1, 3, size=count)
  radii = np.where(preds < 0, 0.0, rng.uniform(0.0, 0.4, size=count))
  return xs, preds, radii


def open_store(path):
  from dds_jax.memory import MemoryStore  # pylint: disable=g-import-not-at-top
  return MemoryStore.open(path, input_shape=SHAPE, dataset=DATASET,
                          model_fingerprint=FINGERPRINT, alpha=0.001)


def main(argv):
  path, seed, count, offset = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
  go = argv[5] if len(argv) > 5 else None
  xs, preds, radii = certificates(seed, count)
  with open_store(path) as store:
    print("ready", flush=True)
    while go and not os.path.exists(go):
      time.sleep(0.01)
    for i in range(count):
      r = store.insert(xs[i], int(preds[i]), float(radii[i]),
                       example_id=offset + i)
      print(f"{i} {r.id} {r.pred} {r.radius!r}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
