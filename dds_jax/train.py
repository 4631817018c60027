"""Training with per-sample sigma: Gaussian augmentation, SmoothAdv, MACER.

`train_and_evaluate(config, workdir)` is what `launch.train` runs. Methods
(`train.method`):

  * gaussian (Cohen et al.): cross-entropy of f(x + s_i e) over
    `train.num_noise` copies;
  * smoothadv (Salman et al.): PGD-L2 on the soft smoothed classifier
    (`dds_jax.losses.smoothadv_attack`, BatchNorm in inference mode during the
    attack as in their code, eps ramped over `smoothadv.warmup_epochs`), then
    cross-entropy on the noisy copies of x_adv;
  * macer (Zhai et al.): `dds_jax.losses.macer_loss` over `num_noise` copies,
    MACER's own hinge or the DDRS script's (`macer.variant`).

Data-dependent sigma (`train.ds.enabled`): every training example keeps its own
s_i in a sigma table (initialised to noise.sigma, kept across epochs, saved in
the checkpoint). From `ds.start_epoch` on, each mini-batch first takes
`ds.steps` ascent steps with `ds.num_samples` draws on its s_i
(`dds_jax.sigma_opt.ascent`, the one implementation, parameters frozen), which
are written back, then the method's loss uses noise N(0, s_i^2 I). BatchNorm
during the ascent (`ds.bn_mode`): 'eval' (default: running statistics, each
example's proxy depends on its own sigma only) or 'train' (statistics of the
noisy batch, as the official scripts leave the model in train mode; their
updates are discarded here).

optax SGD with momentum and coupled weight decay, step or cosine schedules,
random crop and flip on device, optional bf16 compute (`train.dtype`), batches
sharded over the `data` mesh axis. Orbax checkpoints (params, BatchNorm
statistics, optimizer state, sigma table, step/epoch/batch position) every
`ckpt.every_steps` steps and at the end; a restart continues from the latest
step. Augmentation, noise and ascent noise of an example are keyed by (seed,
example id, epoch) and the data order by (seed, epoch), so a resumed run gives
the same parameters and sigma table as an uninterrupted one. At the end a
parameters-only export is written to `<workdir>/export` for certification
elsewhere (`certify.checkpoint`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dds_jax import analysis
from dds_jax import checkpoint as ckpt_lib
from dds_jax import data as data_lib
from dds_jax.data import pipeline as pipeline_lib
from dds_jax import distributed
from dds_jax import dual
from dds_jax import models
from dds_jax import noise as noise_lib
from dds_jax import progress as progress_lib
from dds_jax import losses
from dds_jax import sigma_opt
from dds_jax.configs import common
from dds_jax.errors import ConfigError

EXPORT_DIR = "export"  # parameters-only export, written at the end
SIGMA_TABLE = "sigma_table.tsv"  # with train.ds: the per-sample sigma table


def make_schedule(tc: ml_collections.ConfigDict, steps_per_epoch: int):
  """Learning rate per step: constant, step decay or cosine, optional warmup."""
  total = tc.epochs * steps_per_epoch
  warmup = tc.warmup_epochs * steps_per_epoch
  if tc.schedule == "constant":
    main = optax.constant_schedule(tc.lr)
  elif tc.schedule == "step":
    bounds = {e * steps_per_epoch: tc.step_factor
              for e in range(tc.step_epochs, tc.epochs, tc.step_epochs)}
    main = optax.piecewise_constant_schedule(tc.lr, bounds)
  elif tc.schedule == "cosine":
    main = optax.cosine_decay_schedule(tc.lr, max(total - warmup, 1))
  else:
    raise ConfigError(f"unknown schedule {tc.schedule!r}")
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, tc.lr, warmup), main], [warmup])
  return main


def make_optimizer(tc: ml_collections.ConfigDict, steps_per_epoch: int):
  """SGD with momentum and PyTorch-style (coupled) weight decay."""
  return optax.chain(
      optax.add_decayed_weights(tc.weight_decay),
      optax.sgd(make_schedule(tc, steps_per_epoch), momentum=tc.momentum,
                nesterov=tc.nesterov))


def augment(key: jax.Array, image: jax.Array, crop_padding: int,
            flip: bool) -> jax.Array:
  """Random crop with zero padding and random horizontal flip of one image."""
  k_crop, k_flip = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
  if flip:
    image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
  return image


def example_keys(key: jax.Array, purpose: noise_lib.Purpose,
                 id_words: jax.Array, block) -> jax.Array:
  """One key per example of a stream for this epoch (the block)."""
  return jax.vmap(lambda w: noise_lib.block_key(key, purpose, w, block))(
      id_words)


def make_train_step(bundle: models.ModelBundle, tx,
                    config: ml_collections.ConfigDict, ds_active: bool):
  """The jitted training step for `config.train.method`.

  (variables, opt_state, sigma_table, batch, key, epoch, eps_adv)
    -> (variables, opt_state, sigma_table, metrics)

  The step is the tested losses of `dds_jax.losses` in order:
    1. augmentation (keys: Purpose.TRAIN, per example id and epoch);
    2. per-sample sigma: with `ds_active`, the batch's entries of the sigma
       table take `train.ds.steps` ascent steps on the radius proxy
       (`dds_jax.sigma_opt.ascent`, Purpose.TRAIN_SIGMA, the parameters
       frozen) and are written back;
    3. SmoothAdv: `losses.smoothadv_attack` (Purpose.ATTACK per example id,
       BatchNorm in inference mode as in Salman et al.'s code);
    4. the loss on noisy copies with noise N(0, s_i^2 I) (the TRAIN keys):
       `losses.gaussian_augmentation_loss` (gaussian, smoothadv) or
       `losses.macer_loss` on `losses.noise_like` draws (macer).
  """
  tc, dc = config.train, config.train.ds
  kind = config.noise.kind
  m = tc.num_noise
  purpose = noise_lib.Purpose

  def step(variables, opt_state, table, batch, key, epoch, eps_adv):
    words, pos, labels = batch["id_words"], batch["pos"], batch["labels"]
    mask = batch["mask"].astype(jnp.float32)
    keys = example_keys(key, purpose.TRAIN, words, epoch)
    k_aug, k_noise = jax.vmap(jax.random.split, out_axes=1)(keys)
    x = jax.vmap(lambda k, im: augment(k, im, tc.crop_padding, tc.flip))(
        k_aug, batch["images"])
    sigma = table[pos]
    if ds_active:
      if dc.bn_mode == "train":
        forward = lambda im: bundle.apply_train(variables, im)[0]
      else:
        forward = lambda im: bundle.apply_fn(variables, im)
      new_sigma, _, _, _ = sigma_opt.ascent(
          forward, x, sigma, key, words, steps=dc.steps, lr=dc.lr,
          num_samples=dc.num_samples, clip=tuple(dc.clip),
          sigma_min=dc.sigma_min, kind=kind, coupled=dc.bn_mode == "train",
          block_offset=epoch * dc.steps, purpose=purpose.TRAIN_SIGMA)
      sigma = jnp.where(batch["mask"], jax.lax.stop_gradient(new_sigma), sigma)
      table = table.at[pos].set(jnp.where(batch["mask"], sigma, table[pos]))
    if tc.method == "smoothadv":
      x = losses.smoothadv_attack(
          lambda im: bundle.apply_fn(variables, im), x, labels, sigma,
          example_keys(key, purpose.ATTACK, words, epoch), eps=eps_adv,
          steps=tc.smoothadv.steps, num_samples=m, kind=kind)

    def loss_fn(params):
      state = {}

      def forward(images):  # train mode; keeps the new BatchNorm statistics
        logits, state["new"] = bundle.apply_train(
            {**variables, "params": params}, images)
        return logits

      if tc.method == "macer":
        mc = tc.macer
        noise = losses.noise_like(k_noise, x, sigma, m, kind)
        logits = forward((x[:, None] + noise).reshape(
            (-1,) + x.shape[1:])).astype(jnp.float32).reshape(
                x.shape[0], m, -1)
        loss, _ = losses.macer_loss(logits, labels, sigma, lbd=mc.lbd,
                                    gamma=mc.gamma, beta=mc.beta,
                                    variant=mc.variant, mask=mask)
      else:  # gaussian, smoothadv: cross-entropy over all noisy copies
        loss, logits = losses.gaussian_augmentation_loss(
            forward, x, labels, sigma, k_noise, num_samples=m, kind=kind,
            mask=mask)
      return loss, (logits, state["new"])

    (loss, (logits, new_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    variables = {**variables, **new_state, "params": params}
    pred = jnp.argmax(jnp.mean(jax.nn.softmax(logits, -1), axis=1), -1)
    metrics = {"loss": loss * jnp.sum(mask),
               "correct": jnp.sum((pred == labels) * mask),
               "count": jnp.sum(mask)}
    return variables, opt_state, table, metrics

  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(bundle: models.ModelBundle, noise_kind: str):
  """Clean and one-draw noisy correct counts of a batch."""

  def step(variables, batch, key, sigma):
    keys = example_keys(key, noise_lib.Purpose.TRAIN_EVAL, batch["id_words"],
                        0)
    x = batch["images"]
    noisy = x + jax.vmap(lambda k, im: noise_lib.draw(k, im.shape, sigma,
                                                      noise_kind))(keys, x)
    mask = batch["mask"]
    clean_ok = (jnp.argmax(bundle.apply_fn(variables, x), -1)
                == batch["labels"]) & mask
    noisy_ok = (jnp.argmax(bundle.apply_fn(variables, noisy), -1)
                == batch["labels"]) & mask
    return jnp.sum(clean_ok), jnp.sum(noisy_ok)

  return jax.jit(step)


def train_devices(config: ml_collections.ConfigDict) -> int:
  """Devices of the training mesh: `mesh.train_devices`, or when 0 (auto) 1
  on a CPU-only host (two XLA CPU devices trained the digits CNN at 0.79x of
  one) and all devices otherwise."""
  if config.mesh.train_devices:
    return int(config.mesh.train_devices)
  if jax.default_backend() == "cpu" and jax.process_count() == 1:
    return 1
  return jax.device_count()


def _summary_writer(workdir: str):
  """A TensorBoard writer when one is installed (tensorboardX), else None."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def write_sigma_table(path: str, example_ids, table) -> None:
  """Writes the per-sample sigma table as a TSV (idx = example id, sigma)."""
  lines = ["idx\tsigma"] + [f"{int(i)}\t{float(v)!r}"
                             for i, v in zip(example_ids, table)]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)


