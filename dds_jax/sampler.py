"""The Monte Carlo sampler: class counts of f(x + noise), sharded over devices.

Work is cut into *blocks*: `samples_per_block` noisy copies of one example. The
noise of block k of an example depends only on (key, purpose, example id, k)
(see `dds_jax.noise.block_key`). Each device runs a forward pass of one fixed
shape, `batch_size` noisy images = `batch_size // samples_per_block` blocks,
which may belong to different examples; the blocks of one example may land on
different devices. Counts per block are summed on the host. So:

  * memory is bounded by `batch_size` per device, whatever `num_samples`;
  * nothing recompiles across examples, sigma values or the last partial block
    (sigma, example ids, block ids and the number of valid samples of a block
    are traced arguments); the last step of a call holds the smallest power
    of two of blocks that fits what is left (`_step_sizes`), so a handful of
    shapes is compiled once and a small call runs no padded full batch;
  * counts are identical whatever the number of examples per call, devices
    or processes: a block's noise depends only on (key, purpose, example id,
    block), and a block's counts do not depend on what shares its batch (on
    CPU, logits were bitwise the same in batches of 100 to 1,000 images; an
    accelerator may pick another convolution algorithm for another shape).

The per-device program is written with `jax.shard_map` over the `data` axis of
a mesh from `make_mesh`. `sample_streams` samples several noise streams (e.g.
CERTIFY's selection and estimation draws) in one pass. On several hosts each
process brings its own examples; their blocks fill the global device batches
(`dds_jax.distributed`).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dds_jax import distributed
from dds_jax import noise as noise_lib
from dds_jax import validate
from dds_jax.distributed import DATA_AXIS, make_mesh
from dds_jax.errors import InputError

DEFAULT_SAMPLES_PER_BLOCK = 100
DEFAULT_BATCH_SIZE = 1000

ApplyFn = Callable[[object, jax.Array], jax.Array]


_SHAPE_CACHE = {}


def num_classes_of(apply_fn: ApplyFn, params, x: np.ndarray) -> int:
  """Number of classes of apply_fn on images like x; a clear error if x does not fit."""
  leaves = jax.tree.leaves(params)
  sig = (apply_fn, x.shape[1:], x.dtype.str, jax.tree.structure(params),
         tuple((np.shape(l), str(getattr(l, "dtype", type(l)))) for l in leaves))
  if sig not in _SHAPE_CACHE:
    spec = jax.ShapeDtypeStruct((1,) + x.shape[1:], jnp.float32)
    try:
      out = jax.eval_shape(apply_fn, params, spec)
    except Exception as e:  # pylint: disable=broad-except
      # The cause is chained: a bug inside the model shows in the traceback.
      raise InputError(
          f"images of shape {x.shape[1:]} (H, W, C) do not fit the model: "
          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    if len(out.shape) != 2 or out.shape[0] != 1:
      raise InputError(f"apply_fn must return logits [B, K]; got {out.shape}")
    _SHAPE_CACHE[sig] = int(out.shape[1])
  return _SHAPE_CACHE[sig]


@functools.lru_cache(maxsize=64)
def _count_step(apply_fn: ApplyFn, mesh, samples_per_block: int,
                blocks_per_device: int, num_classes: int, kind: str,
                image_shape: tuple[int, ...]):
  """The jitted step: counts of `blocks_per_device` blocks on every device."""
  s, p = samples_per_block, blocks_per_device

  def local(params, key, x, sigma, purpose, ids, blocks, valid):
    def noisy(xi, si, pi, idi, bi):
      k = noise_lib.block_key(key, pi, idi, bi)
      return xi[None] + noise_lib.draw(k, (s,) + image_shape, si, kind)
    xs = jax.vmap(noisy)(x, sigma, purpose, ids, blocks)  # [p, s, H, W, C]
    logits = apply_fn(params, xs.reshape((p * s,) + image_shape))
    pred = jnp.argmax(logits, axis=-1).reshape(p, s)
    hit = jax.nn.one_hot(pred, num_classes, dtype=jnp.int32)
    mask = (jnp.arange(s)[None, :] < valid[:, None]).astype(jnp.int32)
    return jnp.sum(hit * mask[..., None], axis=1)        # [p, K]

  data = P(DATA_AXIS)
  step = jax.shard_map(local, mesh=mesh,
                       in_specs=(P(), P(), data, data, data, data, data, data),
                       out_specs=data, check_vma=False)
  return jax.jit(step)


def compile_count_step(apply_fn: ApplyFn, params, mesh: jax.sharding.Mesh,
                       image_shape, num_classes: int,
                       batch_size: int = DEFAULT_BATCH_SIZE,
                       samples_per_block: int = DEFAULT_SAMPLES_PER_BLOCK,
                       noise: str = "gaussian"):
  """Ahead-of-time lowering and compilation of one sampler step for a mesh.

  Everything is abstract (`jax.ShapeDtypeStruct` with the step's shardings;
  params may be abstract too), so a job can be checked to partition and fit
  on a mesh before it runs: e.g. a 256-device mesh of fake CPU devices
  (`--xla_force_host_platform_device_count`) or a TPU topology.

  Returns:
    The `jax.stages.Compiled` step (see its `memory_analysis()`,
    `cost_analysis()`, `as_text()`).
  """
  blocks = blocks_per_step(batch_size, samples_per_block)
  ndev = mesh.shape[DATA_AXIS]
  step = _count_step(apply_fn, mesh, samples_per_block, blocks, num_classes,
                     noise, tuple(image_shape))
  data, rep = NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())
  rows = blocks * ndev

  def spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  abstract_params = jax.tree.map(
      lambda a: spec(np.shape(a), a.dtype, rep), params)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (abstract_params, spec(key.shape, key.dtype, rep),
          spec((rows,) + tuple(image_shape), jnp.float32, data),
          spec((rows,), jnp.float32, data),
          spec((rows,), jnp.int32, data),
          spec((rows, 2), jnp.uint32, data),
          *[spec((rows,), jnp.int32, data) for _ in range(2)])
  return step.lower(*args).compile()


def sample_counts(apply_fn: ApplyFn, params, x, sigma, key: jax.Array,
                  num_samples: int, num_classes: Optional[int] = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, *,
                  example_ids=None,
                  purpose: int = noise_lib.Purpose.ESTIMATE,
                  samples_per_block: int = DEFAULT_SAMPLES_PER_BLOCK,
                  noise: str = "gaussian",
                  mesh: Optional[jax.sharding.Mesh] = None,
                  progress: Optional[Callable[[int, int], None]] = None,
                  start_block: int = 0,
                  ) -> np.ndarray:
  """Counts of argmax f(x_b + e) over `num_samples` draws of noise, per example.

  Args:
    apply_fn: `apply_fn(params, images) -> logits [B, K]`. Keep one function
      object: the compiled step is cached on it.
    params: the model's variables.
    x: [B, H, W, C] float images in [0, 1].
    sigma: scalar or [B] noise level per example (> 0).
    key: PRNG key (`jax.random.key(seed)`).
    num_samples: draws per example.
    num_classes: K; inferred from apply_fn when None.
    batch_size: noisy images per device per forward pass (>=
      `samples_per_block`; the largest multiple of it that fits is used, so
      e.g. 1024 with blocks of 100 runs 1,000); fixes the compiled shape and
      memory. Counts do not depend on it.
    example_ids: [B] global integer ids (64-bit) that key the noise. Default:
      a 64-bit hash of each image's content (`noise.content_ids`), so the same
      image draws the same noise in any batch and different images draw
      different noise across calls. Pass dataset ids so that two equal images
      of a dataset still draw independent noise.
    purpose: which noise stream (`dds_jax.noise.Purpose`).
    samples_per_block: noisy copies per block; part of the noise's identity.
    noise: 'gaussian' (L2) or 'uniform' (L1).
    mesh: a mesh with a `data` axis (default: all devices).
    progress: called as progress(samples_done, samples_total).
    start_block: the stream's first block (default 0): draws blocks
      start_block, start_block + 1, ...; a later call with start_block past
      an earlier call's last block shares no noise with it (sequential
      certification samples in rounds this way).

  Multi-host (`dds_jax.distributed`): every process calls this with its own
  examples (any number, also none); the blocks of all processes fill the
  global device batches and each process gets its own examples' counts.

  Returns:
    int64 counts [B, K]; each row sums to num_samples.
  """
  return sample_streams(apply_fn, params, x, sigma, key,
                        ((purpose, num_samples, start_block),), num_classes,
                        batch_size,
                        example_ids=example_ids,
                        samples_per_block=samples_per_block, noise=noise,
                        mesh=mesh, progress=progress)[0]


def sample_streams(apply_fn: ApplyFn, params, x, sigma, key: jax.Array,
                   streams, num_classes: Optional[int] = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, *,
                   example_ids=None,
                   samples_per_block: int = DEFAULT_SAMPLES_PER_BLOCK,
                   noise: str = "gaussian",
                   mesh: Optional[jax.sharding.Mesh] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   ) -> list[np.ndarray]:
  """`sample_counts` of several noise streams in one pass over the devices.

  CERTIFY needs n0 selection draws and n estimation draws: sampling both in
  one call packs their blocks into the same device batches, so a small n0
  does not cost a padded forward pass of its own. Counts are identical to
  separate `sample_counts` calls (the noise of a block depends on its purpose,
  not on what shares its batch).

  Args:
    streams: ((purpose, num_samples), ...) or ((purpose, num_samples,
      start_block), ...) (see `sample_counts`).
    Others: see `sample_counts`.

  Returns:
    One int64 [B, K] count array per stream.
  """
  multi = jax.process_count() > 1
  x = validate.check_images(x, allow_empty=multi)
  b = x.shape[0]
  sigma = validate.check_sigma(sigma, b)
  streams = tuple(_check_stream(st) for st in streams)
  if not streams:
    raise InputError("streams is empty")
  samples_per_block = validate.check_count(samples_per_block,
                                           "samples_per_block")
  blocks_per_step(batch_size, samples_per_block)
  validate.check_noise(noise)
  inferred = num_classes_of(apply_fn, params, x)
  if num_classes is not None and num_classes != inferred:
    raise InputError(f"num_classes={num_classes} but the model has "
                     f"{inferred} outputs")
  example_ids = check_example_ids(example_ids, x)
  return _sample_streams(apply_fn, params, x, sigma, key, streams, inferred,
                         batch_size, example_ids, samples_per_block, noise,
                         mesh or make_mesh(), progress)


def _check_stream(stream) -> tuple[int, int, int]:
  """(purpose, num_samples, start_block) of one stream."""
  if len(stream) not in (2, 3):
    raise InputError(f"a stream is (purpose, num_samples[, start_block]); "
                     f"got {stream!r}")
  purpose, num_samples, start = (tuple(stream) + (0,))[:3]
  if isinstance(start, bool) or int(start) != start or start < 0:
    raise InputError(f"start_block must be an integer >= 0; got {start!r}")
  return (int(purpose), validate.check_count(num_samples, "num_samples"),
          int(start))


def blocks_per_step(batch_size, samples_per_block: int) -> int:
  """Blocks per device per step: the most that fit in batch_size images."""
  batch_size = validate.check_count(batch_size, "batch_size")
  if batch_size < samples_per_block:
    raise InputError(f"batch_size={batch_size} must be >= "
                     f"samples_per_block={samples_per_block}")
  return batch_size // samples_per_block


def check_example_ids(example_ids, x: np.ndarray) -> np.ndarray:
  """[B] int64 ids; the content hash of each image when None."""
  b = x.shape[0]
  if example_ids is None:
    return noise_lib.content_ids(x)
  example_ids = np.asarray(example_ids)
  if example_ids.shape != (b,) or not (b == 0 or np.issubdtype(
      example_ids.dtype, np.integer)):
    raise InputError(f"example_ids must be {b} integers; got "
                     f"{example_ids.dtype} {example_ids.shape}")
  return example_ids.astype(np.int64)


def _work_items(b: int, streams, s: int) -> dict[str, np.ndarray]:
  """Blocks to sample, example-major: example, stream, purpose, block, valid."""
  cols = {n: [] for n in ("example", "stream", "purpose", "block", "valid")}
  for j, (purpose, num_samples, start) in enumerate(streams):
    nblocks = math.ceil(num_samples / s)
    block = np.tile(np.arange(nblocks), b)
    cols["example"].append(np.repeat(np.arange(b), nblocks))
    cols["stream"].append(np.full(b * nblocks, j))
    cols["purpose"].append(np.full(b * nblocks, purpose))
    cols["block"].append(block + start)
    cols["valid"].append(np.minimum(s, num_samples - block * s))
  cols = {n: np.concatenate(v).astype(np.int64) for n, v in cols.items()}
  order = np.lexsort((cols["block"], cols["stream"], cols["example"]))
  return {n: v[order] for n, v in cols.items()}


def _step_sizes(num_items: int, per_device: int, ndev: int) -> list[int]:
  """Blocks per device of each step for num_items blocks on ndev devices.

  Full steps of per_device blocks, then one tail step with the smallest power
  of two (at most per_device) that holds the rest: a call with a few blocks
  left over (a small n0, a small N) does not run a padded full batch. At most
  log2(per_device) + 2 shapes are ever compiled.
  """
  full, rest = divmod(num_items, per_device * ndev)
  sizes = [per_device] * full
  if rest:
    need = max(math.ceil(rest / ndev), 1)
    sizes.append(min(per_device, 1 << (need - 1).bit_length()))
  return sizes


def _sample_streams(apply_fn, params, x, sigma, key, streams, num_classes,
                    batch_size, example_ids, samples_per_block, noise, mesh,
                    progress):
  """`sample_streams` on checked inputs."""
  b = x.shape[0]
  s = samples_per_block
  per_device = blocks_per_step(batch_size, s)
  ndev, ndev_here = mesh.shape[DATA_AXIS], len(distributed.local_devices(mesh))

  items = _work_items(b, streams, s)
  total = items["example"].size
  # Every process runs the same steps (sized by the process with the most
  # blocks); the others pad with blocks of zero valid samples, which count
  # nothing. Blocks per device of each step: full steps, then one tail step.
  sizes = _step_sizes(distributed.max_over_processes(total), per_device,
                      ndev_here)
  pad = sum(sizes) * ndev_here - total
  items = {n: np.concatenate([v, np.zeros(pad, np.int64)])
           for n, v in items.items()}

  sharding = NamedSharding(mesh, P(DATA_AXIS))
  params, key = distributed.replicate((params, key), mesh)
  words = noise_lib.id_words(example_ids)  # [B, 2] uint32: 64-bit ids
  if b == 0:  # nothing of our own: feed masked blocks of a blank image
    x = np.zeros((1,) + x.shape[1:], np.float32)
    sigma, words = np.ones(1, np.float32), np.zeros((1, 2), np.uint32)

  done = np.cumsum(items["valid"])
  grand_total = b * sum(st[1] for st in streams)
  counts = [np.zeros((b, num_classes), np.int64) for _ in streams]
  pending = collections.deque()

  def collect():
    sl, out = pending.popleft()
    out = distributed.host_rows(out)
    real = min(sl.stop, total) - sl.start
    if real > 0:
      ex, st = items["example"][sl][:real], items["stream"][sl][:real]
      for j in range(len(streams)):
        sel = st == j
        np.add.at(counts[j], ex[sel], out[:real][sel])
    if progress is not None and total:
      progress(int(done[min(sl.stop, total) - 1]), grand_total)

  lo = 0
  for blocks in sizes:
    sl = slice(lo, lo + blocks * ndev_here)
    lo = sl.stop
    step = _count_step(apply_fn, mesh, s, blocks, num_classes, noise,
                       tuple(x.shape[1:]))
    ex = items["example"][sl]
    args = [x[ex], sigma[ex], items["purpose"][sl].astype(np.int32),
            words[ex], items["block"][sl].astype(np.int32),
            items["valid"][sl].astype(np.int32)]
    args = [distributed.to_global(a, sharding, blocks * ndev) for a in args]
    pending.append((sl, step(params, key, *args)))
    if len(pending) > 4:  # keep a few steps in flight, bounded memory
      collect()
  while pending:
    collect()
  return counts
