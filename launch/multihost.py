"""The --multihost flags every launcher takes, and starting the runtime.

On Cloud TPU, Slurm and Open MPI `--multihost` alone is enough: JAX finds the
coordinator, the process count and this process's id. Elsewhere (several
processes on one machine, a hand-made cluster) give all three:

  python -m launch.certify --config=... --workdir=... --multihost \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

Every process runs the same command; process 0 writes the result files.
"""

from __future__ import annotations

from absl import flags

from dds_jax import distributed

MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Run as one process of a multi-host job "
    "(jax.distributed.initialize); every host runs the same command.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: detected "
    "on Cloud TPU, Slurm, Open MPI).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: detected).")


def maybe_initialize() -> None:
  """Starts jax.distributed when --multihost is given; checks the flags."""
  explicit = (COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  if not MULTIHOST.value:
    if any(v is not None for v in explicit):
      raise distributed.ConfigError(
          "--coordinator_address/--num_processes/--process_id need "
          "--multihost")
    return
  distributed.initialize(*explicit)
