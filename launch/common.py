"""What every launcher shares: the --config/--workdir flags and clean errors."""

from __future__ import annotations

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


def run_main(fn: Callable[[], None]) -> None:
  """Runs fn; a dds_jax error becomes one line on stderr and exit status 1.

  With --multihost, jax.distributed is started first (see launch/multihost.py).
  """
  # orbax logs every checkpoint at INFO; keep the console for progress lines
  # unless --verbosity was given.
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  try:
    multihost.maybe_initialize()
    fn()
  except errors.DdsError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
