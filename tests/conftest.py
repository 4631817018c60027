"""Shared test helpers: repo paths and the data in ../shared when present."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CIFAR_ZIP = os.path.join(SHARED, "data", "cifar10", "cifar10-jpeg-q75.zip")

if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Launchers give themselves one XLA CPU device per core (mesh.host_devices=0);
# under `pytest -n 2` on 2 cores each child would take both. One device each,
# unless set outside; tests that want more set XLA_FLAGS (subprocess_env),
# which wins over this.
os.environ.setdefault("DDS_JAX_HOST_DEVICES", "1")


@pytest.fixture
def cifar_zip():
  if not os.path.exists(CIFAR_ZIP):
    pytest.skip("../shared/data/cifar10 is not present")
  return CIFAR_ZIP


def subprocess_env(num_devices: int = 1, **extra) -> dict:
  """Environment for a child Python that sees `num_devices` CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env
