"""Errors the library raises for bad input, with messages meant for a person.

Launchers catch `DdsError` and print its message with a non-zero exit, so a
user never sees a traceback from deep inside JAX for a mistake of theirs.
"""


class DdsError(Exception):
  """Base class of every error dds_jax raises on purpose."""


class InputError(DdsError, ValueError):
  """Bad arrays or arguments: wrong shape or dtype, NaN, sigma <= 0, ..."""


class ConfigError(DdsError, ValueError):
  """A config that cannot work: unknown name, inconsistent values."""


class DataError(DdsError, OSError):
  """A dataset that cannot be found, read or prepared."""


class CheckpointError(DdsError, OSError):
  """A checkpoint that is missing, corrupted or does not fit the model."""
