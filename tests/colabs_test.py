"""The Colab notebooks in colabs/: clean as committed, and they run.

Each notebook is executed with nbclient on its small setting (a cell
`SMALL = True` is injected after the cell tagged `parameters`, as papermill
does), in a temporary working directory, by a kernel running this
interpreter (a kernelspec written to a temporary JUPYTER_PATH, so a user's
own `python3` kernel cannot take over) with this checkout on PYTHONPATH.
One test per notebook, so that `pytest -n 2` runs them in parallel; each
takes about a minute on a 2-core CPU (`--durations=0` shows the times).
"""

import json
import os
import re
import sys

import pytest

from tests import conftest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = os.path.join(conftest.REPO, "colabs")
NOTEBOOKS = sorted(f for f in os.listdir(COLABS) if f.endswith(".ipynb"))
SMALL_SETTING = "SMALL = True  # injected by tests/colabs_test.py"
CELL_TIMEOUT_S = 600
# PNG figures each notebook must show at least, on its small setting.
MIN_FIGURES = {
    "01_quickstart.ipynb": 4,
    "02_sigma_optimization.ipynb": 5,
    "03_memory.ipynb": 3,
    "04_results.ipynb": 2,
}
COLAB_BADGE = ("https://colab.research.google.com/github/dds-jax/dds_jax/"
               "blob/main/colabs/{}")
INSTALL_LINE = ('subprocess.check_call([sys.executable, "-m", "pip", '
                '"install", "-q", "git+https://github.com/dds-jax/dds_jax"])')
MACHINE_PATH = re.compile(r"/(work|tmp|root|home)/")  # no machine paths


def _read(name):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


def _parameters_index(nb):
  tagged = [i for i, c in enumerate(nb.cells)
            if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
  return tagged[0]


def test_every_notebook_is_tested():
  assert sorted(MIN_FIGURES) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown"
  assert nb.cells[0].source.startswith("# ")
  assert COLAB_BADGE.format(name) in nb.cells[0].source
  assert INSTALL_LINE in nb.cells[1].source
  params = nb.cells[_parameters_index(nb)]
  assert re.search(r"^SMALL = (True|False)\b", params.source, re.M)
  for cell in nb.cells:
    assert not MACHINE_PATH.search(cell.source), cell.source
    if cell.cell_type == "code":
      assert not cell.outputs, "commit notebooks without outputs"
      assert cell.execution_count is None
  assert not MACHINE_PATH.search(json.dumps(nb.metadata))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A `python3` kernelspec for this interpreter, and the kernel's env."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "Python 3 (dds_jax tests)",
      "language": "python",
  }))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", conftest.REPO + os.pathsep +
                     os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline one
  monkeypatch.setenv("DDS_JAX_CACHE", str(tmp_path / "cache"))
  work = tmp_path / "work"
  work.mkdir()
  return work


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env):
  nb = _read(name)
  nb.cells.insert(_parameters_index(nb) + 1,
                  nbformat.v4.new_code_cell(SMALL_SETTING))
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(kernel_env)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                if c.cell_type == "code" for o in c.outputs)
  assert figures >= MIN_FIGURES[name], f"{name} showed {figures} figures"