def sigma_stats(table: np.ndarray, bins: int = 20) -> dict[str, Any]:
  """Mean, min, max and a histogram of a sigma table (for metrics.jsonl)."""
  counts, edges = np.histogram(table, bins=bins)
  return {"mean": float(table.mean()), "min": float(table.min()),
          "max": float(table.max()), "std": float(table.std()),
          "hist_counts": counts.tolist(),
          "hist_edges": [float(e) for e in edges]}


def _train_batches(config, ckpt, train_ds, epoch, first, rows):
  """One epoch's batches from batch `first` on (this process's rows).

  data.pipeline=memory: `iterate_batches`. grain: `data.pipeline.TrainBatches`,
  restored from the checkpoint's iterator state when resuming mid-epoch.
  """
  tc, dc = config.train, config.data
  if not train_ds.lazy:
    return data_lib.iterate_batches(
        train_ds, tc.batch_size, shuffle_key_seed=config.seed, epoch=epoch,
        drop_remainder=True, rows=rows, start_batch=first)
  state = None
  if first:
    state = ckpt.read_data_state()
    if state is None:  # a checkpoint without one: start at the batch anyway
      state = {"epoch": epoch, "grain": {"next_index": first}}
  batches = pipeline_lib.TrainBatches(
      train_ds, tc.batch_size, seed=config.seed, epoch=epoch, rows=rows,
      state=state, threads=dc.threads, prefetch=dc.prefetch)
  if batches.next_batch != first:
    raise ConfigError(
        f"the checkpoint's data iterator is at batch {batches.next_batch} of "
        f"epoch {epoch}, its metadata at batch {first}: a damaged checkpoint")
  if first and distributed.is_main():
    print(f"data: continuing epoch {epoch} at batch {first} from the data "
          "iterator state (the batches before it are not read)", flush=True)
  return batches


