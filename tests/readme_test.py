"""The README's two commands (the test one is exactly what CI runs), and
the user docs kept in step with the code: paths, config keys, no internal
references."""

import itertools
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
        assert c.train.ds.enabled == bool(ds) == (
            c.certify.soundness == "memory")
        assert c.certify.sigma_method == ("ascent" if ds else "fixed")


DOCS = ("README.md", "bench/README.md", "docs/method.md")
CONFIG_GROUPS = ("data", "model", "noise", "train", "certify", "sigma_opt",
                 "memory", "mesh", "ckpt")
FILE_SUFFIXES = ("tsv", "sqlite", "json", "jsonl", "png", "md", "py",
                 "msgpack")


def _read(name):
  return open(os.path.join(conftest.REPO, name)).read()


def test_docs_cite_no_internal_files():
  for name in DOCS:
    text = _read(name)
    for word in ("PAPER.md", "STYLE.md", "../shared"):
      assert word not in text, f"{name} mentions {word}"


def test_readme_paths_exist():
  text = _read("README.md")
  for path in re.findall(r"`((?:dds_jax|launch|bench|docs|colabs|tests)/"
                         r"[^`\s]*)`", text):
    m = re.search(r"\{([^}]*)\}", path)
    names = ([path[:m.start()] + v + path[m.end():]
              for v in m.group(1).split(",")] if m else [path])
    for name in names:
      assert os.path.exists(os.path.join(conftest.REPO, name)), name


def test_doc_config_keys_exist():
  from dds_jax.configs import common
  base = common.base_config()
  pattern = (r"`(?:--config\.)?((?:" + "|".join(CONFIG_GROUPS) +
             r")\.[a-z0-9_.]*[a-z0-9_])")
  keys = set(itertools.chain.from_iterable(
      re.findall(pattern, _read(name)) for name in DOCS))
  keys = {k for k in keys if k.rsplit(".", 1)[1] not in FILE_SUFFIXES}
  assert "certify.sigma_method" in keys
  for key in keys:
    if key in common.RENAMED_KEYS:
      continue
    node = base
    for part in key.split("."):
      assert part in node, f"the docs name config key {key}, not in base_config"
      node = node[part]


def test_where_things_are_names_the_memory_call():
  from dds_jax import evaluate
  from dds_jax.memory import MemoryStore
  text = _read("README.md")
  table = text[text.index("## Where things are"):]
  row = next(line for line in table.splitlines() if "_memory_rule" in line)
  for name in ("dds_jax.evaluate._memory_rule", "certify_dataset",
               "MemoryStore.insert_many"):
    assert name in row
  assert callable(evaluate._memory_rule) and callable(MemoryStore.insert_many)
  assert "dds_jax/validate.py" in table
