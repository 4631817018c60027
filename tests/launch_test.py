"""Every launcher end to end on a tiny config, and bad input at the CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dds_jax import analysis
from dds_jax.configs import digits as digits_config
from tests import conftest

DIGITS = "dds_jax/configs/digits.py:small"
# launch.run's layout (dds_jax.experiment.paper_comparison): the fixture's
# `workdir` is the fixed-sigma model's training dir; the certifications and
# the comparison are beside it.
METHOD = digits_config.get_config("small").certify.sigma_method


def result_dir(workdir, name):
  """fixed: the baseline run; ds: the fixed-trained model at METHOD."""
  sub = {"fixed": "fixed_fixed", "ds": f"fixed_{METHOD}",
         "ds_train": f"ds_{METHOD}"}.get(name, name)
  return os.path.join(os.path.dirname(workdir), sub)


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
  return os.path.join(workdir, "train_fixed"), res


def _same_except_time(a, b, columns=None):
  for name in columns or a:
    if name != "time":
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_run_writes_every_result_file(trained):
  workdir, res = trained
  root = os.path.dirname(workdir)
  rows = ("fixed train, fixed sigma", f"fixed train, {METHOD} sigma",
          f"per-sample train, {METHOD} sigma")
  for row in rows:
    assert f"| {row} " in res.stdout
  # The best data-dependent row made sound, the paired tests, the caps.
  assert f"sigma + memory " in res.stdout and "McNemar" in res.stdout
  assert "r=0.5" in res.stdout and "union bound" in res.stdout
  assert "beyond cap" in res.stdout   # N = 300 cannot certify r = 1 at 0.25
  assert "Per-sample sigma table after training" in res.stdout
  assert "ETA" in res.stderr          # progress lines
  fixed = analysis.read_tsv(os.path.join(result_dir(workdir, "fixed"),
                                         "certify.tsv"))
  assert list(fixed)[:8] == ["idx", "label", "predict", "radius", "correct",
                             "time", "sigma", "p_lower"]
  np.testing.assert_array_equal(fixed["idx"], np.arange(0, 360, 12) * 5)
  assert np.all(fixed["sigma"] == 0.25)
  assert np.all((fixed["radius"] > 0) <= (fixed["predict"] >= 0))
  ds = analysis.read_tsv(os.path.join(result_dir(workdir, "ds"), "certify.tsv"))
  assert {"predict_mem", "radius_mem", "changed"} <= set(ds)
  assert np.any(ds["sigma"] != 0.25) and np.all(ds["sigma"] >= 0.01)
  sig = analysis.read_tsv(os.path.join(result_dir(workdir, "ds"), "sigma.tsv"),
                          required=("idx", "sigma"))
  np.testing.assert_array_equal(sig["idx"], ds["idx"])
  np.testing.assert_allclose(sig["sigma"], ds["sigma"], rtol=1e-5)
  for sub in ("fixed", "ds", "ds_train"):
    summary = json.load(open(os.path.join(result_dir(workdir, sub),
                                          "summary.json")))
    for key in ("certified_accuracy", "ci_low", "ci_high", "acr",
                "abstain_rate", "samples_per_s", "wall_time_s", "provenance",
                "radius_cap"):
      assert key in summary
    assert summary["num_examples"] == 30
    assert summary["provenance"]["config"]["certify"]["n"] == 300
    assert "jax" in summary["provenance"]["packages"]
  mem = summary["memory"]
  assert mem["num_stored"] == 30 and mem["invariant_holds"]
  assert mem["union_bound"] == pytest.approx(30 * 0.001)
  assert os.path.exists(os.path.join(result_dir(workdir, "ds"),
                                     "memory.sqlite"))
  assert os.path.getsize(os.path.join(root, "certified_accuracy.png")) > 1000
  # comparison.json: the paired counts agree with the two TSVs.
  comp = json.load(open(os.path.join(root, "comparison.json")))
  assert comp["baseline"] == rows[0]
  paired = comp["paired"][rows[1]]
  i = paired["radii"].index(0.25)
  yes_f = (fixed["correct"] == 1) & (fixed["radius"] >= 0.25)
  yes_d = (ds["correct"] == 1) & (ds["radius"] >= 0.25)
  assert paired["only_other"][i] == int(np.sum(yes_d & ~yes_f))
  assert paired["only_base"][i] == int(np.sum(yes_f & ~yes_d))
  assert paired["ci_low"][i] <= paired["difference"][i] <= paired["ci_high"][i]
  assert "| fixed train, fixed sigma" in open(
      os.path.join(root, "comparison.md")).read()
  # Both models trained with the same seed and schedule; only the second has
  # a per-sample sigma table, and it moved.
  table = analysis.read_tsv(os.path.join(root, "train_ds", "export",
                                         "sigma_table.tsv"),
                            required=("idx", "sigma"))
  assert np.any(table["sigma"] != 0.25)
  assert not os.path.exists(os.path.join(workdir, "export", "sigma_table.tsv"))
  for sub in ("train_fixed", "train_ds"):
    lines = open(os.path.join(root, sub, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2 and "noisy_test_accuracy" in json.loads(lines[-1])


def test_certify_again_gives_the_same_table_except_time(trained, tmp_path):
  workdir, _ = trained
  first = analysis.read_tsv(os.path.join(result_dir(workdir, "fixed"), "certify.tsv"))
  res = launch("certify", f"--config={DIGITS}", f"--workdir={workdir}",
               "--config.certify.sigma_method=fixed",
               "--config.certify.soundness=none")
  assert res.returncode == 0, res.stderr[-3000:]
  again = analysis.read_tsv(os.path.join(workdir, "certify.tsv"))
  _same_except_time(first, again)


def test_saved_sigma_file_is_reused(trained, tmp_path):
  workdir, _ = trained
  ds = analysis.read_tsv(os.path.join(result_dir(workdir, "ds"), "certify.tsv"))
  res = launch("certify", f"--config={DIGITS}", f"--workdir={workdir}",
               "--config.certify.sigma_method=file",
               f"--config.sigma_opt.sigma_file={result_dir(workdir, 'ds')}/sigma.tsv",
               f"--config.memory.path={tmp_path}/mem.sqlite")
  assert res.returncode == 0, res.stderr[-3000:]
  again = analysis.read_tsv(os.path.join(workdir, "certify.tsv"))
  _same_except_time(ds, again, ["idx", "predict", "radius", "sigma",
                                "predict_mem", "radius_mem", "changed"])


def test_train_resumes_instead_of_starting_over(trained):
  workdir, _ = trained
  res = launch("train", f"--config={DIGITS}", f"--workdir={workdir}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming from step" in res.stdout


def test_analyze_reads_our_tsv(trained, tmp_path):
  workdir, _ = trained
  # The run's own TSV: other tests certify into workdir, in any order.
  res = launch("analyze",
               os.path.join(result_dir(workdir, "fixed"), "certify.tsv"),
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
    ("--config.sigma_opt.enabled=True", "certify.sigma_method"),
    ("--config.memory.enabled=True", "certify.soundness"),
    ("--config.certify.soundness=memory "
     "--config.certify.sigma_method=fixed", "needs a data-dependent"),
])
def test_bad_config_values_fail_cleanly(override, needle, tmp_path):
  res = launch("certify", f"--config={DIGITS}", f"--workdir={tmp_path}",
               *override.split())
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


def test_l1_uniform_noise_through_sigma_opt_and_memory(trained, tmp_path):
  workdir, _ = trained
  res = launch("certify", f"--config={DIGITS}", f"--workdir={workdir}",
               "--config.noise.kind=uniform", "--config.noise.sigma=0.5",
               f"--config.memory.path={tmp_path}/l1.sqlite")
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["noise"] == "uniform"
  assert summary["memory"]["norm"] == 1 and summary["memory"]["invariant_holds"]
  cols = analysis.read_tsv(os.path.join(workdir, "certify.tsv"))
  ok = cols["predict"] >= 0
  # L1 radius 2 s (p_lower - 1/2) <= s.
  assert np.all(cols["radius"][ok] <= cols["sigma"][ok] + 1e-9)
  np.testing.assert_allclose(cols["radius"][ok],
                             2 * cols["sigma"][ok] * (cols["p_lower"][ok] - 0.5),
                             rtol=1e-4)


def test_killed_certification_resumes_to_the_same_files(trained, tmp_path):
  import signal
  import sqlite3
  import time
  workdir, _ = trained
  full = analysis.read_tsv(os.path.join(result_dir(workdir, "ds"), "certify.tsv"))
  # A fresh results dir, the model from the parameters-only export.
  flags = [f"--config={DIGITS}", f"--workdir={tmp_path}/w",
           f"--config.certify.checkpoint={workdir}/export",
           f"--config.memory.path={tmp_path}/m.sqlite",
           "--config.certify.examples_per_call=4"]
  args = [sys.executable, "-m", "launch.certify"] + flags
  # The uninterrupted run with 4 examples per call gives the same rows.
  proc = subprocess.Popen(args, cwd=conftest.REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=conftest.subprocess_env(1))
  tsv = os.path.join(tmp_path, "w", "certify.tsv")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(tsv) and len(open(tsv).read().splitlines()) >= 9:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "certification ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = analysis.read_tsv(tsv)
  assert 8 <= len(partial["idx"]) < 30
  res = launch("certify", *flags)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming certification at example" in res.stdout
  again = analysis.read_tsv(tsv)
  _same_except_time(full, again, ["idx", "label", "predict", "radius",
                                  "correct", "sigma", "p_lower",
                                  "predict_mem", "radius_mem", "changed"])
  with sqlite3.connect(f"{tmp_path}/m.sqlite") as db:
    stored = db.execute("SELECT example_id, raw_radius, radius FROM "
                        "certificates ORDER BY id").fetchall()
  ids = [r[0] for r in stored]
  assert ids == again["idx"].tolist()       # each certificate stored once
  # The TSV holds the issued radii exactly (shortest round-trip floats), the
  # ones the store holds, so the resumed summary equals the uninterrupted one.
  assert [r[1] for r in stored] == again["radius"].tolist()
  assert [r[2] for r in stored] == again["radius_mem"].tolist()
  resumed = json.load(open(os.path.join(tmp_path, "w", "summary.json")))
  uninterrupted = json.load(open(os.path.join(result_dir(workdir, "ds"), "summary.json")))
  assert resumed["examples_this_run"] == 30 - len(partial["idx"])
  for key in ("certified_accuracy", "num_certified", "ci_low", "ci_high",
              "acr", "abstain_rate", "clean_accuracy", "sigma_stats"):
    assert resumed[key] == uninterrupted[key], key
  for key in ("certified_accuracy", "acr", "num_stored", "union_bound",
              "invariant_holds", "num_changed_this_run"):
    assert resumed["memory"][key] == uninterrupted["memory"][key], key

  # A resume across a change of noise streams is refused, in one line.
  state_path = os.path.join(tmp_path, "w", "certify_state.json")
  state = json.load(open(state_path))
  state["noise_version"] -= 1
  with open(state_path, "w") as f:
    json.dump(state, f)
  res = launch("certify", *flags)
  _assert_clean_failure(res, "noise version")


def test_pod_and_slurm_scripts_run_the_launcher_with_multihost():
  env = dict(os.environ, TPU="pod", ZONE="zone", DRY="1")
  res = subprocess.run(["bash", "launch/tpu_pod.sh", "run", "launch.certify",
                        "--config=dds_jax/configs/imagenet.py",
                        "--workdir=/mnt/shared/run"], cwd=conftest.REPO,
                       capture_output=True, text=True, env=env, timeout=60)
  assert res.returncode == 0, res.stderr
  assert "--worker=all" in res.stdout and "--multihost" in res.stdout
  assert "launch.certify" in res.stdout
  res = subprocess.run(["bash", "-n", "launch/slurm.sbatch"],
                       cwd=conftest.REPO, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  with open(os.path.join(conftest.REPO, "launch", "slurm.sbatch")) as f:
    text = f.read()
  assert "srun" in text and "--multihost" in text


_PRINT_DEVICES = (
    "import jax\n"
    "from absl import app\n"
    "from launch import common\n"
    "app.run(lambda argv: common.run_main(\n"
    "    lambda: print('devices', jax.device_count())))\n")


@pytest.mark.parametrize("host_devices, env, want", [
    (2, {}, 2),                                  # the config's count
    (-1, {}, 1),                                 # XLA's default
    (-1, {"DDS_JAX_HOST_DEVICES": "2"}, 2),      # the environment wins
    (2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
    (2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3",
         "DDS_JAX_HOST_DEVICES": "2"}, 3),       # an explicit XLA_FLAGS wins
])
def test_launchers_set_the_host_device_count(host_devices, env, want,
                                             tmp_path):
  """run_main sets XLA's CPU device count before JAX starts its backends."""
  child_env = conftest.subprocess_env(1)
  del child_env["XLA_FLAGS"]
  child_env.pop("DDS_JAX_HOST_DEVICES", None)
  child_env.update(env)
  res = subprocess.run(
      [sys.executable, "-c", _PRINT_DEVICES, f"--config={DIGITS}",
       f"--workdir={tmp_path}", f"--config.mesh.host_devices={host_devices}"],
      capture_output=True, text=True, timeout=300, cwd=conftest.REPO,
      env=child_env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.split() == ["devices", str(want)]


def test_a_bad_host_device_count_fails_cleanly(tmp_path):
  env = dict(conftest.subprocess_env(1), DDS_JAX_HOST_DEVICES="two")
  del env["XLA_FLAGS"]
  res = subprocess.run(
      [sys.executable, "-c", _PRINT_DEVICES, f"--config={DIGITS}",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300,
      cwd=conftest.REPO, env=env)
  _assert_clean_failure(res, "DDS_JAX_HOST_DEVICES='two'")


def test_certificate_aware_grid_sigma_with_the_memory(trained, tmp_path):
  workdir, _ = trained
  res = launch("certify", f"--config={DIGITS}", f"--workdir={tmp_path}/g",
               f"--config.certify.checkpoint={workdir}/export",
               "--config.certify.sigma_method=grid",
               "--config.sigma_grid.sigmas=(0.15,0.25,0.4)",
               "--config.sigma_grid.pilot=100")
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.load(open(os.path.join(tmp_path, "g", "summary.json")))
  assert summary["sigma_method"] == "grid"
  assert summary["sigma_forward_passes"] == 300
  assert summary["certify_forward_passes"] == 50 + 300
  assert summary["memory"]["invariant_holds"]
  cols = analysis.read_tsv(os.path.join(tmp_path, "g", "certify.tsv"))
  assert set(np.round(cols["sigma"], 6)) <= {0.15, 0.25, 0.4}
  sig = analysis.read_tsv(os.path.join(tmp_path, "g", "sigma.tsv"),
                          required=("idx", "sigma"))
  # The TSV holds the float32 sigma the noise was drawn with.
  np.testing.assert_allclose(sig["sigma"], cols["sigma"], rtol=1e-6)


def test_tune_grid_certifies_held_out_training_images_only(tmp_path):
  train_dir = str(tmp_path / "train")
  holdout = ["--config.data.holdout=60"]
  res = launch("train", f"--config={DIGITS}", f"--workdir={train_dir}",
               "--config.train.epochs=1", *holdout)
  assert res.returncode == 0, res.stderr[-3000:]
  # The test split is refused: tuning never looks at the reported images.
  res = launch("tune_grid", f"--config={DIGITS}", f"--workdir={tmp_path}",
               f"--config.certify.checkpoint={train_dir}/export", *holdout)
  _assert_clean_failure(res, "data.test_split='holdout'")
  res = launch("tune_grid", f"--config={DIGITS}", f"--workdir={tmp_path}",
               f"--config.certify.checkpoint={train_dir}/export",
               "--config.data.test_split=holdout", "--config.certify.skip=6",
               *holdout)
  assert res.returncode == 0, res.stderr[-3000:]
  from dds_jax import data, experiment
  held = data.holdout_positions(1437, 60)
  fixed = analysis.read_tsv(str(tmp_path / "fixed" / "certify.tsv"))
  # Training-split example ids of the held-out images (every 6th of them).
  train_ids = data.load("digits", "train").example_ids
  np.testing.assert_array_equal(fixed["idx"], train_ids[held][::6])
  comp = json.load(open(tmp_path / "comparison.json"))
  assert len(comp["paired"]) == len(experiment.GRID_SETTINGS)
  assert "grid 5 sigmas x 500" in comp["paired"]
  assert "choosing sigma cost 2500 forward passes" in res.stdout


def test_grid_settings_by_name():
  from dds_jax import errors, experiment
  assert experiment.grid_settings() == experiment.GRID_SETTINGS
  (row,) = experiment.grid_settings(["4 sigmas x 1000"])
  assert row == ("4 sigmas x 1000", (0.15, 0.2, 0.25, 0.3), 1000)
  with pytest.raises(errors.ConfigError, match="unknown grid setting"):
    experiment.grid_settings(["9 sigmas x 1"])


def test_dual_selector_trains_and_certifies_end_to_end(trained, tmp_path):
  """train.target=selector on the per-sample model's sigma table, then
  launch.certify with dual soundness (and with the memory instead)."""
  workdir, _ = trained
  root = os.path.dirname(workdir)
  sigmas = "--config.dual.sigmas=(0.2,0.25,0.255)"
  sel = str(tmp_path / "selector")
  res = launch("train", f"--config={DIGITS}", f"--workdir={sel}", sigmas,
               "--config.train.target=selector",
               f"--config.dual.targets={root}/train_ds/export/sigma_table.tsv")
  assert res.returncode == 0, res.stderr[-3000:]
  meta = json.load(open(os.path.join(sel, "export", "export.json")))
  assert meta["target"] == "selector" and meta["num_classes"] == 3
  assert meta["selector_sigma"] == 0.255 and meta["image_shape"] == [8, 8, 1]
  flags = [f"--config={DIGITS}", sigmas, f"--config.dual.selector={sel}",
           f"--config.certify.checkpoint={root}/train_ds/export",
           "--config.certify.sigma_method=selector"]
  res = launch("certify", *flags, "--config.certify.soundness=dual",
               f"--workdir={tmp_path}/dual")
  assert res.returncode == 0, res.stderr[-3000:]
  cols = analysis.read_tsv(os.path.join(tmp_path, "dual", "certify.tsv"))
  assert len(cols["idx"]) == 30
  ok = cols["predict"] >= 0
  np.testing.assert_array_equal(
      cols["radius"][ok], np.minimum(cols["radius_sigma"], cols["radius_c"])[ok])
  assert np.all(cols["predict"][cols["sigma_index"] < 0] == -1)
  assert set(np.round(cols["sigma"], 6)) <= {0.2, 0.25, 0.255}
  summary = json.load(open(os.path.join(tmp_path, "dual", "summary.json")))
  assert summary["dual"]["alpha_sigma"] == pytest.approx(0.0005)
  assert summary["dual"]["alpha_c"] == pytest.approx(0.0005)
  assert sum(summary["dual"]["chosen"].values()) + round(
      30 * summary["dual"]["selector_abstain_rate"]) == 30
  assert summary["sigma_forward_passes"] == 50 + 300  # the selector's draws
  # The same selector through the memory instead.
  res = launch("certify", *flags, "--config.certify.soundness=memory",
               "--config.certify.max=120", f"--workdir={tmp_path}/mem")
  assert res.returncode == 0, res.stderr[-3000:]
  mem = analysis.read_tsv(os.path.join(tmp_path, "mem", "certify.tsv"))
  assert {"radius_mem", "sigma_index"} <= set(mem) and len(mem["idx"]) == 10
  np.testing.assert_array_equal(mem["radius"], mem["radius_c"])
  # Bad selectors: other sigmas, a classifier, other images.
  res = launch("certify", *[f for f in flags if f != sigmas],
               "--config.certify.soundness=dual",
               "--config.dual.sigmas=(0.2,0.25)", f"--workdir={tmp_path}/x")
  _assert_clean_failure(res, "chooses among sigmas")
  res = launch("certify", f"--config={DIGITS}", sigmas,
               f"--config.dual.selector={root}/train_ds",
               f"--config.certify.checkpoint={root}/train_ds/export",
               "--config.certify.sigma_method=selector",
               "--config.certify.soundness=dual", f"--workdir={tmp_path}/y")
  _assert_clean_failure(res, "not a sigma selector")
  from dds_jax import dual
  cfg = digits_config.get_config("small")
  cfg.dual.sigmas, cfg.dual.selector = (0.2, 0.25, 0.255), sel
  with pytest.raises(Exception, match="trained on images of shape"):
    dual.load_selector(cfg, (16, 16, 1))


def test_a_finished_certification_is_not_rerun(trained, tmp_path):
  workdir, _ = trained
  flags = [f"--config={DIGITS}", f"--workdir={tmp_path}/f",
           f"--config.certify.checkpoint={workdir}/export",
           "--config.certify.max=24"]
  res = launch("certify", *flags)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = open(os.path.join(tmp_path, "f", "summary.json")).read()
  res = launch("certify", *flags)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming certification at example 2 of 2" in res.stdout
  # Its summary (with this run's timing) stands as it was written.
  assert open(os.path.join(tmp_path, "f", "summary.json")).read() == summary


def test_dual_comparison_beside_the_main_job(trained, tmp_path):
  """launch.dual on the main job's models: two selectors, five rows."""
  workdir, _ = trained
  root = os.path.dirname(workdir)
  for sub in ("train_fixed", "train_ds"):
    shutil.copytree(os.path.join(root, sub), tmp_path / sub)
  res = launch("dual", f"--config={DIGITS}", f"--workdir={tmp_path}",
               "--config.sigma_grid.pilot=50")
  assert res.returncode == 0, res.stderr[-3000:]
  out = tmp_path / "dual_ds"
  comp = json.load(open(out / "comparison.json"))
  assert comp["baseline"] == "per-sample train, fixed sigma"
  for row in ("per-sample train, grid sigma + memory",
              "per-sample train, selector (table targets) + memory",
              "per-sample train, dual (table targets)",
              "per-sample train, dual (grid targets)"):
    assert row in comp["paired"], row
  assert comp["summaries"]["per-sample train, dual (grid targets)"][
      "soundness"] == "dual"
  targets = analysis.read_tsv(out / "grid_targets.tsv",
                              required=("idx", "sigma"))
  assert len(targets["idx"]) == 1437
  for name in ("table", "grid"):
    assert json.load(open(out / f"selector_{name}" / "export" /
                          "export.json"))["target"] == "selector"
  assert "What each certificate promises" in res.stdout


def test_sequential_procedure_and_the_randomized_bound(trained, tmp_path):
  """certify.procedure=sequential writes `samples` and decides radius r or
  nothing (also through the memory); certify.bound=randomized on the same
  counts is never below Clopper-Pearson."""
  workdir, _ = trained
  base = [f"--config={DIGITS}", f"--config.certify.checkpoint={workdir}/export"]
  res = launch("certify", *base, f"--workdir={tmp_path}/s",
               "--config.certify.procedure=sequential",
               "--config.certify.radius=0.25",
               "--config.certify.max_samples=2000")
  assert res.returncode == 0, res.stderr[-3000:]
  cols = analysis.read_tsv(os.path.join(tmp_path, "s", "certify.tsv"))
  assert set(np.unique(cols["radius"])) <= {0.0, 0.25}
  assert np.all((cols["samples"] >= 50 + 50) & (cols["samples"] <= 50 + 2000))
  np.testing.assert_array_equal(cols["radius"] > 0, cols["predict"] >= 0)
  assert "radius_mem" in cols  # digits' default grid sigma + memory
  assert set(np.unique(cols["radius_mem"])) <= {0.0, 0.25}
  seq = json.load(open(os.path.join(tmp_path, "s", "summary.json")))[
      "sequential"]
  assert seq["mean_samples"] == pytest.approx(np.mean(cols["samples"]))
  assert seq["ratio_to_cohen"] == pytest.approx(seq["mean_samples"] / 350)
  assert seq["certified_accuracy"] == pytest.approx(
      np.mean((cols["predict"] >= 0) & (cols["correct"] == 1)))
  fixed = ["--config.certify.sigma_method=fixed",
           "--config.certify.soundness=none"]
  for bound in ("clopper_pearson", "randomized"):
    res = launch("certify", *base, *fixed, f"--workdir={tmp_path}/{bound}",
                 f"--config.certify.bound={bound}")
    assert res.returncode == 0, res.stderr[-3000:]
  plain = analysis.read_tsv(os.path.join(tmp_path, "clopper_pearson",
                                         "certify.tsv"))
  rand = analysis.read_tsv(os.path.join(tmp_path, "randomized",
                                        "certify.tsv"))
  assert np.all(rand["p_lower"] >= plain["p_lower"])
  assert np.any(rand["p_lower"] > plain["p_lower"])
  np.testing.assert_array_equal(rand["radius"] >= plain["radius"], True)


@pytest.mark.parametrize("override, needle", [
    ("--config.certify.radius=-0.5", "certify.radius"),
    ("--config.certify.max_samples=0", "certify.max_samples"),
    ("--config.certify.bound=wilson", "certify.bound"),
    ("--config.certify.procedure=anytime", "certify.procedure"),
    ("--config.certify.sequence=hoeffding", "certify.sequence"),
])
def test_bad_sequential_settings_fail_cleanly(override, needle, tmp_path):
  res = launch("certify", f"--config={DIGITS}", f"--workdir={tmp_path}",
               override)
  _assert_clean_failure(res, needle)
