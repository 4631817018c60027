"""Checkpoints: the only module that imports orbax.

A checkpoint step holds named items, each saved atomically by orbax's
`CheckpointManager` (a step directory appears only once complete):

  * `params`: the model's variables (params and BatchNorm statistics);
  * `opt_state`: the optimizer state;
  * `sigma_table`: the per-sample sigma of every training example;
  * `meta`: JSON with step, epoch, position in the epoch, seed, model name;
  * `data_iter` (data.pipeline=grain): the input pipeline's grain iterator
    state (JSON), so a resume continues at the next batch without reading the
    ones before it.

`export_params` writes a parameters-only copy (float32 or bfloat16, no
optimizer state) as one msgpack file for certification elsewhere.

Certification restores `params` alone (`restore_params`). Resume order (as in
big_vision's trainers): the latest step in this workdir, else an explicit init
path, else fresh.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dds_jax import distributed
from dds_jax import models
from dds_jax.errors import CheckpointError, ConfigError

CKPT_DIR = "checkpoints"


def _abstract(tree, sharding=None):
  """Shapes, dtypes and shardings to restore into.

  sharding: put every array there (e.g. replicated over the current mesh), so
  a checkpoint written on other devices or hosts restores here; default: the
  template's own sharding where it has one.
  """
  def one(leaf):
    out = ocp.utils.to_shape_dtype_struct(leaf)
    if sharding is not None:
      out = jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
    return out
  return jax.tree.map(one, tree)


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

  def save(self, step: int, params, opt_state, meta: dict[str, Any],
           sigma_table=None, data_state: Optional[dict[str, Any]] = None
           ) -> None:
    items = dict(params=ocp.args.StandardSave(params),
                 meta=ocp.args.JsonSave(meta))
    if data_state is not None:
      items["data_iter"] = ocp.args.JsonSave(data_state)
    if sigma_table is not None:
      items["sigma_table"] = ocp.args.StandardSave({"sigma": sigma_table})
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
                            f"damaged: {type(e).__name__}: {e}") from e
    return dict(out["meta"])

  def read_data_state(self, step: Optional[int] = None
                      ) -> Optional[dict[str, Any]]:
    """The input pipeline's state saved with a step, or None if it has none."""
    step = self.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(
        self.directory, str(step), "data_iter")):
      return None
    out = self._manager.restore(
        step, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore()))
    return dict(out["data_iter"])

  def restore(self, params_like, opt_state_like=None,
              step: Optional[int] = None,
              sigma_table_like=None, sharding=None) -> dict[str, Any]:
    """Restores `params` (and `opt_state` when a template is given) and `meta`.

    Args:
      params_like: a pytree with the expected structure, shapes and dtypes.
      opt_state_like: same for the optimizer state, or None to skip it.
      step: which step (default: the latest).
      sigma_table_like: template of the sigma table, or None to skip it.
      sharding: where to put every restored array (default: the templates'
        shardings).

    Returns:
      dict with 'params', 'meta', 'step' and, if asked, 'opt_state'.

    Raises:
      CheckpointError: no checkpoint, or one that does not fit the model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint steps in {self.directory}")
    items = dict(params=ocp.args.StandardRestore(_abstract(params_like,
                                                           sharding)),
                 meta=ocp.args.JsonRestore())
    if sigma_table_like is not None:
      meta = self.read_meta(step)
      stored = meta.get("num_train")
      if stored is not None and stored != len(sigma_table_like):
        raise CheckpointError(
            f"the checkpoint's sigma table has {stored} entries but the "
            f"training set has {len(sigma_table_like)} examples: another "
            f"dataset or split? ({self.directory})")
      items["sigma_table"] = ocp.args.StandardRestore(
          _abstract({"sigma": sigma_table_like}, sharding))
    want_opt = opt_state_like is not None and jax.tree.leaves(opt_state_like)
    if want_opt:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like,
                                                              sharding))
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored "
          f"into this model (wrong model or config, or a damaged file): "
          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    result = {"params": out["params"], "meta": dict(out["meta"]), "step": step}
    if opt_state_like is not None:
      result["opt_state"] = out["opt_state"] if want_opt else opt_state_like
    if sigma_table_like is not None:
      result["sigma_table"] = out["sigma_table"]["sigma"]
    return result

  def close(self) -> None:
    self._manager.close()


EXPORT_PARAMS = "params.msgpack"
EXPORT_META = "export.json"


def export_params(directory: str, params, meta: dict[str, Any],
                  dtype: str = "float32") -> str:
  """Writes the model's variables alone (msgpack, no pickle), atomically.

  Args:
    directory: created if missing; receives params.msgpack and export.json.
    params: the variables (params and BatchNorm statistics).
    meta: JSON metadata (model name, step, ...); dtype is added.
    dtype: 'float32' or 'bfloat16' (half the size; restored as float32).

  Returns:
    The path of params.msgpack.
  """
  if dtype not in ("float32", "bfloat16"):
    raise CheckpointError(f"export dtype must be float32 or bfloat16; got "
                          f"{dtype!r}")
  os.makedirs(directory, exist_ok=True)
  cast = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, dtype)),
                      jax.device_get(params))
  path = os.path.join(directory, EXPORT_PARAMS)
  for name, data in ((path, flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, cast))),
                     (os.path.join(directory, EXPORT_META),
                      json.dumps({**meta, "dtype": dtype}, indent=2).encode())):
    tmp = name + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, name)
  return path


def load_exported(directory: str, params_like) -> tuple[Any, dict[str, Any]]:
  """Reads an `export_params` directory into float32 variables like the template."""
  path = os.path.join(directory, EXPORT_PARAMS)
  if not os.path.exists(path):
    raise CheckpointError(f"no exported parameters at {path}")
  try:
    with open(os.path.join(directory, EXPORT_META)) as f:
      meta = json.load(f)
    with open(path, "rb") as f:
      tree = flax.serialization.msgpack_restore(f.read())
    params = flax.serialization.from_state_dict(
        jax.tree.map(lambda a: np.zeros(a.shape, np.float32), params_like),
        tree)
    params = jax.tree.map(lambda a, t: jnp.asarray(a, jnp.float32).reshape(
        t.shape) if np.shape(a) == tuple(t.shape) else _bad_shape(a, t),
                          params, params_like)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"exported parameters at {directory} cannot be read "
                          f"into this model: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from e
  return params, meta


def _bad_shape(a, t):
  raise CheckpointError(f"exported array of shape {np.shape(a)} does not fit "
                        f"the model's {tuple(t.shape)}")


def restore_params(config, workdir: str, image_shape, mesh=None):
  """The model of a dds_jax config and its trained variables.

  From the parameters-only export at `config.certify.checkpoint` when set,
  else from `<workdir>/checkpoints` (replicated over `mesh`, default: the
  certification mesh of `config.mesh.num_devices`).

  Returns:
    (models.ModelBundle, variables).
  """
  bundle, params, _ = restore_params_and_meta(config, workdir, image_shape,
                                              mesh)
  return bundle, params


def restore_params_and_meta(config, workdir: str, image_shape, mesh=None):
  """`restore_params`, and the metadata saved with the checkpoint or export.

  Where the metadata records the images' shape (every model trained since it
  does), a checkpoint trained on other images is refused.

  Returns:
    (models.ModelBundle, variables, metadata dict).
  """
  bundle = models.build_from_config(config, image_shape)
  template = jax.eval_shape(bundle.init, jax.random.key(0))
  if config.certify.checkpoint:
    params, meta = load_exported(config.certify.checkpoint, template)
  else:
    ckpt = Checkpointer(workdir, create=False)
    meta = ckpt.read_meta()
    params = None
  if meta.get("model") != config.model.name:
    where = config.certify.checkpoint or workdir
    raise ConfigError(f"the checkpoint in {where} is of model "
                      f"{meta.get('model')!r}, not {config.model.name!r}")
  shape = meta.get("image_shape")
  if shape is not None and tuple(shape) != tuple(image_shape):
    where = config.certify.checkpoint or workdir
    raise ConfigError(f"the checkpoint in {where} was trained on images of "
                      f"shape {tuple(shape)}, not {tuple(image_shape)}")
  if params is None:
    mesh = mesh or distributed.make_mesh(config.mesh.num_devices or None)
    params = ckpt.restore(template, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))["params"]
    ckpt.close()
  return bundle, params, meta
