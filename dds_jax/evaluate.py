"""Certifying a test set: what `launch.certify` and `launch.run` run.

`certify_dataset(config, workdir)` restores the trained model from
`<workdir>/checkpoints`, selects test examples (Cohen's skip/max) and
certifies them `certify.examples_per_call` at a time:

  1. sigma: `noise.sigma` (fixed), or with `sigma_opt.enabled` the per-input
     sigma from `dds_jax.sigma_opt.optimize_sigma` started at `noise.sigma`
     (or read from `sigma_opt.sigma_file`), saved to `sigma.tsv`;
  2. Monte Carlo certification at that sigma (`dds_jax.certify.certify`);
  3. with `memory.enabled`, the memory rule in query order through the
     persistent store (`dds_jax.memory.MemoryStore`): columns `predict_mem`,
     `radius_mem`, `changed`.

After each call it rewrites `certify.tsv` atomically (Cohen's columns `idx
label predict radius correct time`, plus `sigma p_lower` and the memory
columns). At the end it writes `summary.json` (certified accuracy with 95%
intervals, ACR, abstain rate, samples/s, wall time, memory size k and the union
bound k * alpha, provenance) and `certified_accuracy.png`.

`time` in the TSV is the wall time of the example's call divided by the
examples in it (the sampler certifies several examples per device batch).

`compare_fixed_and_ds` runs both settings and reports fixed sigma, data-
dependent sigma and data-dependent sigma with memory side by side.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import optax

from dds_jax import analysis
from dds_jax import data as data_lib
from dds_jax import distributed
from dds_jax import memory as memory_lib
from dds_jax import models
from dds_jax import progress as progress_lib
from dds_jax import provenance
from dds_jax import sampler
from dds_jax import sigma_opt as sigma_opt_lib
from dds_jax import train as train_lib
from dds_jax.certify import certify
from dds_jax.configs import common
from dds_jax.errors import ConfigError

TSV = "certify.tsv"
SIGMA_TSV = "sigma.tsv"
SUMMARY = "summary.json"
PLOT = "certified_accuracy.png"
MEMORY = "memory.sqlite"
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "sigma",
           "p_lower")
MEMORY_COLUMNS = ("predict_mem", "radius_mem", "changed")


def _optax_optimizer(so) -> Optional[optax.GradientTransformation]:
  if so.optimizer == "ascent":
    return None
  return {"sgd": optax.sgd, "adam": optax.adam}[so.optimizer](so.lr)


def _read_sigma_file(path: str, ids: np.ndarray) -> np.ndarray:
  cols = analysis.read_tsv(path, required=("idx", "sigma"))
  table = dict(zip(cols["idx"].tolist(), cols["sigma"].tolist()))
  missing = [int(i) for i in ids if int(i) not in table]
  if missing:
    raise ConfigError(f"sigma_opt.sigma_file {path} has no sigma for example "
                      f"ids {missing[:10]}{'...' if len(missing) > 10 else ''}")
  return np.array([table[int(i)] for i in ids], np.float64)


STATE = "certify_state.json"


def _config_hash(config) -> str:
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()


def _resume_state(config, out_dir: str, ds, store) -> dict[str, Any]:
  """What an earlier, interrupted run of the same config left in out_dir.

  A run records its config hash and the memory store's size at its start in
  certify_state.json. A later run with the same config continues after the
  last example in certify.tsv; certificates the killed run committed to the
  store but had not yet written to the TSV are returned as pending.
  """
  path = os.path.join(out_dir, STATE)
  fresh = {"config_hash": _config_hash(config),
           "num_examples": len(ds),
           "store_rows_before": len(store) if store is not None else 0}
  empty = {"done": 0, "rows": None, "sigma_rows": None,
           "pending_memory": {n: np.zeros(0) for n in
                              ("pred", "radius", "raw_pred", "changed")}}
  old = None
  if config.certify.resume and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  tsv = os.path.join(out_dir, TSV)
  if (old is None or old["config_hash"] != fresh["config_hash"] or
      not os.path.exists(tsv)):
    analysis.write_text(path, json.dumps(fresh, indent=2) + "\n")
    return empty
  rows = analysis.read_tsv(tsv)
  done = len(rows["idx"])
  if not np.array_equal(rows["idx"], ds.example_ids[:done]):
    raise ConfigError(f"{tsv} does not hold the first {done} selected "
                      "examples of this config; move it away to start over")
  sigma_path = os.path.join(out_dir, SIGMA_TSV)
  sigma_rows = (analysis.read_tsv(sigma_path, required=("idx", "sigma"))
                if os.path.exists(sigma_path) else None)
  out = dict(empty, done=done, rows=rows, sigma_rows=sigma_rows)
  if store is not None:
    rec = store.records()
    first = old["store_rows_before"] + done
    out["pending_memory"] = {"pred": rec["pred"][first:],
                             "radius": rec["radius"][first:],
                             "raw_pred": rec["raw_pred"][first:],
                             "changed": rec["changed"][first:]}
  return out


INT_COLUMNS = ("idx", "label", "predict", "correct", "predict_mem", "changed",
               "nonfinite_steps")


def _shared_resume_state(config, out_dir, ds, store, names, sigma_names):
  """`_resume_state` read by process 0, the same on every process."""
  state = None
  if distributed.is_main():
    state = _resume_state(config, out_dir, ds, store)
  if distributed.process_count() == 1:
    return state

  def columns(table, keys, n):
    return {k: np.asarray(table[k][:n] if table is not None else
                          np.zeros(n), np.int64 if k in INT_COLUMNS
                          else np.float64) for k in keys}

  head = np.zeros(2, np.int64)
  if state is not None:
    head[:] = (state["done"], state["sigma_rows"] is not None)
  done, has_sigma = (int(v) for v in distributed.broadcast(head))
  rows = distributed.broadcast(columns(state and state["rows"], names, done))
  sigma_rows = distributed.broadcast(columns(
      state and state["sigma_rows"], sigma_names, done)) if has_sigma else None
  if state is None:  # another process: the memory is process 0's business
    state = {"pending_memory": {n: np.zeros(0) for n in
                                ("pred", "radius", "raw_pred", "changed")}}
  return dict(state, done=done, rows=rows if done else None,
              sigma_rows=sigma_rows)


def certify_dataset(config: ml_collections.ConfigDict, workdir: str, *,
                    out_dir: Optional[str] = None, params=None,
                    bundle=None) -> dict[str, Any]:
  """Certifies the configured test examples and writes the result files.

  Args:
    config: a dds_jax config.
    workdir: holds `checkpoints/` (unless params and bundle are given).
    out_dir: where the result files go (default: workdir).
    params, bundle: an already loaded model (e.g. from a notebook); default:
      restore from the workdir.

  Returns:
    The summary written to summary.json.
  """
  common.validate(config)
  cc, so, mc = config.certify, config.sigma_opt, config.memory
  if mc.enabled and not so.enabled:
    raise ConfigError("memory.enabled needs sigma_opt.enabled: with a fixed "
                      "sigma Cohen's certificates are sound without a memory")
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  test_ds = train_lib.load_split(config, config.data.test_split)
  train_lib.check_dataset_fits(config, test_ds)
  ds = data_lib.select(test_ds, cc.skip, cc.max)
  if bundle is None or params is None:
    bundle, params = train_lib.restore_params(config, workdir,
                                              test_ds.image_shape)
  mesh = sampler.make_mesh(config.mesh.num_devices or None)
  key = jax.random.key(config.seed)
  sigma0 = float(config.noise.sigma)
  params = distributed.replicate(params, mesh)
  main = distributed.is_main()
  store = None  # the memory lives on process 0 alone
  if mc.enabled and main:
    store = memory_lib.MemoryStore(
        mc.path or os.path.join(out_dir, MEMORY),
        input_shape=ds.image_shape, dataset=f"{ds.name}:{ds.split}",
        model_fingerprint=models.fingerprint(params, config.model.name),
        norm=2 if config.noise.kind == "gaussian" else 1, alpha=cc.alpha)
    if len(store):
      print(f"memory store {store.path} holds {len(store)} certificates from "
            "earlier queries; new ones are checked against them", flush=True)

  names = COLUMNS + (MEMORY_COLUMNS if mc.enabled else ())
  rows = {name: [] for name in names}
  sigma_rows = {"idx": [], "sigma0": [], "sigma": [], "nonfinite_steps": []}
  state = _shared_resume_state(config, out_dir, ds, store, names,
                               tuple(sigma_rows))
  done = state["done"]
  if done:
    rows = {n: state["rows"][n].tolist() for n in names}
    if state["sigma_rows"] is not None:
      sigma_rows = {n: state["sigma_rows"][n].tolist()[:done]
                    for n in sigma_rows}
    if main:
      print(f"resuming certification at example {done} of {len(ds)} "
            f"({os.path.join(out_dir, TSV)})", flush=True)
  pending_memory = state["pending_memory"]  # committed before a crash
  bar = progress_lib.Progress(len(ds), "certify", unit="examples",
                              enabled=main)
  bar.resume_from(done)
  start = time.time()
  sigma_time = 0.0
  for lo in range(done, len(ds), cc.examples_per_call):
    part = ds.take(np.arange(lo, min(lo + cc.examples_per_call, len(ds))))
    # This process's slice of the call; results are gathered in global order.
    mine = part.take(np.arange(len(part))[distributed.split(len(part))])
    t0 = time.time()
    sigma = np.full(len(mine), sigma0)
    if so.enabled and so.sigma_file:
      sigma = _read_sigma_file(so.sigma_file, mine.example_ids)
    elif so.enabled:
      sigma, info = sigma_opt_lib.optimize_sigma(
          bundle.apply_fn, params, mine.images, sigma0, key, steps=so.steps,
          lr=so.lr, num_samples=so.num_samples, clip=tuple(so.clip),
          sigma_min=so.sigma_min, noise=config.noise.kind,
          optimizer=_optax_optimizer(so), example_ids=mine.example_ids,
          examples_per_device=so.examples_per_device, mesh=mesh,
          return_info=True)
      sigma_rows["nonfinite_steps"] += distributed.gather_rows(
          info.nonfinite_steps).tolist()
      sigma_rows["idx"] += part.example_ids.tolist()
      sigma_rows["sigma0"] += [sigma0] * len(part)
      sigma_rows["sigma"] += distributed.gather_rows(sigma).tolist()
      if main:
        analysis.write_tsv(os.path.join(out_dir, SIGMA_TSV), sigma_rows,
                           float_format=None)
    sigma_time += time.time() - t0
    local = certify(
        bundle.apply_fn, params, mine.images, sigma, key, n0=cc.n0, n=cc.n,
        alpha=cc.alpha, batch_size=cc.batch_size,
        num_classes=config.model.num_classes, example_ids=mine.example_ids,
        samples_per_block=cc.samples_per_block, noise=config.noise.kind,
        mesh=mesh)
    cert = {name: distributed.gather_rows(getattr(local, name))
            for name in ("pred", "radius", "p_lower", "sigma")}
    if mc.enabled:
      mem = {"preds": np.zeros(len(part), np.int64),
             "radii": np.zeros(len(part), np.float64),
             "changed": np.zeros(len(part), np.int64)}
      if store is not None:
        mem, pending_memory = _memory_rule(store, part, cert, pending_memory)
      # The rule ran on process 0, in global query order; all hosts agree.
      mem = distributed.broadcast(mem)
      rows["predict_mem"] += mem["preds"].tolist()
      rows["radius_mem"] += mem["radii"].tolist()
      rows["changed"] += mem["changed"].tolist()
    per_example = (time.time() - t0) / len(part)
    rows["idx"] += part.example_ids.tolist()
    rows["label"] += part.labels.tolist()
    rows["predict"] += cert["pred"].tolist()
    rows["radius"] += cert["radius"].tolist()
    rows["correct"] += (cert["pred"] == part.labels).astype(int).tolist()
    rows["time"] += [per_example] * len(part)
    rows["sigma"] += cert["sigma"].tolist()
    rows["p_lower"] += cert["p_lower"].tolist()
    if main:
      analysis.write_tsv(os.path.join(out_dir, TSV), rows)
    bar.update(lo + len(part))
  wall = time.time() - start

  summary = analysis.summarize(rows, cc.radii)
  sig = np.asarray(rows["sigma"])
  summary.update({
      "dataset": ds.name, "split": ds.split, "noise": config.noise.kind,
      "sigma": sigma0, "data_dependent_sigma": bool(so.enabled),
      "sigma_stats": {"mean": float(sig.mean()), "min": float(sig.min()),
                      "max": float(sig.max()),
                      "mean_minus_sigma0": float(sig.mean() - sigma0)},
      "n0": cc.n0, "n": cc.n, "alpha": cc.alpha, "seed": config.seed,
      "wall_time_s": wall, "sigma_opt_time_s": sigma_time,
      "samples_per_s": len(ds) * (cc.n0 + cc.n) / max(wall - sigma_time,
                                                      1e-9)})
  curves = {"fixed sigma" if not so.enabled else "data-dependent sigma":
            (np.asarray(rows["radius"]), np.asarray(rows["correct"]))}
  if mc.enabled:
    mem_summary = analysis.summarize(rows, cc.radii, radius_key="radius_mem",
                                     predict_key="predict_mem")
    if store is not None:
      mem_summary.update(store.summary(cc.alpha))
      mem_summary["invariant_holds"] = bool(store.check_invariant())
      store.close()
    mem_summary["num_changed_this_run"] = int(np.sum(rows["changed"]))
    summary["memory"] = mem_summary
    curves["data-dependent sigma + memory"] = analysis.radius_and_correct(
        rows, radius_key="radius_mem", predict_key="predict_mem")
  summary["provenance"] = provenance.collect(config)
  if main:
    analysis.write_text(os.path.join(out_dir, SUMMARY),
                        json.dumps(summary, indent=2) + "\n")
    analysis.plot_certified_accuracy(
        curves, os.path.join(out_dir, PLOT),
        title=f"{ds.name} ({len(ds)} test images), N={cc.n}, alpha={cc.alpha}")
  distributed.barrier("certify_dataset done")
  return summary


def _memory_rule(store, part, cert, pending):
  """The memory rule on one call's certificates, in query order (process 0).

  Certificates a killed run committed but did not write to the TSV are in the
  store already: they are taken from there instead of being inserted twice.

  Returns:
    ({preds, radii, changed} of the call, what is still pending).
  """
  k = min(len(pending["pred"]), len(part))
  if k:
    assert np.array_equal(pending["raw_pred"][:k], cert["pred"][:k])
  parts = [(pending["pred"][:k], pending["radius"][:k], pending["changed"][:k])]
  if k < len(part):
    new = store.insert_many(part.images[k:], cert["pred"][k:],
                            cert["radius"][k:],
                            example_ids=part.example_ids[k:].tolist())
    parts.append((new.preds, new.radii, new.changed))
  preds, radii, changed = (np.concatenate(c) for c in zip(*parts))
  mem = {"preds": preds.astype(np.int64), "radii": radii.astype(np.float64),
         "changed": changed.astype(np.int64)}
  return mem, {n: v[k:] for n, v in pending.items()}


def compare_fixed_and_ds(config: ml_collections.ConfigDict,
                         workdir: str) -> tuple[dict[str, dict], str]:
  """Certifies with fixed sigma (workdir/fixed) and data-dependent sigma
  with memory (workdir/ds); writes comparison.md and certified_accuracy.png.

  Returns:
    (summaries by row name, the Markdown table).
  """
  fixed_cfg = copy.deepcopy(config)
  with fixed_cfg.unlocked():
    fixed_cfg.sigma_opt.enabled = False
    fixed_cfg.memory.enabled = False
  ds_cfg = copy.deepcopy(config)
  with ds_cfg.unlocked():
    ds_cfg.sigma_opt.enabled = True
  bundle, params = None, None
  test_ds = train_lib.load_split(config, config.data.test_split)
  bundle, params = train_lib.restore_params(config, workdir,
                                            test_ds.image_shape)
  fixed = certify_dataset(fixed_cfg, workdir, out_dir=os.path.join(
      workdir, "fixed"), params=params, bundle=bundle)
  ds = certify_dataset(ds_cfg, workdir, out_dir=os.path.join(workdir, "ds"),
                       params=params, bundle=bundle)
  summaries = {"fixed sigma": fixed, "data-dependent sigma": ds}
  if "memory" in ds:
    summaries["data-dependent sigma + memory"] = ds["memory"]
  table = analysis.format_table(summaries)
  if not distributed.is_main():  # process 0 writes the comparison
    return summaries, table
  curves = {
      "fixed sigma": analysis.read_tsv(os.path.join(workdir, "fixed", TSV)),
      "data-dependent sigma": analysis.read_tsv(os.path.join(workdir, "ds",
                                                             TSV))}
  if "memory" in ds:
    curves["data-dependent sigma + memory"] = analysis.radius_and_correct(
        curves["data-dependent sigma"], radius_key="radius_mem",
        predict_key="predict_mem")
  notes = [f"sigma0 = {config.noise.sigma:g}; data-dependent sigma: mean "
           f"{ds['sigma_stats']['mean']:.4f}, min {ds['sigma_stats']['min']:.4f}"
           f", max {ds['sigma_stats']['max']:.4f}"]
  if "memory" in ds:
    m = ds["memory"]
    notes.append(f"memory: {m['num_stored']} stored certificates, "
                 f"{m['num_changed_this_run']} changed by the rule, union "
                 f"bound k * alpha = {m['union_bound']:.3g}")
  text = table + "\n\n" + "\n".join(notes) + "\n"
  analysis.write_text(os.path.join(workdir, "comparison.md"), text)
  analysis.plot_certified_accuracy(
      curves, os.path.join(workdir, PLOT),
      title=f"{fixed['dataset']}: fixed vs data-dependent sigma "
      f"(N={config.certify.n})")
  return summaries, text
