"""Several processes on this CPU (jax.distributed, gloo collectives, localhost
coordinator) give exactly the results of one process."""

import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from dds_jax import analysis
from dds_jax.configs import digits
from tests import conftest

DIGITS = "dds_jax/configs/digits.py:small"
TRAIN_FLAGS = ("--config.train.ds.enabled=True",  # a sigma table to compare
               "--config.mesh.train_devices=2")  # both layouts: 2 devices


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(module, *args, num_processes=1, devices=1):
  """Starts a launcher as num_processes processes (localhost coordinator)."""
  cmd = [sys.executable, "-m", f"launch.{module}", *args]
  if num_processes > 1:
    port = free_port()
    cmds = [cmd + ["--multihost", f"--coordinator_address=localhost:{port}",
                   f"--num_processes={num_processes}", f"--process_id={i}"]
            for i in range(num_processes)]
  else:
    cmds = [cmd]
  return [subprocess.Popen(c, cwd=conftest.REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=conftest.subprocess_env(devices))
          for c in cmds]


def launch(module, *args, num_processes=1, devices=1, timeout=600):
  """Runs a launcher as num_processes processes with `devices` CPU devices each.

  Returns the list of (returncode, stdout, stderr), one per process. A run in
  which a process dies by a signal (seen once in CI: SIGABRT from a
  single-process CPU run under load, not reproduced in 18 standalone runs
  and 6 runs of this module, nor in 18 runs of train/certify/run beside a busy
  loop at load 5-6 on 2 cores) is repeated once from the same starting
  `--workdir`, with a warning (and a print, for -rA) carrying the dead
  process's crash evidence: the launchers turn faulthandler on, so its stderr
  holds every thread's Python traceback (crash_evidence); an exit with an
  error code fails at once.
  """
  workdir = next(a.split("=", 1)[1] for a in args
                 if a.startswith("--workdir="))
  before = workdir.rstrip("/") + ".before"
  if os.path.exists(workdir):
    shutil.copytree(workdir, before)
  for attempt in (0, 1):
    out = _communicate(start(module, *args, num_processes=num_processes,
                             devices=devices), timeout)
    died = [(i, rc, o, e) for i, (rc, o, e) in enumerate(out) if rc < 0]
    if not died or attempt:
      break
    i, rc, stdout, err = died[0]
    message = (f"launch.{module}: process {i} died by signal {-rc}; "
               f"rerunning once.\nCrash evidence:\n{crash_evidence(err)}\n"
               f"Report: {_report(stdout, err)}")
    print(message, file=sys.stderr)
    warnings.warn(message)
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(before):
      shutil.copytree(before, workdir)
  shutil.rmtree(before, ignore_errors=True)
  for i, (rc, stdout, err) in enumerate(out):
    assert rc == 0, f"process {i} exited with {rc}: {_report(stdout, err)}"
  return out


def _communicate(procs, timeout):
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def _report(stdout: str, stderr: str) -> str:
  """What a failed child said: stdout's end, stderr without absl INFO lines
  (a fatal error's first lines come before its long module list)."""
  lines = [l for l in stderr.splitlines() if not l.startswith("I")]
  return (f"stdout ends: {stdout[-1000:]}\nstderr: " +
          "\n".join(lines[:60])[:4000] + "\n...\n" + stderr[-1500:])


def crash_evidence(stderr: str, limit: int = 20000) -> str:
  """A dead child's own account of its crash, from its stderr.

  The C++ fatal and error log lines (`F1201 ...`, `E1201 ...`, e.g. an XLA
  check that failed) and faulthandler's dump: from `Fatal Python error` up to
  the extension module list, every thread's Python traceback.
  """
  lines = stderr.splitlines()
  logged = [l for l in lines if re.match(r"[FE]\d{4} ", l)]
  start = next((j for j, l in enumerate(lines)
                if l.startswith("Fatal Python error")), None)
  dump = []
  if start is not None:
    dump = list(itertools.takewhile(
        lambda l: not l.startswith("Extension modules:"), lines[start:]))
  text = "\n".join(logged[-20:] + dump)
  return text[:limit] if text else "(no fatal log line, no faulthandler dump)"


