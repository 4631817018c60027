"""Checkpoints: round trip, mismatched model, damaged files."""

import os
import shutil

import jax
import numpy as np
import pytest

from dds_jax import CheckpointError
from dds_jax import checkpoint
from dds_jax import models


def _variables(shape=(8, 8, 1), classes=10, seed=0):
  bundle = models.build("small_cnn", classes, shape)
  return bundle.init(jax.random.key(seed))


def test_round_trip_and_meta(tmp_path):
  v = _variables()
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(7, v, {"mu": v["params"]}, {"step": 7, "model": "small_cnn"})
  ck.wait()
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), create=False)
  assert ck.latest_step() == 7
  assert ck.read_meta()["model"] == "small_cnn"
  out = ck.restore(_variables(seed=1))
  for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(v)):
    np.testing.assert_array_equal(a, b)


def test_missing_and_mismatched(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    checkpoint.Checkpointer(str(tmp_path / "nothing"), create=False)
  v = _variables()
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, v, {}, {"model": "small_cnn"})
  ck.wait()
  with pytest.raises(CheckpointError, match="cannot be restored"):
    ck.restore(_variables(classes=3))


def test_damaged_checkpoint_is_a_clear_error_and_left_alone(tmp_path):
  v = _variables()
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(3, v, {}, {"model": "small_cnn"})
  ck.wait()
  ck.close()
  step_dir = os.path.join(tmp_path, checkpoint.CKPT_DIR, "3", "params")
  damaged = 0
  for root, _, files in os.walk(step_dir):
    for f in files:
      if f != "_METADATA":
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(max(os.path.getsize(fh.name) // 2, 1))
        damaged += 1
  assert damaged
  before = sorted(os.listdir(step_dir))
  ck = checkpoint.Checkpointer(str(tmp_path), create=False)
  with pytest.raises(CheckpointError, match="cannot be restored") as info:
    ck.restore(_variables())
  # One line for the person; orbax's own error kept as the cause.
  assert "\n" not in str(info.value)
  cause = info.value.__cause__
  assert cause is not None and not isinstance(cause, CheckpointError)
  assert type(cause).__name__ in str(info.value)
  assert sorted(os.listdir(step_dir)) == before
  shutil.rmtree(tmp_path)
