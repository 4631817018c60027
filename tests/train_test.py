"""Training: each method with and without per-sample sigma, resume, export."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dds_jax import CheckpointError, ConfigError
from dds_jax import checkpoint
from dds_jax import models
from dds_jax import train
from dds_jax.configs import digits
from tests import conftest


def _config(method, ds, epochs=6):
  c = digits.get_config(f"small,method={method}" + (",ds" if ds else ""))
  c.train.epochs = epochs
  c.train.batch_size = 32
  c.train.eval_examples = 200
  c.ckpt.every_steps = 1000
  return c


@pytest.mark.parametrize("method", ["gaussian", "smoothadv", "macer"])
@pytest.mark.parametrize("ds", [False, True])
def test_each_method_learns_on_digits(method, ds, tmp_path):
  config = _config(method, ds)
  last = train.train_and_evaluate(config, str(tmp_path))
  # Chance is 0.1 on 10 balanced classes: one noisy draw per test image.
  assert last["noisy_test_accuracy"] > 0.25, last
  table = last["sigma_table"]
  if ds:
    assert table["max"] - table["min"] > 0.01       # sigma moved per example
    assert table["min"] >= config.train.ds.sigma_min
  else:
    assert table["min"] == table["max"] == 0.25
  # The table is in the checkpoint and comes back.
  ck = checkpoint.Checkpointer(str(tmp_path), create=False)
  bundle = models.build_from_config(config, (8, 8, 1))
  template = jax.eval_shape(bundle.init, jax.random.key(0))
  restored = ck.restore(template, sigma_table_like=np.zeros(1437, np.float32))
  t = np.asarray(restored["sigma_table"])
  assert t.shape == (1437,)
  assert abs(float(t.mean()) - table["mean"]) < 1e-6
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert len(lines) == 6 and "hist_counts" in json.loads(lines[-1])["sigma_table"]


_RUN = [sys.executable, "-m", "launch.train",
        "--config=dds_jax/configs/digits.py:small,method=smoothadv,ds",
        "--config.train.epochs=3", "--config.ckpt.every_steps=5"]


def _restore(workdir):
  config = digits.get_config("small,method=smoothadv,ds")
  bundle = models.build_from_config(config, (8, 8, 1))
  template = jax.eval_shape(bundle.init, jax.random.key(0))
  ck = checkpoint.Checkpointer(workdir, create=False)
  out = ck.restore(template, sigma_table_like=np.zeros(1437, np.float32))
  return out["step"], out["params"], np.asarray(out["sigma_table"])


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  env = conftest.subprocess_env(1)
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  res = subprocess.run(_RUN + [f"--workdir={full}"], cwd=conftest.REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  conftest.sigkill_after_checkpoint(_RUN + [f"--workdir={killed}"], killed,
                                   20, poll_s=0.05)
  res = subprocess.run(_RUN + [f"--workdir={killed}"], cwd=conftest.REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "resuming from step" in res.stdout
  step_a, params_a, table_a = _restore(full)
  step_b, params_b, table_b = _restore(killed)
  assert step_a == step_b
  np.testing.assert_array_equal(table_a, table_b)
  assert np.any(table_a != 0.25)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_is_small_and_certify_restores_from_it(tmp_path):
  config = _config("gaussian", False, epochs=1)
  config.ckpt.export_dtype = "bfloat16"
  train.train_and_evaluate(config, str(tmp_path / "run"))
  export = tmp_path / "run" / train.EXPORT_DIR
  assert os.path.getsize(export / checkpoint.EXPORT_PARAMS) < 60_000
  config.certify.checkpoint = str(export)
  bundle, params = checkpoint.restore_params(config, str(tmp_path / "elsewhere"),
                                        (8, 8, 1))
  _, _, table = None, None, None
  ck = checkpoint.Checkpointer(str(tmp_path / "run"), create=False)
  full = ck.restore(jax.eval_shape(bundle.init, jax.random.key(0)))["params"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full)):
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)   # bf16 rounding


def test_bad_training_input_is_refused_and_nothing_overwritten(tmp_path):
  c = _config("gaussian", False, epochs=1)
  c.train.method = "mixup"
  with pytest.raises(ConfigError, match="train.method"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a" / "checkpoints")
  # A checkpoint whose sigma table does not match the dataset.
  good = _config("gaussian", True, epochs=1)
  train.train_and_evaluate(good, str(tmp_path / "b"))
  before = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
  ck = checkpoint.Checkpointer(str(tmp_path / "b"), create=False)
  bundle = models.build_from_config(good, (8, 8, 1))
  with pytest.raises(CheckpointError, match="sigma table"):
    ck.restore(jax.eval_shape(bundle.init, jax.random.key(0)),
               sigma_table_like=np.zeros(100, np.float32))
  # A corrupted checkpoint: a clear error when resuming, nothing written.
  step_dir = tmp_path / "b" / "checkpoints" / before[-1] / "params"
  for root, _, files in os.walk(step_dir):
    for f in files:
      if f != "_METADATA":
        open(os.path.join(root, f), "wb").close()
  good.train.epochs = 2
  with pytest.raises(CheckpointError):
    train.train_and_evaluate(good, str(tmp_path / "b"))
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == before
