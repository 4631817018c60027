"""Where a result came from: commit, package versions, devices, config."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import jax

PACKAGES = ("dds_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
            "numpy", "scipy", "tensorflow-datasets", "ml_collections")


def git_commit() -> str:
  """The commit of the dds_jax checkout (with '+dirty' if modified)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, text=True,
                            capture_output=True, timeout=10, check=True
                            ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=here, text=True, capture_output=True,
                           timeout=10).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def package_versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {"platform": devices[0].platform,
          "device_kind": devices[0].device_kind,
          "num_devices": len(devices),
          "num_processes": jax.process_count(),
          "cpu_count": os.cpu_count()}


def collect(config=None) -> dict[str, Any]:
  """Everything above, plus the config as JSON."""
  out = {"commit": git_commit(), "packages": package_versions(),
         "devices": device_info()}
  if config is not None:
    out["config"] = config.to_dict()
  return out