def _restore_or_start(config, workdir, ckpt, variables, opt_state, table,
                      mesh):
  """The latest checkpoint of workdir, else the fresh state given.

  Returns:
    (variables, opt_state, sigma table, (step, epoch, batch in the epoch)).
  """
  if ckpt.latest_step() is None:
    return variables, opt_state, table, (0, 0, 0)
  meta = ckpt.read_meta()
  for name, want in (("model", config.model.name),
                     ("method", config.train.method),
                     ("data", config.data.name)):
    if meta.get(name) != want:
      raise ConfigError(f"{workdir} holds a checkpoint with {name} "
                        f"{meta.get(name)!r}, not {want!r}; use another "
                        "--workdir")
  restored = ckpt.restore(variables, opt_state, sigma_table_like=table,
                          sharding=NamedSharding(mesh, P()))
  position = (meta["step"], meta["epoch"], meta["batch"])
  if distributed.is_main():
    print(f"resuming from step {position[0]} (epoch {position[1]}, batch "
          f"{position[2]})", flush=True)
  return (restored["params"], restored["opt_state"],
          np.asarray(restored["sigma_table"]), position)


def _epoch_metrics(config, epoch, step, ds_active, sums, table, eps_adv,
                   test_accuracy, noisy_test_accuracy, elapsed):
  """One line of metrics.jsonl."""
  tc = config.train
  sums = jax.device_get(sums) if sums is not None else None
  count = float(sums["count"]) if sums else 0.0
  return {"epoch": epoch + 1, "step": step, "method": tc.method,
          "ds_active": ds_active,
          "train_loss": float(sums["loss"]) / count if count else None,
          "train_accuracy": float(sums["correct"]) / count if count else None,
          "test_accuracy": test_accuracy,
          "noisy_test_accuracy": noisy_test_accuracy,
          "sigma0": float(config.noise.sigma),
          "sigma_table": sigma_stats(np.asarray(table)),
          "smoothadv_eps": (float(eps_adv) if tc.method == "smoothadv"
                            else None),
          "epoch_time_s": elapsed,
          "images_per_s": count / max(elapsed, 1e-9)}


