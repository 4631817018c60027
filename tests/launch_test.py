"""Every launcher end to end on a tiny config, and bad input at the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dds_jax import analysis
from tests import conftest

DIGITS = "dds_jax/configs/digits.py:small"


def launch(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=conftest.REPO, env=conftest.subprocess_env(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """launch.run on digits:small: train, certify, analyze."""
  workdir = str(tmp_path_factory.mktemp("digits"))
  res = launch("run", f"--config={DIGITS}", f"--workdir={workdir}")
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir, res


def test_run_writes_every_result_file(trained):
  workdir, res = trained
  assert "| run" in res.stdout and "r=0.5" in res.stdout
  assert "ETA" in res.stderr          # progress lines
  cols = analysis.read_tsv(os.path.join(workdir, "certify.tsv"))
  assert list(cols)[:8] == ["idx", "label", "predict", "radius", "correct",
                            "time", "sigma", "p_lower"]
  np.testing.assert_array_equal(cols["idx"], np.arange(0, 360, 12) * 5)
  assert np.all(cols["sigma"] == 0.25)
  assert np.all((cols["radius"] > 0) == (cols["predict"] >= 0))
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  for key in ("certified_accuracy", "ci_low", "ci_high", "acr", "abstain_rate",
              "samples_per_s", "wall_time_s", "provenance"):
    assert key in summary
  assert summary["num_examples"] == 30
  assert summary["provenance"]["config"]["certify"]["n"] == 300
  assert "jax" in summary["provenance"]["packages"]
  assert os.path.getsize(os.path.join(workdir, "certified_accuracy.png")) > 1000
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  assert len(lines) == 2 and "noisy_test_accuracy" in json.loads(lines[-1])


def test_certify_again_gives_the_same_table_except_time(trained, tmp_path):
  workdir, _ = trained
  first = analysis.read_tsv(os.path.join(workdir, "certify.tsv"))
  res = launch("certify", f"--config={DIGITS}", f"--workdir={workdir}")
  assert res.returncode == 0, res.stderr[-3000:]
  again = analysis.read_tsv(os.path.join(workdir, "certify.tsv"))
  for name in first:
    if name != "time":
      np.testing.assert_array_equal(first[name], again[name], err_msg=name)


def test_train_resumes_instead_of_starting_over(trained):
  workdir, _ = trained
  res = launch("train", f"--config={DIGITS}", f"--workdir={workdir}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming from step" in res.stdout


def test_analyze_reads_our_tsv(trained, tmp_path):
  workdir, _ = trained
  res = launch("analyze", os.path.join(workdir, "certify.tsv"),
               f"--out={tmp_path}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert os.path.exists(tmp_path / "certified_accuracy.png")


def _assert_clean_failure(res, *needles):
  assert res.returncode != 0
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  for needle in needles:
    assert needle in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("override, needle", [
    ("--config.certify.alpha=1.5", "alpha"),
    ("--config.certify.n0=0", "n0"),
    ("--config.noise.sigma=0", "sigma"),
    ("--config.noise.sigma=nan", "sigma"),
    ("--config.model.name=vgg", "model.name"),
    ("--config.data.name=imagefolder:/does/not/exist", "does not exist"),
])
def test_bad_config_values_fail_cleanly(override, needle, tmp_path):
  res = launch("certify", f"--config={DIGITS}", f"--workdir={tmp_path}",
               override)
  _assert_clean_failure(res, needle)


def test_unknown_config_key_fails(tmp_path):
  res = launch("run", f"--config={DIGITS}", f"--workdir={tmp_path}",
               "--config.certify.nn=5")
  assert res.returncode != 0
  assert "nn" in res.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_checkpoint_fails_cleanly(tmp_path):
  res = launch("certify", f"--config={DIGITS}", f"--workdir={tmp_path}")
  _assert_clean_failure(res, "no checkpoint")


def test_checkpoint_of_another_model_fails_cleanly(trained):
  workdir, _ = trained
  res = launch("certify", f"--config={DIGITS}", f"--workdir={workdir}",
               "--config.model.name=resnet18")
  _assert_clean_failure(res, "small_cnn")
