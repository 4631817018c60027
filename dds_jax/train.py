"""Training with Gaussian noise augmentation (Cohen et al.), data-parallel.

`train_and_evaluate(config, workdir)` is what `launch.train` runs: optax SGD
with momentum and weight decay, a step or cosine schedule, random crop and flip
on device, noise N(0, sigma^2 I) added in [0, 1] pixel space, batches sharded
over the `data` mesh axis, orbax checkpoints every `ckpt.every_steps` steps and
at the end, and a restart that continues from the latest step.

Augmentation and noise of an example are keyed by (seed, example id, epoch),
and the data order by (seed, epoch), so a resumed run sees the same batches
and the same noise as an uninterrupted one.
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

from dds_jax import checkpoint as ckpt_lib
from dds_jax import data as data_lib
from dds_jax import models
from dds_jax import noise as noise_lib
from dds_jax import progress as progress_lib
from dds_jax import sampler
from dds_jax.configs import common
from dds_jax.errors import ConfigError

EVAL_BLOCK = 1 << 20  # noise block index used for per-epoch noisy evaluation


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


def example_keys(key: jax.Array, example_ids: jax.Array, block) -> jax.Array:
  """One key per example for this epoch (or evaluation) block."""
  return jax.vmap(lambda i: noise_lib.block_key(
      key, noise_lib.Purpose.TRAIN, i, block))(example_ids)


def make_train_step(bundle: models.ModelBundle, tx, *, noise_kind: str,
                    crop_padding: int, flip: bool):
  """A jitted step (variables, opt_state, batch, key, epoch, sigma) -> ..."""

  def step(variables, opt_state, batch, key, epoch, sigma):
    keys = example_keys(key, batch["example_ids"], epoch)
    k_aug, k_noise = jax.vmap(jax.random.split, out_axes=1)(keys)
    x = jax.vmap(lambda k, im: augment(k, im, crop_padding, flip))(
        k_aug, batch["images"])
    x = x + jax.vmap(lambda k, im: noise_lib.draw(k, im.shape, sigma,
                                                  noise_kind))(k_noise, x)
    mask = batch["mask"].astype(jnp.float32)

    def loss_fn(params):
      logits, new_state = bundle.apply_train({**variables, "params": params}, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["labels"])
      loss = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
      return loss, (logits, new_state)

    (loss, (logits, new_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    variables = {**variables, **new_state, "params": params}
    correct = (jnp.argmax(logits, -1) == batch["labels"]) * mask
    metrics = {"loss": loss * jnp.sum(mask), "correct": jnp.sum(correct),
               "count": jnp.sum(mask)}
    return variables, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(bundle: models.ModelBundle, noise_kind: str):
  """Clean and one-draw noisy correct counts of a batch."""

  def step(variables, batch, key, sigma):
    keys = example_keys(key, batch["example_ids"], EVAL_BLOCK)
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


def build_model(config: ml_collections.ConfigDict,
                image_shape) -> models.ModelBundle:
  kwargs = {}
  if config.model.conv_features:
    kwargs["conv_features"] = tuple(config.model.conv_features)
  return models.build(config.model.name, config.model.num_classes,
                      tuple(image_shape), **kwargs)


def load_split(config: ml_collections.ConfigDict, split: str):
  return data_lib.load(config.data.name, split,
                       cache_dir=config.data.cache_dir or None,
                       class_names=tuple(config.data.class_names) or None,
                       data_dir=config.data.data_dir or None)


def check_dataset_fits(config, ds) -> None:
  if ds.num_classes != config.model.num_classes:
    raise ConfigError(f"dataset {ds.name} has {ds.num_classes} classes but "
                      f"model.num_classes={config.model.num_classes}")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (or resumes) and writes checkpoints and metrics under workdir.

  Returns:
    the last epoch's metrics.
  """
  common.validate(config)
  tc = config.train
  os.makedirs(workdir, exist_ok=True)
  train_ds = load_split(config, config.data.train_split)
  test_ds = load_split(config, config.data.test_split)
  check_dataset_fits(config, train_ds)
  mesh = sampler.make_mesh(config.mesh.num_devices or None)
  ndev = mesh.shape[sampler.DATA_AXIS]
  if tc.batch_size % ndev:
    raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible "
                      f"by the {ndev} devices")
  steps_per_epoch = len(train_ds) // tc.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the "
                      f"{len(train_ds)} training examples")
  total_steps = tc.epochs * steps_per_epoch

  bundle = build_model(config, train_ds.image_shape)
  key = jax.random.key(config.seed)
  variables = bundle.init(jax.random.fold_in(key, 0))
  tx = make_optimizer(tc, steps_per_epoch)
  opt_state = tx.init(variables["params"])

  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.ckpt.max_to_keep)
  start_epoch, start_batch, step = 0, 0, 0
  if ckpt.latest_step() is not None:
    meta = ckpt.read_meta()
    if meta.get("model") != config.model.name:
      raise ConfigError(f"{workdir} holds a checkpoint of model "
                        f"{meta.get('model')!r}, not {config.model.name!r}; "
                        "use another --workdir")
    restored = ckpt.restore(variables, opt_state)
    variables, opt_state = restored["params"], restored["opt_state"]
    step, start_epoch, start_batch = meta["step"], meta["epoch"], meta["batch"]
    print(f"resuming from step {step} (epoch {start_epoch}, batch "
          f"{start_batch})", flush=True)
  with open(os.path.join(workdir, "train_config.json"), "w") as f:
    f.write(config.to_json(indent=2))

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(sampler.DATA_AXIS))
  variables = jax.device_put(variables, replicated)
  opt_state = jax.device_put(opt_state, replicated)
  train_step = make_train_step(bundle, tx, noise_kind=config.noise.kind,
                               crop_padding=tc.crop_padding, flip=tc.flip)
  eval_step = make_eval_step(bundle, config.noise.kind)
  sigma = jnp.float32(config.noise.sigma)
  eval_ds = test_ds.take(np.arange(min(tc.eval_examples, len(test_ds))))
  eval_bs = min(tc.batch_size, 500)
  eval_bs = max(ndev, eval_bs - eval_bs % ndev)

  def put(batch):
    return {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}

  def save(epoch, batch_idx):
    ckpt.save(step, variables, opt_state,
              {"step": step, "epoch": epoch, "batch": batch_idx,
               "seed": config.seed, "model": config.model.name,
               "data": config.data.name})

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  bar = progress_lib.Progress(total_steps, "train", unit="steps", every_s=15)
  bar.resume_from(step)
  last = {}
  for epoch in range(start_epoch, tc.epochs):
    t0 = time.time()
    sums = None
    batches = data_lib.iterate_batches(train_ds, tc.batch_size,
                                       shuffle_key_seed=config.seed,
                                       epoch=epoch, drop_remainder=True)
    for b_idx, batch in enumerate(batches):
      if epoch == start_epoch and b_idx < start_batch:
        continue
      variables, opt_state, m = train_step(variables, opt_state, put(batch),
                                           key, epoch, sigma)
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      step += 1
      bar.update(step)
      if step % config.ckpt.every_steps == 0 and step < total_steps:
        save(epoch, b_idx + 1)
    clean = noisy = 0
    for batch in data_lib.iterate_batches(eval_ds, eval_bs):
      c, n = eval_step(variables, put(batch), jax.random.fold_in(key, 1), sigma)
      clean, noisy = clean + int(c), noisy + int(n)
    sums = jax.device_get(sums) if sums is not None else None
    count = float(sums["count"]) if sums else 0.0
    last = {"epoch": epoch + 1, "step": step,
            "train_loss": float(sums["loss"]) / count if count else None,
            "train_accuracy": float(sums["correct"]) / count if count else None,
            "test_accuracy": clean / len(eval_ds),
            "noisy_test_accuracy": noisy / len(eval_ds),
            "sigma": float(config.noise.sigma),
            "epoch_time_s": time.time() - t0,
            "images_per_s": count / max(time.time() - t0, 1e-9)}
    with open(metrics_path, "a") as f:
      f.write(json.dumps(last) + "\n")
    print(f"epoch {epoch + 1}/{tc.epochs}: loss {last['train_loss']:.4f} "
          f"train acc {last['train_accuracy']:.3f} test acc "
          f"{last['test_accuracy']:.3f} noisy test acc "
          f"{last['noisy_test_accuracy']:.3f} ({last['epoch_time_s']:.1f} s)",
          flush=True)
  if ckpt.latest_step() != step:
    save(tc.epochs, 0)
  ckpt.wait()
  ckpt.close()
  return last


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   image_shape) -> tuple[models.ModelBundle, Any]:
  """The model and its trained variables from `<workdir>/checkpoints`."""
  bundle = build_model(config, image_shape)
  template = jax.eval_shape(bundle.init, jax.random.key(0))
  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  meta = ckpt.read_meta()
  if meta.get("model") != config.model.name:
    raise ConfigError(f"the checkpoint in {workdir} is of model "
                      f"{meta.get('model')!r}, not {config.model.name!r}")
  restored = ckpt.restore(template)
  ckpt.close()
  return bundle, restored["params"]