def _log_epoch(last, config, metrics_path, writer, table) -> None:
  """metrics.jsonl, TensorBoard (when installed) and the console line."""
  with open(metrics_path, "a") as f:
    f.write(json.dumps(last) + "\n")
  if writer is not None:
    for name in ("train_loss", "train_accuracy", "test_accuracy",
                 "noisy_test_accuracy", "images_per_s"):
      if last[name] is not None:
        writer.add_scalar(name, last[name], last["step"])
    writer.add_histogram("sigma_table", np.asarray(table), last["step"])
    writer.flush()
  st = last["sigma_table"]
  loss, acc = last["train_loss"], last["train_accuracy"]
  print(f"epoch {last['epoch']}/{config.train.epochs}: loss "
        f"{loss if loss is None else f'{loss:.4f}'} train acc "
        f"{acc if acc is None else f'{acc:.3f}'} test acc "
        f"{last['test_accuracy']:.3f} noisy test acc "
        f"{last['noisy_test_accuracy']:.3f} sigma {st['mean']:.3f} "
        f"[{st['min']:.3f}, {st['max']:.3f}] ({last['epoch_time_s']:.1f} s)",
        flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (or resumes) and writes checkpoints and metrics under workdir.

  Returns:
    the last epoch's metrics.
  """
  common.validate(config)
  selector = config.train.target == "selector"
  if selector:  # dual RS's sigma selector: its own model, labels and noise
    config = dual.selector_config(config)
  tc = config.train
  os.makedirs(workdir, exist_ok=True)

  # --- Data, mesh, model and optimizer; resume from the latest checkpoint. --
  train_ds = data_lib.load_split(config, config.data.train_split)
  if selector:
    train_ds = dual.relabel(train_ds, analysis.read_sigma_by_id(config.dual.targets),
                            config.dual.sigmas, config.dual.targets)
    # The test images have no target sigma: the per-epoch accuracy of the
    # selector is measured on the first training images.
    test_ds = train_ds
  else:
    test_ds = data_lib.load_split(config, config.data.test_split)
  data_lib.check_fits(config, train_ds)
  mesh = distributed.make_mesh(train_devices(config))
  ndev = mesh.shape[distributed.DATA_AXIS]
  main = distributed.is_main()  # writes metrics and the export
  if tc.batch_size % ndev:
    raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible "
                      f"by the {ndev} devices")
  steps_per_epoch = len(train_ds) // tc.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the "
                      f"{len(train_ds)} training examples")
  total_steps = tc.epochs * steps_per_epoch
  # Position of each example id in the training split: the sigma table's row.
  order = np.argsort(train_ds.example_ids)
  sorted_ids = train_ds.example_ids[order]

  def positions(ids):
    return order[np.clip(np.searchsorted(sorted_ids, ids), 0, len(order) - 1)]

  bundle = models.build_from_config(config, train_ds.image_shape,
                                    training=True)
  key = jax.random.key(config.seed)
  variables = bundle.init(noise_lib.purpose_key(key, noise_lib.Purpose.INIT))
  tx = make_optimizer(tc, steps_per_epoch)
  opt_state = tx.init(variables["params"])
  table = np.full(len(train_ds), config.noise.sigma, np.float32)

  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.ckpt.max_to_keep)
  variables, opt_state, table, (step, start_epoch, start_batch) = (
      _restore_or_start(config, workdir, ckpt, variables, opt_state, table,
                        mesh))
  if main:
    with open(os.path.join(workdir, "train_config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  # --- Placement: replicated state, batches split over `data`. ------------
  batch_sharding = NamedSharding(mesh, P(distributed.DATA_AXIS))
  # Parameters, optimizer state and the sigma table are replicated on every
  # device (of every process); batches are split over the `data` axis.
  variables, opt_state, table, key = distributed.replicate(
      (variables, opt_state, table, key), mesh)
  train_steps = {}
  eval_step = make_eval_step(bundle, config.noise.kind)
  sigma = jnp.float32(config.noise.sigma)
  eval_ds = test_ds.take(np.arange(min(tc.eval_examples, len(test_ds))))
  eval_bs = min(tc.batch_size, 500)
  eval_bs = max(ndev, eval_bs - eval_bs % ndev)
  writer = _summary_writer(workdir) if main else None

  # Each process reads only its rows of every global batch.
  train_rows = distributed.local_row_slice(batch_sharding, tc.batch_size)
  eval_rows = distributed.local_row_slice(batch_sharding, eval_bs)

  def put(batch, n):
    """The global batch of n rows from this process's rows of it."""
    return {k: distributed.to_global(v, batch_sharding, n)
            for k, v in batch.items()}

  # What a checkpoint or export is of: checked when it is restored.
  meta = {"model": config.model.name, "method": tc.method,
          "data": config.data.name, "image_shape": list(train_ds.image_shape),
          "num_classes": int(config.model.num_classes), "target": tc.target}
  if selector:
    meta.update(sigmas=[float(v) for v in config.dual.sigmas],
                selector_sigma=float(config.noise.sigma))

  def save(epoch, batch_idx, batches=None):
    ckpt.save(step, variables, opt_state,
              {"step": step, "epoch": epoch, "batch": batch_idx,
               "seed": config.seed, "num_train": len(train_ds), **meta},
              sigma_table=table,
              data_state=None if batches is None else batches.get_state())

  # --- Training epochs, a checkpoint every ckpt.every_steps. ---------------
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  bar = progress_lib.Progress(total_steps, "train", unit="steps", every_s=15,
                              enabled=main)
  bar.resume_from(step)
  last = {}
  for epoch in range(start_epoch, tc.epochs):
    t0 = time.time()
    sums = None
    ds_active = bool(tc.ds.enabled and epoch >= tc.ds.start_epoch)
    if ds_active not in train_steps:
      train_steps[ds_active] = make_train_step(bundle, tx, config, ds_active)
    eps_adv = jnp.float32(losses.smoothadv_epsilon(
        epoch, tc.smoothadv.eps, tc.smoothadv.warmup_epochs))
    first = start_batch if epoch == start_epoch else 0
    batches = _train_batches(config, ckpt, train_ds, epoch, first, train_rows)
    for b_idx, batch in enumerate(batches, start=first):
      batch["pos"] = positions(batch["example_ids"]).astype(np.int32)
      batch["id_words"] = noise_lib.id_words(batch.pop("example_ids"))
      variables, opt_state, table, m = train_steps[ds_active](
          variables, opt_state, table, put(batch, tc.batch_size), key, epoch,
          eps_adv)
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      step += 1
      bar.update(step)
      if step % config.ckpt.every_steps == 0 and step < total_steps:
        save(epoch, b_idx + 1, batches if train_ds.lazy else None)
    # --- Evaluation, metrics. ----------------------------------------------
    clean = noisy = 0
    for batch in data_lib.iterate_batches(eval_ds, eval_bs, rows=eval_rows):
      batch["id_words"] = noise_lib.id_words(batch.pop("example_ids"))
      c, n = eval_step(variables, put(batch, eval_bs), key, sigma)
      clean, noisy = clean + int(c), noisy + int(n)
    last = _epoch_metrics(config, epoch, step, ds_active, sums, table,
                          eps_adv, clean / len(eval_ds), noisy / len(eval_ds),
                          time.time() - t0)
    if main:
      _log_epoch(last, config, metrics_path, writer, table)

  # --- The last checkpoint and the parameters-only export. ------------------
  if ckpt.latest_step() != step:
    save(tc.epochs, 0)
  ckpt.wait()
  ckpt.close()
  if main:
    ckpt_lib.export_params(os.path.join(workdir, EXPORT_DIR), variables,
                           {"step": step, **meta},
                           dtype=config.ckpt.export_dtype)
    if tc.ds.enabled:
      write_sigma_table(os.path.join(workdir, EXPORT_DIR, SIGMA_TABLE),
                        sorted_ids, np.asarray(jax.device_get(table)))
  distributed.barrier("train_and_evaluate done")
  if writer is not None:
    writer.close()
  return last

