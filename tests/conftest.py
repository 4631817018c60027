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


def make_imagefolder(root: str, num_images: int, *, splits=("train", "val"),
                     num_classes: int = 4, sizes=(256, 500),
                     seed: int = 0) -> str:
  """An ImageNet-like ImageFolder: JPEGs of random sizes in [sizes], each
  split with num_images images in num_classes class folders. The pixels are
  smooth random fields whose mean colour depends on the class (learnable).

  Returns root.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  palette = rng.uniform(40, 215, (num_classes, 3))
  for split in splits:
    for c in range(num_classes):
      os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
    for i in range(num_images):
      c = i % num_classes
      h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
      small = rng.normal(0, 30, (h // 32 + 2, w // 32 + 2, 3)) + palette[c]
      img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
      img = img.resize((w, h), Image.BILINEAR)
      img.save(os.path.join(root, split, f"class{c}", f"{i:06d}.jpg"),
               quality=85)
  return root


def sigkill_after_checkpoint(args, workdir: str, min_step: int,
                             poll_s: float = 0.02) -> None:
  """Starts a training launcher and SIGKILLs it once its checkpoint directory
  holds a step >= min_step (asserting it was still running)."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  ckdir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(
        ckdir) else []
    if any(int(d) >= min_step for d in steps):
      break
    time.sleep(poll_s)
  assert proc.poll() is None, "training ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
