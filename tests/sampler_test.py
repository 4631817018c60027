"""Sampler invariances: devices, examples per call, recompilation, memory."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import dds_jax
from dds_jax import models
from dds_jax import sampler
from tests import conftest

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def cnn():
  bundle = models.build("small_cnn", 10, SHAPE)
  params = bundle.init(jax.random.key(0))
  x = np.random.default_rng(0).uniform(size=(7,) + SHAPE).astype(np.float32)
  return bundle, params, x


def _counts(bundle, params, x, ids, **kw):
  kw = {"num_samples": 250, "batch_size": 200, "samples_per_block": 50, **kw}
  return dds_jax.sample_counts(bundle.apply_fn, params, x, 0.5,
                               jax.random.key(42), example_ids=ids, **kw)


def test_counts_do_not_depend_on_examples_per_call(cnn):
  bundle, params, x = cnn
  ids = np.arange(100, 107)
  whole = _counts(bundle, params, x, ids)
  assert np.all(whole.sum(1) == 250)
  # One image under the 7 ids: distinct ids draw distinct noise (not 7 equal
  # rows), and id 100's row is x[0]'s whatever the other examples are.
  same = _counts(bundle, params, np.repeat(x[:1], 7, axis=0), ids)
  assert len(np.unique(same, axis=0)) > 1
  np.testing.assert_array_equal(same[0], whole[0])
  for n in (5, 6):           # n - 1, n, n + 1 around a call size of 6
    parts = [_counts(bundle, params, x[i:i + n], ids[i:i + n])
             for i in range(0, 7, n)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
  one_by_one = [_counts(bundle, params, x[i:i + 1], ids[i:i + 1])
                for i in range(7)]
  np.testing.assert_array_equal(np.concatenate(one_by_one), whole)


def test_noise_is_keyed_by_example_id_not_position(cnn):
  bundle, params, x = cnn
  ids = np.arange(7)
  a = _counts(bundle, params, x, ids)
  b = _counts(bundle, params, x[::-1], ids[::-1])
  np.testing.assert_array_equal(a, b[::-1])
  c = _counts(bundle, params, x, ids + 1000)   # other ids: other noise
  assert not np.array_equal(a, c)


def test_no_recompilation_across_examples_sigma_and_partial_blocks(cnn):
  bundle, params, x = cnn
  _counts(bundle, params, x[:3], np.arange(3))
  step = sampler._count_step(bundle.apply_fn, sampler.make_mesh(), 50, 4, 10,
                             "gaussian", SHAPE)
  before = step._cache_size()
  for n, num_samples, sigma in [(1, 250, 0.1), (7, 999, 0.7), (2, 1, 2.0)]:
    dds_jax.sample_counts(bundle.apply_fn, params, x[:n],
                          np.linspace(0.1, sigma, n), jax.random.key(1),
                          num_samples, batch_size=200, samples_per_block=50)
  assert step._cache_size() == before == 1


def test_num_samples_smaller_than_a_block_and_progress(cnn):
  bundle, params, x = cnn
  seen = []
  counts = dds_jax.sample_counts(bundle.apply_fn, params, x[:2], 0.25,
                                 jax.random.key(0), 7, batch_size=200,
                                 samples_per_block=50,
                                 progress=lambda d, t: seen.append((d, t)))
  assert np.all(counts.sum(1) == 7)
  assert seen[-1] == (14, 14)


_CHILD = r"""
import json, sys, jax, numpy as np
import dds_jax
from dds_jax import models
assert len(jax.devices()) == 2, jax.devices()
bundle = models.build("small_cnn", 10, (8, 8, 1))
params = bundle.init(jax.random.key(0))
x = np.random.default_rng(0).uniform(size=(7, 8, 8, 1)).astype(np.float32)
out = {}
for ndev in (1, 2):
  mesh = dds_jax.make_mesh(ndev)
  c = dds_jax.sample_counts(bundle.apply_fn, params, x, 0.5, jax.random.key(42),
                            250, batch_size=200, samples_per_block=50,
                            example_ids=np.arange(100, 107), mesh=mesh)
  cert = dds_jax.certify(bundle.apply_fn, params, x, 0.5, jax.random.key(7),
                         n0=50, n=300, batch_size=200, samples_per_block=50,
                         mesh=mesh)
  out[ndev] = {"counts": c.tolist(), "radius": cert.radius.tolist(),
               "pred": cert.pred.tolist()}
