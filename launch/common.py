"""What every launcher shares: the --config/--workdir flags and clean errors."""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import Callable

from absl import flags
from absl import logging
from ml_collections import config_flags

from dds_jax import errors
from launch import multihost

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A dds_jax config file, e.g. dds_jax/configs/digits.py "
    "(args after ':', overrides as --config.certify.n=1000).",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None,
                              "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_renamed_overrides() -> None:
  """`--config.sigma_opt.enabled=...` & co.: one line naming the new key."""
  from dds_jax.configs import common as config_common  # pylint: disable=g-import-not-at-top
  try:
    config_common.check_renamed_overrides(sys.argv[1:])
  except errors.ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


_check_renamed_overrides()

HOST_DEVICES_ENV = "DDS_JAX_HOST_DEVICES"
_HOST_DEVICES_FLAG = "xla_force_host_platform_device_count"


def set_host_device_count(config) -> int | None:
  """Sets how many XLA CPU devices JAX creates, before its backends start.

  Appends `--xla_force_host_platform_device_count=N` to XLA_FLAGS, where N is
  the environment variable DDS_JAX_HOST_DEVICES if set, else
  `config.mesh.host_devices`; 0 means one device per core this process may run
  on (os.sched_getaffinity), -1 leaves XLA's default (one CPU device). An
  XLA_FLAGS that already sets the count wins. The flag only concerns XLA's CPU
  platform: on GPU and TPU hosts it changes nothing. XLA reads XLA_FLAGS when
  the first backend starts (the first jax.devices() or computation, or
  jax.distributed.initialize), so importing jax before this is fine.

  Args:
    config: the launcher's config (reads `mesh.host_devices`).

  Returns:
    The device count set, or None when XLA_FLAGS was left alone.

  Raises:
    ConfigError: DDS_JAX_HOST_DEVICES is not an integer >= -1.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if _HOST_DEVICES_FLAG in xla_flags:
    return None
  env = os.environ.get(HOST_DEVICES_ENV, "").strip()
  if env:
    try:
      count = int(env)
    except ValueError:
      count = -2
    if count < -1:
      raise errors.ConfigError(
          f"{HOST_DEVICES_ENV}={env!r}: want an integer >= -1 (0 = one CPU "
          "device per core, -1 = XLA's default)")
  else:
    count = config.mesh.host_devices
  if count == -1:
    return None
  if count == 0:
    try:
      count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
      count = os.cpu_count() or 1
  os.environ["XLA_FLAGS"] = (
      f"{xla_flags} --{_HOST_DEVICES_FLAG}={count}".strip())
  return count


def run_main(fn: Callable[[], None]) -> None:
  """Runs fn; a dds_jax error becomes one line on stderr and exit status 1.

  The XLA CPU device count is set first (set_host_device_count), then with
  --multihost jax.distributed is started (see launch/multihost.py).
  faulthandler is on: a fatal signal (SIGSEGV, SIGABRT, ...) prints every
  thread's Python traceback to stderr.
  """
  faulthandler.enable(file=sys.stderr, all_threads=True)
  # orbax logs every checkpoint at INFO; keep the console for progress lines
  # unless --verbosity was given.
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  try:
    set_host_device_count(CONFIG.value)
    multihost.maybe_initialize()
    fn()
  except errors.DdsError as e:
    # One line for the user; the chained cause (a bug inside a model, an
    # orbax or sqlite error) goes to the log: shown with --verbosity=1.
    if e.__cause__ is not None:
      logging.info("cause of the error below:", exc_info=e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
