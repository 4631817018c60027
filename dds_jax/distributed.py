"""Multi-host runs on JAX's own multi-controller runtime (`jax.distributed`).

On a TPU pod slice or a GPU cluster every host runs the same program; each
process drives its local devices and the devices of all processes form one
global mesh. This module is the one place that knows about processes:

  * `initialize` starts the runtime (no arguments on Cloud TPU, Slurm and Open
    MPI, where JAX finds the coordinator itself; explicit coordinator address,
    process count and id otherwise, e.g. several processes on one machine);
  * `split` is the contiguous slice of n examples a process reads;
  * `to_global` / `host_rows` turn process-local rows into a global array
    sharded over the mesh's `data` axis and back
    (`jax.make_array_from_process_local_data`);
  * `replicate` puts the same host value on every device of a mesh;
  * `gather_rows`, `max_over_processes`, `broadcast` are the host-level
    collectives the launchers need: results in global order on every
    process, one agreed loop length, process 0's decision everywhere.

With one process every function is a cheap identity, so library code calls
them unconditionally. Only process 0 (`is_main`) writes result files, plots,
metrics and the memory store; orbax checkpoints are written by all processes
together (`dds_jax.checkpoint`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dds_jax.errors import ConfigError, DdsError, InputError

DATA_AXIS = "data"  # the one mesh axis: examples / noise blocks / batches


class DistributedError(DdsError):
  """The multi-host runtime could not start or the processes disagree."""


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts the multi-controller runtime; call before any JAX computation.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    Leave all three None where JAX detects the cluster (Cloud TPU, Slurm, Open
    MPI); give all three otherwise.

  Raises:
    ConfigError: only some of the three are given, or they are inconsistent.
    DistributedError: the runtime failed to start (the cause is attached).
  """
  given = [a is not None for a in (coordinator_address, num_processes,
                                   process_id)]
  if any(given) and not all(given):
    raise ConfigError("give all of coordinator_address, num_processes and "
                      "process_id, or none of them (auto-detection on Cloud "
                      "TPU, Slurm, Open MPI)")
  if all(given) and not (num_processes >= 1 and
                         0 <= process_id < num_processes):
    raise ConfigError(f"process_id={process_id} must be in [0, "
                      f"num_processes={num_processes})")
  # Cross-process collectives of the CPU backend (tests, CPU clusters); GPU
  # and TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(
        f"jax.distributed.initialize failed: {type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D mesh with a `data` axis over the first `num_devices` devices.

  Auto axis types: make_mesh's default Explicit axes break a vmapped
  `norm.ppf`, and we shard by hand with shard_map where it matters anyway.
  With several processes (`dds_jax.distributed`) the mesh spans every device
  of every process, ordered by process, so each process's devices hold a
  contiguous range of rows.
  """
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  if not 1 <= num_devices <= len(devices):
    raise InputError(f"num_devices={num_devices}, but {len(devices)} "
                     f"device(s) are available")
  if jax.process_count() > 1:
    if num_devices != len(devices):
      raise InputError(f"num_devices={num_devices}: a multi-host mesh spans "
                       f"all {len(devices)} devices of the "
                       f"{jax.process_count()} processes (use 0)")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,),
                             axis_types=(AxisType.Auto,))
  return jax.make_mesh((num_devices,), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,),
                       devices=devices[:num_devices])


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main() -> bool:
  """True on the process that writes files (process 0)."""
  return jax.process_index() == 0


def split(n: int, index: Optional[int] = None,
          count: Optional[int] = None) -> slice:
  """The contiguous slice of n items (examples) that a process handles.

  Slices are in process order and as even as possible (sizes differ by at
  most one), so concatenating every process's results in process order gives
  the global order back.
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return slice(index * n // count, (index + 1) * n // count)


def local_devices(mesh: jax.sharding.Mesh) -> list[jax.Device]:
  """The mesh's devices that this process drives, in mesh order."""
  me = jax.process_index()
  return [d for d in mesh.devices.flat if d.process_index == me]


def local_row_slice(sharding: NamedSharding, num_rows: int) -> slice:
  """Rows of a [num_rows, ...] array sharded along axis 0 that live here.

  Raises if they are not contiguous (a mesh whose devices of one process are
  not next to each other along the data axis).
  """
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map((num_rows,)).values():
    sl = index[0]
    starts.append(sl.start or 0)
    stops.append(num_rows if sl.stop is None else sl.stop)
  lo, hi = min(starts), max(stops)
  covered = sum(b - a for a, b in set(zip(starts, stops)))
  if covered != hi - lo:
    raise DistributedError("this process's devices are not contiguous along "
                           "the mesh's data axis")
  return slice(lo, hi)


def to_global(local: np.ndarray, sharding: NamedSharding,
              num_rows: int) -> jax.Array:
  """A global [num_rows, ...] array from this process's rows of it."""
  local = np.asarray(local)
  if sharding.is_fully_addressable:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(
      sharding, local, (num_rows,) + local.shape[1:])


def host_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded along axis 0, in order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = {}
  for s in array.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, s)  # replicas along other axes: keep one
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """The same host value on every device of the mesh (leaves: arrays, keys).

  Leaves already replicated on this mesh are passed through. Every process
  must pass the same value.
  """
  target = NamedSharding(mesh, P())

  def put(leaf):
    if isinstance(leaf, jax.Array) and leaf.sharding == target:
      return leaf
    if target.is_fully_addressable:
      return jax.device_put(leaf, target)
    if (isinstance(leaf, jax.Array) and
        jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)):
      data = np.asarray(jax.random.key_data(leaf))
      return jax.random.wrap_key_data(
          jax.make_array_from_process_local_data(target, data, data.shape),
          impl=jax.random.key_impl(leaf))
    value = np.asarray(leaf)
    return jax.make_array_from_process_local_data(target, value, value.shape)

  return jax.tree.map(put, tree)


def _allgather(value: np.ndarray) -> np.ndarray:
  """[process_count, ...] of every process's value, dtype kept exactly.

  Values travel as bytes: multihost_utils goes through jax arrays, which
  would turn float64 / int64 into 32 bits without jax_enable_x64.
  """
  value = np.ascontiguousarray(value)
  raw = value.reshape(-1).view(np.uint8)
  every = np.asarray(multihost_utils.process_allgather(raw))
  return every.view(value.dtype).reshape((-1,) + value.shape)


def max_over_processes(value: int) -> int:
  """The largest of every process's value (e.g. an agreed loop length)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(_allgather(np.array([value], np.int64))))


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows concatenated in process order, on every process.

  Processes may hold different numbers of rows (including none); dtypes are
  kept exactly.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  sizes = _allgather(np.array([local.shape[0]], np.int64)).reshape(-1)
  padded = np.zeros((int(np.max(sizes)),) + local.shape[1:], local.dtype)
  padded[:local.shape[0]] = local
  every = _allgather(padded)
  return np.concatenate([every[p, :int(k)] for p, k in enumerate(sizes)])


def broadcast(tree: Any) -> Any:
  """Process 0's value of a pytree of numpy arrays, on every process.

  Other processes must pass a tree of the same structure, shapes and dtypes
  (their values are ignored); dtypes are kept exactly.
  """
  if jax.process_count() == 1:
    return tree

  def one(leaf):
    leaf = np.ascontiguousarray(leaf)
    raw = leaf.reshape(-1).view(np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return out.view(leaf.dtype).reshape(leaf.shape)

  return jax.tree.map(one, tree)


def barrier(name: str) -> None:
  """Waits until every process reaches the same named point."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