print(json.dumps(out))
"""


def test_two_devices_give_identical_counts_and_certificates(cnn):
  bundle, params, x = cnn
  res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True,
                       text=True, env=conftest.subprocess_env(2), timeout=300,
                       cwd=conftest.REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  here = _counts(bundle, params, x, np.arange(100, 107))
  cert = dds_jax.certify(bundle.apply_fn, params, x, 0.5, jax.random.key(7),
                         n0=50, n=300, batch_size=200, samples_per_block=50)
  for ndev in ("1", "2"):
    np.testing.assert_array_equal(out[ndev]["counts"], here)
    np.testing.assert_array_equal(out[ndev]["pred"], cert.pred)
    assert out[ndev]["radius"] == cert.radius.tolist()


def test_bad_mesh_size_is_a_clear_error():
  with pytest.raises(dds_jax.InputError, match="device"):
    dds_jax.make_mesh(len(jax.devices()) + 1)


def test_selection_and_estimation_in_one_pass_equal_separate_calls(cnn):
  bundle, params, x = cnn
  ids = np.arange(100, 107)
  streams = ((dds_jax.noise.Purpose.SELECT, 100),
             (dds_jax.noise.Purpose.ESTIMATE, 250))
  together = sampler.sample_streams(
      bundle.apply_fn, params, x, 0.5, jax.random.key(42), streams,
      batch_size=200, samples_per_block=50, example_ids=ids)
  for (purpose, n), counts in zip(streams, together):
    np.testing.assert_array_equal(
        counts, _counts(bundle, params, x, ids, num_samples=n,
                        purpose=purpose))
  assert np.all(together[0].sum(1) == 100) and np.all(together[1].sum(1) == 250)


@pytest.mark.parametrize("items,per_device,ndev", [
    (22, 10, 1), (2, 10, 1), (20, 10, 1), (21, 10, 2), (1, 4, 8), (0, 4, 2),
    (1000, 10, 1), (37, 8, 3)])
def test_step_sizes_hold_every_block_with_a_small_tail(items, per_device,
                                                       ndev):
  sizes = sampler._step_sizes(items, per_device, ndev)
  capacity = sum(sizes) * ndev
  assert capacity >= items
  assert all(1 <= s <= per_device for s in sizes)
  assert sizes[:-1] == [per_device] * (len(sizes) - 1)
  if sizes and sizes[-1] != per_device:   # the tail: a power of two that fits
    tail = sizes[-1]
    assert tail & (tail - 1) == 0
    assert capacity - items < max(tail // 2, 1) * ndev or tail == 1
  # The requested 2 x (n0 + n) = 2 x 1,100 samples of 100 per block on one
  # device with batch 1,000: 22 blocks run as 10 + 10 + 2, not 3 x 10.
  assert sampler._step_sizes(22, 10, 1) == [10, 10, 2]


_AOT_CHILD = r"""
import jax, numpy as np
from dds_jax import models, sampler
assert len(jax.devices()) == 64
bundle = models.build("small_cnn", 10, (8, 8, 1))
params = jax.eval_shape(bundle.init, jax.random.key(0))  # abstract only
mesh = sampler.make_mesh()
c = sampler.compile_count_step(bundle.apply_fn, params, mesh, (8, 8, 1), 10,
                               batch_size=400, samples_per_block=100)
shardings = c.input_shardings[0]
from jax.sharding import PartitionSpec as P
print(mesh.shape["data"], shardings[2].spec == P("data"),
      all(s.spec == P() for s in jax.tree.leaves(shardings[0])),
      c.memory_analysis() is not None)
"""


def test_sampler_compiles_ahead_of_time_for_a_64_device_mesh():
  res = subprocess.run([sys.executable, "-c", _AOT_CHILD], capture_output=True,
                       text=True, env=conftest.subprocess_env(64), timeout=300,
                       cwd=conftest.REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.split() == ["64", "True", "True", "True"]


def test_any_batch_size_of_at_least_one_block(cnn):
  """A power-of-two batch runs the largest multiple of the block that fits;
  counts are unchanged."""
  bundle, params, x = cnn
  ids = np.arange(7)
  ref = _counts(bundle, params, x, ids, batch_size=200)
  for batch_size in (128, 256, 1024):
    np.testing.assert_array_equal(
        _counts(bundle, params, x, ids, batch_size=batch_size), ref)
  assert sampler.blocks_per_step(1024, 100) == 10
  with pytest.raises(dds_jax.InputError, match="samples_per_block"):
    _counts(bundle, params, x, ids, batch_size=49)
