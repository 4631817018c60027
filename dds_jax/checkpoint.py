"""Checkpoints: the only module that imports orbax.

A checkpoint step holds named items, each saved atomically by orbax's
`CheckpointManager` (a step directory appears only once complete):

  * `params`: the model's variables (params and BatchNorm statistics);
  * `opt_state`: the optimizer state;
  * `meta`: JSON with step, epoch, position in the epoch, seed, model name.

Certification restores `params` alone. Resume order (STYLE.md): the latest step
in this workdir, else an explicit init path, else fresh.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from dds_jax.errors import CheckpointError

CKPT_DIR = "checkpoints"


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores training state under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2,
               create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
    if not create and not os.path.isdir(self.directory):
      raise CheckpointError(
          f"no checkpoint in {workdir!r} (looked for {self.directory}); train "
          "first (python -m launch.train) or point --workdir at a trained run")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=create)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
    items = dict(params=ocp.args.StandardSave(params),
                 meta=ocp.args.JsonSave(meta))
    if jax.tree.leaves(opt_state):  # e.g. plain SGD has an empty state
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def read_meta(self, step: Optional[int] = None) -> dict[str, Any]:
    """The JSON metadata of a step (default: the latest), without arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint steps in {self.directory}")
    try:
      out = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is "
                            f"damaged: {type(e).__name__}: {e}") from None
    return dict(out["meta"])

  def restore(self, params_like, opt_state_like=None,
              step: Optional[int] = None) -> dict[str, Any]:
    """Restores `params` (and `opt_state` when a template is given) and `meta`.

    Args:
      params_like: a pytree with the expected structure, shapes and dtypes.
      opt_state_like: same for the optimizer state, or None to skip it.
      step: which step (default: the latest).

    Returns:
      dict with 'params', 'meta', 'step' and, if asked, 'opt_state'.

    Raises:
      CheckpointError: no checkpoint, or one that does not fit the model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint steps in {self.directory}")
    items = dict(params=ocp.args.StandardRestore(_abstract(params_like)),
                 meta=ocp.args.JsonRestore())
    want_opt = opt_state_like is not None and jax.tree.leaves(opt_state_like)
    if want_opt:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored "
          f"into this model (wrong model or config, or a damaged file): "
          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    result = {"params": out["params"], "meta": dict(out["meta"]), "step": step}
    if opt_state_like is not None:
      result["opt_state"] = out["opt_state"] if want_opt else opt_state_like
    return result

  def close(self) -> None:
    self._manager.close()