def _same_except_time(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    if name != "time":
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
          for r in rows]


def _sigma_table(workdir):
  from dds_jax import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  meta = ckpt.read_meta()
  import jax
  from dds_jax import models
  bundle = models.build_from_config(digits.get_config("small"), (8, 8, 1))
  template = jax.eval_shape(bundle.init, jax.random.key(0))
  out = ckpt.restore(template, sigma_table_like=np.zeros(meta["num_train"],
                                                         np.float32),
                     sharding=jax.sharding.SingleDeviceSharding(
                         jax.devices()[0]))
  ckpt.close()
  return np.asarray(out["sigma_table"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The same training run on 1 process x 2 devices and 2 processes x 1."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = str(root / "one"), str(root / "two")
  launch("train", f"--config={DIGITS}", f"--workdir={one}", *TRAIN_FLAGS,
         devices=2)
  res = launch("train", f"--config={DIGITS}", f"--workdir={two}",
               *TRAIN_FLAGS, num_processes=2)
  return one, two, res


def test_training_on_two_processes_equals_one(trained):
  one, two, res = trained
  with open(os.path.join(one, "export", "params.msgpack"), "rb") as f:
    params_one = f.read()
  with open(os.path.join(two, "export", "params.msgpack"), "rb") as f:
    assert f.read() == params_one  # bit for bit
  assert _metrics(one) == _metrics(two)
  table_one, table_two = _sigma_table(one), _sigma_table(two)
  assert np.any(table_one != table_one[0])  # the ascent moved some sigmas
  np.testing.assert_array_equal(table_one, table_two)  # orbax, 2 hosts
  # Process 0 reports; process 1 stays quiet.
  assert "epoch 2/2" in res[0][1] and "epoch" not in res[1][1]
  # Both processes restore the orbax checkpoint they wrote together.
  again = launch("train", f"--config={DIGITS}", f"--workdir={two}",
                 *TRAIN_FLAGS, num_processes=2)
  assert "resuming from step 44" in again[0][1]
  with open(os.path.join(two, "export", "params.msgpack"), "rb") as f:
    assert f.read() == params_one


def test_grain_pipeline_on_two_processes_equals_memory_on_one(trained,
                                                              tmp_path):
  """data.pipeline=grain on 2 processes x 1 device trains the same parameters,
  bit for bit, as the in-memory pipeline on 1 process x 2 devices: the same
  global batches (order, example ids, images), each process reading its
  rows."""
  one, _, _ = trained
  grain = str(tmp_path / "grain")
  res = launch("train", f"--config={DIGITS}", f"--workdir={grain}",
               *TRAIN_FLAGS, "--config.data.pipeline=grain", num_processes=2)
  assert "epoch 2/2" in res[0][1]
  with open(os.path.join(one, "export", "params.msgpack"), "rb") as f:
    params_one = f.read()
  with open(os.path.join(grain, "export", "params.msgpack"), "rb") as f:
    assert f.read() == params_one
  np.testing.assert_array_equal(_sigma_table(one), _sigma_table(grain))


def _cut_after_10_rows_and_resume(flags, multi, full):
  """Cuts multi's certify.tsv to 10 rows (a crash), resumes on 2 processes."""
  tsv = os.path.join(multi, "certify.tsv")
  with open(tsv) as f:
    lines = f.read().splitlines(keepends=True)
  with open(tsv, "w") as f:
    f.writelines(lines[:11])
  res = launch("certify", *flags, f"--workdir={multi}", num_processes=2)
  assert "resuming certification at example 10 of 30" in res[0][1]
  _same_except_time(full, analysis.read_tsv(tsv))


def test_certification_on_two_processes_equals_one(trained, tmp_path):
  """Data-dependent sigma, memory and Monte Carlo certification, split 3/4 per
  call of 7 examples, against one process on one device; then a crash after
  10 rows resumes (on two processes) to the same files."""
  one, _, _ = trained
  flags = [f"--config={DIGITS}", "--config.certify.examples_per_call=7"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  for d in (single, multi):
    shutil.copytree(os.path.join(one, "checkpoints"),
                    os.path.join(d, "checkpoints"))
  launch("certify", *flags, f"--workdir={single}")
  res = launch("certify", *flags, f"--workdir={multi}", num_processes=2)
  assert "certify |" in res[0][1] and "certify |" not in res[1][1]
  full = analysis.read_tsv(os.path.join(single, "certify.tsv"))
  assert len(full["idx"]) == 30
  _same_except_time(full, analysis.read_tsv(os.path.join(multi,
                                                          "certify.tsv")))
  for name in ("sigma.tsv",):
    with open(os.path.join(single, name)) as a, open(os.path.join(
        multi, name)) as b:
      assert a.read() == b.read()
  with open(os.path.join(multi, "summary.json")) as f:
    summary = json.load(f)
  assert summary["n"] == 300 and summary["memory"]["num_stored"] == 30

  def stored(d):
    with sqlite3.connect(os.path.join(d, "memory.sqlite")) as db:
      return db.execute("SELECT example_id, pred, radius FROM certificates "
                        "ORDER BY id").fetchall()
  assert stored(single) == stored(multi)

  # A crash after 10 rows: the TSV holds 10 rows, the store all 30 (the
  # memory committed before the TSV was written). Two processes resume.
  _cut_after_10_rows_and_resume(flags, multi, full)
  assert stored(single) == stored(multi)  # nothing inserted twice

  # Both processes SIGKILLed mid-run (after the first call of 7 rows), then
  # restarted: the same files, each certificate stored once.
  killed = str(tmp_path / "killed")
  shutil.copytree(os.path.join(one, "checkpoints"),
                  os.path.join(killed, "checkpoints"))
  procs = start("certify", *flags, f"--workdir={killed}", num_processes=2)
  tsv = os.path.join(killed, "certify.tsv")
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(tsv) and len(open(tsv).read().splitlines()) >= 8:
      break
    time.sleep(0.02)
  assert all(p.poll() is None for p in procs), "ended before the kill"
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate()
  assert 7 <= len(analysis.read_tsv(tsv)["idx"]) < 30
  res = launch("certify", *flags, f"--workdir={killed}", num_processes=2)
  assert "resuming certification at example" in res[0][1]
  _same_except_time(full, analysis.read_tsv(tsv))
  assert stored(single) == stored(killed)


def test_the_other_sigma_method_on_two_processes_equals_one(trained,
                                                            tmp_path):
  """Per-example sigma from the method the config does not default to (the
  test above covers the default), with the memory: 1 process vs 2 give the
  same certify.tsv, sigma.tsv and stored certificates."""
  one, _, _ = trained
  default = digits.get_config("small").certify.sigma_method
  other = "ascent" if default == "grid" else "grid"
  flags = [f"--config={DIGITS}", "--config.certify.examples_per_call=7",
           f"--config.certify.sigma_method={other}",
           f"--config.certify.checkpoint={one}/export"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  launch("certify", *flags, f"--workdir={single}")
  launch("certify", *flags, f"--workdir={multi}", num_processes=2)
  full = analysis.read_tsv(os.path.join(single, "certify.tsv"))
  assert len(full["idx"]) == 30 and np.any(full["sigma"] != 0.25)
  _same_except_time(full, analysis.read_tsv(os.path.join(multi,
                                                          "certify.tsv")))
  with open(os.path.join(single, "sigma.tsv")) as a, open(os.path.join(
      multi, "sigma.tsv")) as b:
    assert a.read() == b.read()
  with sqlite3.connect(os.path.join(single, "memory.sqlite")) as a, \
      sqlite3.connect(os.path.join(multi, "memory.sqlite")) as b:
    query = "SELECT example_id, pred, radius FROM certificates ORDER BY id"
    assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_dual_soundness_on_two_processes_equals_one(trained, tmp_path):
  """Dual randomized smoothing (a selector trained on the sigma table): 1
  process vs 2 give the same certify.tsv; a run cut after 10 rows resumes on
  two processes to the same file."""
  one, _, _ = trained
  selector = str(tmp_path / "selector")
  launch("train", f"--config={DIGITS}", f"--workdir={selector}",
         "--config.train.target=selector",
         f"--config.dual.targets={one}/export/sigma_table.tsv")
  flags = [f"--config={DIGITS}", "--config.certify.examples_per_call=7",
           "--config.certify.sigma_method=selector",
           "--config.certify.soundness=dual",
           f"--config.dual.selector={selector}",
           f"--config.certify.checkpoint={one}/export"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  launch("certify", *flags, f"--workdir={single}")
  launch("certify", *flags, f"--workdir={multi}", num_processes=2)
  full = analysis.read_tsv(os.path.join(single, "certify.tsv"))
  assert len(full["idx"]) == 30 and {"sigma_index", "radius_sigma",
                                     "radius_c"} <= set(full)
  _same_except_time(full, analysis.read_tsv(os.path.join(multi,
                                                          "certify.tsv")))
  _cut_after_10_rows_and_resume(flags, multi, full)


def test_a_process_with_no_examples_in_a_call(trained, tmp_path):
  """One example per call: process 0 gets none, process 1 the example."""
  one, _, _ = trained
  flags = [f"--config={DIGITS}", "--config.certify.examples_per_call=1",
           "--config.certify.max=48",
           f"--config.certify.checkpoint={one}/export"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  launch("certify", *flags, f"--workdir={single}")
  launch("certify", *flags, f"--workdir={multi}", num_processes=2)
  a = analysis.read_tsv(os.path.join(single, "certify.tsv"))
  assert len(a["idx"]) == 4
  _same_except_time(a, analysis.read_tsv(os.path.join(multi, "certify.tsv")))


def test_multihost_flags_need_each_other(tmp_path):
  res = subprocess.run(
      [sys.executable, "-m", "launch.certify", f"--config={DIGITS}",
       f"--workdir={tmp_path}", "--multihost", "--num_processes=2"],
      cwd=conftest.REPO, capture_output=True, text=True, timeout=300,
      env=conftest.subprocess_env(1))
  assert res.returncode == 1
  assert "coordinator_address, num_processes and process_id" in res.stderr
  res = subprocess.run(
      [sys.executable, "-m", "launch.certify", f"--config={DIGITS}",
       f"--workdir={tmp_path}", "--process_id=1"],
      cwd=conftest.REPO, capture_output=True, text=True, timeout=300,
      env=conftest.subprocess_env(1))
  assert res.returncode == 1 and "need --multihost" in res.stderr


@pytest.mark.parametrize("n", [0, 1, 5, 7, 30])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_process_slices_cover_every_example_once(n, count):
  from dds_jax import distributed
  slices = [distributed.split(n, i, count) for i in range(count)]
  got = np.concatenate([np.arange(n)[s] for s in slices])
  np.testing.assert_array_equal(got, np.arange(n))  # in order, none twice
  sizes = [len(range(n)[s]) for s in slices]
  assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_identities():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from dds_jax import distributed, sampler
  mesh = sampler.make_mesh()
  rows = (np.arange(6.0) / 7).astype(np.float32)
  assert distributed.gather_rows(rows) is rows
  assert distributed.broadcast({"a": rows})["a"] is rows
  assert distributed.max_over_processes(3) == 3
  sharding = NamedSharding(mesh, P("data"))
  assert distributed.local_row_slice(sharding, 6) == slice(0, 6)
  g = distributed.to_global(rows, sharding, 6)
  np.testing.assert_array_equal(distributed.host_rows(g), rows)
  key = distributed.replicate(jax.random.key(3), mesh)
  assert jax.random.key_data(key).tolist() == jax.random.key_data(
      jax.random.key(3)).tolist()


def test_main_job_on_two_processes(tmp_path):
  """launch.run (two trainings, three certifications, comparison) as two
  processes: process 0 writes every file and prints the table."""
  method = digits.get_config("small").certify.sigma_method
  res = launch("run", f"--config={DIGITS}", f"--workdir={tmp_path}",
               "--config.train.epochs=1", num_processes=2)
  assert "sigma + memory" in res[0][1]
  assert "Certified accuracy" not in res[1][1]
  for name in ("comparison.md", "comparison.json", "certified_accuracy.png",
               "fixed_fixed/certify.tsv", f"fixed_{method}/certify.tsv",
               f"ds_{method}/sigma.tsv", f"ds_{method}/memory.sqlite",
               "train_fixed/export/params.msgpack",
               "train_ds/export/sigma_table.tsv", "train_ds/metrics.jsonl"):
    assert os.path.exists(os.path.join(tmp_path, name)), name
  rows = analysis.read_tsv(os.path.join(tmp_path, f"ds_{method}",
                                        "certify.tsv"))
  assert len(rows["idx"]) == 30


def test_a_launcher_that_aborts_leaves_every_thread_traceback(tmp_path):
  """faulthandler is on in the launchers: SIGABRT (what a failed XLA check or
  a fatal Python error raises) prints the Python traceback of every thread,
  which crash_evidence finds for launch()'s report."""
  workdir = str(tmp_path / "w")
  (proc,) = start("train", f"--config={DIGITS}", f"--workdir={workdir}")
  deadline = time.time() + 300
  try:
    while (proc.poll() is None and time.time() < deadline and
           not os.path.exists(os.path.join(workdir, "train_config.json"))):
      time.sleep(0.02)
    assert proc.poll() is None, "training ended before the signal"
    proc.send_signal(signal.SIGABRT)
    _, stderr = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGABRT
  evidence = crash_evidence(stderr)
  assert evidence.startswith("Fatal Python error: Aborted"), stderr[-3000:]
  assert "(most recent call first)" in evidence
  assert "Extension modules" not in evidence
  # Our frames, unless faulthandler cut a deep stack at 100 frames ("...").
  assert ("dds_jax/train.py" in evidence or "\n  ..." in evidence), evidence


def test_a_run_that_dies_by_a_signal_reruns_once_showing_its_trace(
    tmp_path, monkeypatch, capsys):
  """launch() reruns a child that died by a signal once, and its warning (and
  stderr, for -rA) carries the child's faulthandler dump."""
  aborts = ("import faulthandler, os, signal\n"
            "faulthandler.enable()\n"
            "def crash_here():\n"
            "  os.kill(os.getpid(), signal.SIGABRT)\n"
            "crash_here()\n")
  runs = []

  def fake_start(module, *args, num_processes=1, devices=1):
    del module, args, num_processes, devices
    runs.append(1)
    code = aborts if len(runs) == 1 else "print('ok')"
    return [subprocess.Popen([sys.executable, "-c", code], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)]

  monkeypatch.setattr(sys.modules[__name__], "start", fake_start)
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "before.txt").write_text("kept")
  with pytest.warns(UserWarning, match="died by signal 6") as record:
    out = launch("certify", f"--workdir={workdir}")
  assert len(runs) == 2 and out[0][0] == 0 and out[0][1] == "ok\n"
  message = str(record[0].message)
  assert "Fatal Python error: Aborted" in message
  assert "crash_here" in message            # the dead child's own frames
  assert "crash_here" in capsys.readouterr().err
  assert (workdir / "before.txt").read_text() == "kept"


def test_inconsistent_process_arguments_are_config_errors():
  from dds_jax import distributed
  from dds_jax import errors
  with pytest.raises(errors.ConfigError, match="process_id=2"):
    distributed.initialize("localhost:1", num_processes=2, process_id=2)
  with pytest.raises(errors.ConfigError, match="or none of them"):
    distributed.initialize(None, num_processes=2, process_id=0)
