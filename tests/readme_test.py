"""The README's two commands: the test one is exactly what CI runs."""

import os
import re

from tests import conftest


def _commands():
  text = open(os.path.join(conftest.REPO, "README.md")).read()
  return re.findall(r"```bash\n(.*?)\n```", text, re.S)[:2]


def test_readme_starts_with_run_and_test_commands():
  run, test = _commands()
  assert "launch.run" in run and "digits.py" in run
  assert "pytest" in test
  for cmd in (run, test):
    assert cmd.startswith("python3 -m venv .venv")
    assert "-r requirements.lock" in cmd


def test_ci_runs_the_readme_test_command():
  ci = open(os.path.join(conftest.REPO, ".ci", "run")).read()
  _, test = _commands()
  assert test in ci.splitlines()


def test_configs_module_docstrings_name_their_commands():
  for name in ("digits", "cifar10", "imagenet"):
    path = os.path.join(conftest.REPO, "dds_jax", "configs", f"{name}.py")
    assert f"--config=dds_jax/configs/{name}.py" in open(path).read()


def test_cifar10_variants_validate():
  from dds_jax.configs import cifar10, common
  for method in ("gaussian", "smoothadv", "macer"):
    for sigma in (0.12, 0.25, 0.5, 1.0):
      for ds in ("", ",ds"):
        c = cifar10.get_config(f"data=x.zip,method={method},sigma={sigma}{ds}")
        common.validate(c)
        assert c.train.method == method and c.noise.sigma == sigma
        assert c.train.ds.enabled == bool(ds) == c.memory.enabled
