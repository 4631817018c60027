"""A short kill soak (bench/kill_soak.py): a certification SIGKILLed mid-run
and resumed, three times, gives the uninterrupted run's files and store."""

import os
import shutil
import sqlite3

from bench import kill_soak
from tests import conftest  # pylint: disable=unused-import (sys.path)


def test_killed_and_resumed_certification_equals_the_reference(tmp_path):
  # One epoch is enough for resuming: the model's quality does not matter.
  result = kill_soak.soak(
      str(tmp_path), kills=3, examples_per_call=2,
      train_flags=["--config.train.epochs=1"],
      kill_points=["rows+2", "rows+4", "rows+6"], log=print)
  assert result["failures"] == []
  assert result["passed"]
  assert result["kills"] == 3 and result["mid_run"] == 3
  assert result["chains"] == 1 and result["attempts"] == 4
  assert result["resumed_messages"] == 3

  # The comparison is not vacuous: a changed radius and a lost certificate
  # are both found.
  ref, bad = str(tmp_path / "ref"), str(tmp_path / "bad")
  shutil.copytree(ref, bad)
  tsv = os.path.join(bad, "certify.tsv")
  with open(tsv) as f:
    lines = f.read().splitlines(keepends=True)
  cols = lines[1].split("\t")
  cols[3] = "0.123"  # radius
  lines[1] = "\t".join(cols)
  with open(tsv, "w") as f:
    f.writelines(lines)
  with sqlite3.connect(os.path.join(bad, "memory.sqlite")) as db:
    db.execute("DELETE FROM certificates WHERE id = 2")
  db.close()
  diffs = kill_soak.compare(ref, bad)
  assert any("row 0" in d and "radius" in d for d in diffs), diffs
  assert any("lost" in d for d in diffs), diffs
