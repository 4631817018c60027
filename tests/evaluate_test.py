"""The certification runner's resume and memory bookkeeping, in process."""

import numpy as np
import pytest

from dds_jax import ConfigError
from dds_jax import evaluate
from dds_jax.data import Dataset
from dds_jax.memory import MemoryStore

SHAPE = (2, 2, 1)


def _part(ids):
  rng = np.random.default_rng(int(ids[0]))
  n = len(ids)
  return Dataset(images=rng.uniform(size=(n,) + SHAPE).astype(np.float32),
                 labels=np.zeros(n, np.int32),
                 example_ids=np.asarray(ids, np.int64), num_classes=2,
                 class_names=("a", "b"), name="toy", split="test")


def _store(tmp_path):
  return MemoryStore(tmp_path / "m.sqlite", input_shape=SHAPE, dataset="toy",
                     model_fingerprint="f", alpha=0.001)


def _cert(n, pred=1):
  return {"pred": np.full(n, pred, np.int64), "radius": np.full(n, 0.01)}


def test_pending_rows_are_found_by_example_id_in_a_shared_store(tmp_path):
  store = _store(tmp_path)
  part = _part([10, 11, 12, 13])
  # Another run shares the store and inserts before and in between.
  other = _part([500, 501])
  store.insert_many(other.images[:1], [0], [0.001], example_ids=[500])
  since = len(store)
  mem, _ = evaluate._memory_rule(store, part.take(np.arange(2)), _cert(2), {})
  store.insert_many(other.images[1:], [0], [0.001], example_ids=[501])
  # The killed run had committed examples 10 and 11; resume at 10.
  pending = evaluate._pending_memory(store, since, part.example_ids)
  assert sorted(pending) == [10, 11]
  again, left = evaluate._memory_rule(store, part, _cert(4), pending)
  assert not left
  np.testing.assert_array_equal(again["preds"][:2], mem["preds"])
  ids = [int(e) for e in store.records()["example_id"]]
  assert ids == [500, 10, 11, 501, 12, 13]  # nothing stored twice


def test_a_store_written_by_another_config_is_a_config_error(tmp_path):
  store = _store(tmp_path)
  part = _part([1, 2])
  evaluate._memory_rule(store, part, _cert(2, pred=1), {})
  pending = evaluate._pending_memory(store, 0, part.example_ids)
  with pytest.raises(ConfigError, match="another configuration"):
    evaluate._memory_rule(store, part, _cert(2, pred=0), pending)
  # Pending rows that are not a prefix of the call: not this run's.
  pending = evaluate._pending_memory(store, 0, part.example_ids)
  del pending[1]
  with pytest.raises(ConfigError, match="another run"):
    evaluate._memory_rule(store, part, _cert(2), pending)
