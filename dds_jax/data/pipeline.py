"""Training batches streamed through grain, from a `LazyDataset`.

The order is the in-memory pipeline's (`iterate_batches`): epoch e visits the
examples in the permutation keyed by (seed, e), cut into global batches of
`batch_size` (the last partial batch dropped). Each process reads only its
rows of every global batch (`rows`, from `distributed.local_row_slice`: the
rows its devices hold), so 1 and 2 processes see the same global batches.
Batches are read and preprocessed (ImageNet's random-resized crop, keyed by
(seed, epoch, example id)) by grain's reader threads, ahead of the consumer.

Resume: `TrainBatches.get_state()` is grain's iterator state (how many batches
of the epoch were consumed). The trainer checkpoints it with orbax beside the
model (`dds_jax.checkpoint`, item 'data_iter'); `TrainBatches(..., state=s)`
continues at the next batch without reading the ones before it.

  batches = pipeline.TrainBatches(ds, 256, seed=0, epoch=3, rows=slice(0, 128))
  for batch in batches:  # dicts: images, labels, example_ids, mask
    ...
  state = batches.get_state()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from dds_jax import errors
from dds_jax.data import dataset as dataset_lib

# Reader threads and batches read ahead (`config.data.threads`/`prefetch`).
DEFAULT_THREADS = 4
DEFAULT_PREFETCH = 4


def local_order(n: int, batch_size: int, *, seed: int, epoch: int,
                rows: slice | None = None) -> np.ndarray:
  """[steps, local rows]: positions this process reads, batch by batch."""
  steps = n // batch_size
  order = dataset_lib._permutation(n, seed, epoch)[:steps * batch_size]  # pylint: disable=protected-access
  order = order.reshape(steps, batch_size)
  return order if rows is None else order[:, rows]


class TrainBatches:
  """One epoch of training batches of a `LazyDataset` (module docstring)."""

  def __init__(self, ds, batch_size: int, *, seed: int, epoch: int,
               rows: slice | None = None, state: dict[str, Any] | None = None,
               threads: int = DEFAULT_THREADS,
               prefetch: int = DEFAULT_PREFETCH):
    if not getattr(ds, 'lazy', False):
      raise errors.ConfigError(
          'TrainBatches reads a LazyDataset (data.pipeline=grain); use '
          'dds_jax.data.iterate_batches for an in-memory Dataset.')
    if batch_size < 1 or threads < 1 or prefetch < 0:
      raise errors.ConfigError(
          f'batch_size={batch_size} and data.threads={threads} must be >= 1, '
          f'data.prefetch={prefetch} >= 0.')
    self._order = local_order(len(ds), batch_size, seed=seed, epoch=epoch,
                              rows=rows)
    self.epoch = int(epoch)
    order = self._order

    def read(b):
      batch = ds.read_batch(order[b], train_seed=seed, epoch=epoch)
      batch['mask'] = np.ones(order.shape[1], np.bool_)
      return batch

    # grain's reader threads each read whole batches, `prefetch` batches
    # ahead of the consumer; batches come out in order.
    self._iter = grain.MapDataset.range(len(order)).map(read).to_iter_dataset(
        grain.ReadOptions(num_threads=int(threads),
                          prefetch_buffer_size=max(int(prefetch),
                                                   int(threads)))).__iter__()
    if state is not None:
      self.set_state(state)

  def __len__(self) -> int:
    """Batches in the epoch (including any already consumed)."""
    return int(self._order.shape[0])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._iter

  def get_state(self) -> dict[str, Any]:
    """grain's iterator state, plus the epoch (JSON)."""
    return {'epoch': self.epoch, 'grain': self._iter.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get('epoch', -1)) != self.epoch:
      raise errors.CheckpointError(
          f'the data iterator state is of epoch {state.get("epoch")}, not '
          f'{self.epoch}: it belongs to another checkpoint')
    self._iter.set_state(state['grain'])

  @property
  def next_batch(self) -> int:
    """Index in the epoch of the batch the iterator yields next."""
    return int(self._iter.get_state()['next_index'])
