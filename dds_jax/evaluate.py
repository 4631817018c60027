"""Certifying a test set: what `launch.certify` and `launch.run` run.

`certify_dataset(config, workdir)` restores the trained model from
`<workdir>/checkpoints` (or `certify.checkpoint`), selects test examples
(Cohen's skip/max) and certifies them `certify.examples_per_call` at a time.
The three choices of `certify.*` (see `dds_jax.configs.common`):

  * `procedure`: 'cohen', Cohen's CERTIFY (`dds_jax.certify.certify`);
  * `sigma_method`: 'fixed' (`noise.sigma`), 'ascent' (per-input sigma from
    `dds_jax.sigma_opt.optimize_sigma` started at `noise.sigma`), 'grid' (the
    certificate-aware `dds_jax.sigma_opt.select_sigma_grid` over
    `sigma_grid.sigmas`), both saved to `sigma.tsv`, or 'file' (read from
    `sigma_opt.sigma_file`);
  * `soundness`: 'none', or 'memory': the memory rule in query order through
    the persistent store (`_memory_rule` -> `dds_jax.memory.MemoryStore`):
    columns `predict_mem`, `radius_mem`, `changed`.

After each call it rewrites `certify.tsv` atomically (Cohen's columns `idx
label predict radius correct time`, plus `sigma p_lower` and the memory
columns); floats are written in their shortest exact form, so the file read
back holds the issued radii. At the end it writes `summary.json` (certified
accuracy with 95% intervals, ACR, abstain rate, this run's samples/s and wall
time, memory size k and the union bound k * alpha, provenance) and
`certified_accuracy.png`.

An interrupted run resumes: `certify_state.json` records the config hash,
the noise version and the store's size at the start; a rerun of the same
config continues after the last row of `certify.tsv`, and the certificates
the killed run had committed to the store but not yet to the TSV are found
by example id and reused, never inserted twice.

`time` in the TSV is the wall time of the example's call divided by the
examples in it (the sampler certifies several examples per device batch).

Comparisons of several runs on the same images (the main job's table, the
paired tests) are in `dds_jax.experiment`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from dds_jax import analysis
from dds_jax import checkpoint as ckpt_lib
from dds_jax import data as data_lib
from dds_jax import distributed
from dds_jax import dual as dual_lib
from dds_jax import memory as memory_lib
from dds_jax import models
from dds_jax import noise as noise_lib
from dds_jax import progress as progress_lib
from dds_jax import provenance
from dds_jax import sigma_opt as sigma_opt_lib
from dds_jax import stats
from dds_jax import validate
from dds_jax.certify import certify
from dds_jax.certify import certify_at
from dds_jax.configs import common
from dds_jax.errors import ConfigError

TSV = "certify.tsv"
SIGMA_TSV = "sigma.tsv"
SUMMARY = analysis.CERTIFY_SUMMARY
PLOT = "certified_accuracy.png"
MEMORY = memory_lib.store.MEMORY_FILE
STATE = "certify_state.json"
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "sigma",
           "p_lower")
MEMORY_COLUMNS = ("predict_mem", "radius_mem", "changed")
# sigma_method = selector: the selector's choice (-1: it abstained) and
# radius, and the classifier's radius; with dual soundness radius = min of
# the two (dds_jax.dual).
SELECTOR_COLUMNS = ("sigma_index", "radius_sigma", "radius_c")
# procedure = sequential: the draws each decision used (n0 + estimation).
SEQUENTIAL_COLUMNS = ("samples",)
SIGMA_COLUMNS = ("idx", "sigma0", "sigma", "nonfinite_steps")
INT_COLUMNS = ("idx", "label", "predict", "correct", "predict_mem", "changed",
               "nonfinite_steps", "sigma_index", "samples")
PENDING = ("pred", "radius", "raw_pred", "changed")


def _read_sigma_file(path: str, ids: np.ndarray) -> np.ndarray:
  table = analysis.read_sigma_by_id(path)
  missing = [int(i) for i in ids if int(i) not in table]
  if missing:
    raise ConfigError(f"sigma_opt.sigma_file {path} has no sigma for example "
                      f"ids {missing[:10]}{'...' if len(missing) > 10 else ''}")
  return np.array([table[int(i)] for i in ids], np.float64)


def _config_hash(config) -> str:
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------
# Resume: what an interrupted run of the same config left behind.
# ---------------------------------------------------------------------------


def _no_pending() -> dict[str, Any]:
  return {}  # example id -> {pred, radius, raw_pred, changed}


def _pending_memory(store, since_row: int, ids) -> dict[int, dict]:
  """Certificates of `ids` a killed run committed after store row since_row.

  Keyed by example id, so rows other runs added to a shared store in the
  meantime are skipped. Where an id was stored more than once after
  since_row (two runs of one config on one store), the first is taken.
  """
  rec = store.records()
  wanted = {int(i) for i in ids}
  out = {}
  for j in np.nonzero(rec["id"] > since_row)[0]:
    e = rec["example_id"][j]
    if e is not None and int(e) in wanted and int(e) not in out:
      out[int(e)] = {n: rec[n][j] for n in PENDING}
  return out


def _resume_state(config, out_dir: str, ds, store) -> dict[str, Any]:
  """What an earlier, interrupted run of the same config left in out_dir.

  A run records its config hash, the noise version and the memory store's
  size at its start in certify_state.json. A later run with the same config
  continues after the last example in certify.tsv; certificates the killed
  run committed to the store but had not yet written to the TSV are returned
  as pending, keyed by example id.
  """
  path = os.path.join(out_dir, STATE)
  fresh = {"config_hash": _config_hash(config),
           "noise_version": noise_lib.NOISE_VERSION,
           "num_examples": len(ds),
           "store_rows_before": len(store) if store is not None else 0}
  empty = {"done": 0, "rows": None, "sigma_rows": None,
           "pending_memory": _no_pending()}
  old = None
  if config.certify.resume and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  tsv = os.path.join(out_dir, TSV)
  if (old is None or old["config_hash"] != fresh["config_hash"] or
      not os.path.exists(tsv)):
    analysis.write_text(path, json.dumps(fresh, indent=2) + "\n")
    return empty
  version = old.get("noise_version", 1)
  if version != noise_lib.NOISE_VERSION:
    raise ConfigError(
        f"{out_dir} holds a run certified with noise version {version}; this "
        f"dds_jax draws noise version {noise_lib.NOISE_VERSION}, and a resumed "
        "run would mix the two: move the directory away or set "
        "--config.certify.resume=False")
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
    out["pending_memory"] = _pending_memory(
        store, old["store_rows_before"], ds.example_ids[done:])
  return out


def _shared_resume_state(config, out_dir, ds, store, names):
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
      state and state["sigma_rows"], SIGMA_COLUMNS, done)) if has_sigma else None
  if state is None:  # another process: the memory is process 0's business
    state = {"pending_memory": _no_pending()}
  return dict(state, done=done, rows=rows if done else None,
              sigma_rows=sigma_rows)


# ---------------------------------------------------------------------------
# The run: model and data, sigma, certificates, memory, result files.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
  """What every call of a certification run shares."""
  config: ml_collections.ConfigDict
  out_dir: str
  ds: Any                 # the selected test examples
  bundle: models.ModelBundle
  params: Any             # replicated over mesh
  mesh: jax.sharding.Mesh
  key: jax.Array
  store: Optional[memory_lib.MemoryStore]  # process 0 with the memory only
  sigma_optimizer: Any = None
  selector: Any = None    # sigma_method = selector: (bundle, replicated params)


def _load(config, workdir, out_dir, params, bundle) -> _Run:
  """Model, data, mesh and (with the memory, on process 0) the store."""
  cc = config.certify
  test_ds = data_lib.load_split(config, config.data.test_split)
  data_lib.check_fits(config, test_ds)
  ds = data_lib.select(test_ds, cc.skip, cc.max)
  mesh = distributed.make_mesh(config.mesh.num_devices or None)
  if bundle is None or params is None:
    bundle, params = ckpt_lib.restore_params(config, workdir,
                                             test_ds.image_shape, mesh)
  params = distributed.replicate(params, mesh)
  store = None  # the memory lives on process 0 alone
  if cc.soundness == "memory" and distributed.is_main():
    store = memory_lib.MemoryStore(
        config.memory.path or memory_lib.default_path(out_dir),
        input_shape=ds.image_shape, dataset=f"{ds.name}:{ds.split}",
        model_fingerprint=models.fingerprint(params, config.model.name),
        norm=validate.norm_of(config.noise.kind), alpha=cc.alpha,
        network=config.memory.network)
    if not config.memory.path and os.path.dirname(store.path) != out_dir:
      print(f"{out_dir} is on a network filesystem: the memory store is on "
            f"this machine's disk, {store.path}", flush=True)
    if len(store):
      print(f"memory store {store.path} holds {len(store)} certificates from "
            "earlier queries; new ones are checked against them", flush=True)
  optimizer = sigma_opt_lib.make_optimizer(config.sigma_opt.optimizer,
                                           float(config.sigma_opt.lr))
  selector = None
  if cc.sigma_method == "selector":
    sel_bundle, sel_params = dual_lib.load_selector(config, ds.image_shape,
                                                    mesh)
    selector = (sel_bundle, distributed.replicate(sel_params, mesh))
  return _Run(config, out_dir, ds, bundle, params, mesh,
              jax.random.key(config.seed), store, optimizer, selector)


def _alphas(config) -> tuple[float, float]:
  """(alpha of the selector, alpha of the classifier's CERTIFY).

  Dual soundness splits certify.alpha between the two (their union bound is
  the certificate's); otherwise the classifier has all of it and the
  selector, which only picks sigma, abstains at the same split.
  """
  alpha_sigma, alpha_c = dual_lib.split_alpha(
      config.certify.alpha, config.dual.alpha_sigma_fraction)
  if config.certify.soundness != "dual":
    alpha_c = float(config.certify.alpha)
  return alpha_sigma, alpha_c


def _choose_sigma(run: _Run, part, mine, sigma_rows):
  """This process's sigmas for its slice `mine` of the call `part`.

  Returns:
    (sigma [B], the selector's `dual.Selection` with sigma_method = selector,
    else None).
  """
  config, so = run.config, run.config.sigma_opt
  sigma0 = float(config.noise.sigma)
  method = config.certify.sigma_method
  selection = None
  if method == "fixed":
    return np.full(len(mine), sigma0), None
  if method == "file":
    return _read_sigma_file(so.sigma_file, mine.example_ids), None
  if method == "selector":
    cc, d = config.certify, config.dual
    bundle, params = run.selector
    selection = dual_lib.select(
        bundle.apply_fn, params, mine.images, d.sigmas,
        dual_lib.selector_sigma(config), run.key, d.n0 or cc.n0,
        d.n or cc.n, _alphas(config)[0], batch_size=cc.batch_size,
        example_ids=mine.example_ids, samples_per_block=cc.samples_per_block,
        noise=config.noise.kind, mesh=run.mesh)
    sigma = dual_lib.sigma_of(selection, d.sigmas,
                              dual_lib.fallback_index(d.sigmas, sigma0))
    nonfinite = np.zeros(len(mine), np.int64)
  elif method == "grid":
    cc = config.certify
    choice = sigma_opt_lib.select_sigma_grid(
        run.bundle.apply_fn, run.params, mine.images, run.key,
        grid=tuple(config.sigma_grid.sigmas), pilot=config.sigma_grid.pilot,
        n=cc.n, alpha=cc.alpha, sigma0=sigma0, noise=config.noise.kind,
        example_ids=mine.example_ids, batch_size=cc.batch_size,
        samples_per_block=cc.samples_per_block, mesh=run.mesh)
    sigma, nonfinite = choice.sigma, np.zeros(len(mine), np.int64)
  else:  # ascent
    sigma, info = sigma_opt_lib.optimize_sigma(
        run.bundle.apply_fn, run.params, mine.images, sigma0, run.key,
        steps=so.steps, lr=so.lr, num_samples=so.num_samples,
        clip=tuple(so.clip), sigma_min=so.sigma_min, noise=config.noise.kind,
        optimizer=run.sigma_optimizer, example_ids=mine.example_ids,
        examples_per_device=so.examples_per_device, mesh=run.mesh,
        return_info=True)
    nonfinite = info.nonfinite_steps
  sigma_rows["nonfinite_steps"] += distributed.gather_rows(nonfinite).tolist()
  sigma_rows["idx"] += part.example_ids.tolist()
  sigma_rows["sigma0"] += [sigma0] * len(part)
  sigma_rows["sigma"] += distributed.gather_rows(sigma).tolist()
  if distributed.is_main():
    analysis.write_tsv(os.path.join(run.out_dir, SIGMA_TSV), sigma_rows,
                       float_format=None)
  return sigma, selection


def _certify_call(run: _Run, mine, sigma, selection
                  ) -> dict[str, np.ndarray]:
  """Cohen's CERTIFY of this process's examples, gathered in global order.

  With the selector, also its columns; with dual soundness the issued
  certificate is `dual.combine`'s (R = min(R_sigma, R_c)).
  """
  cc, config = run.config.certify, run.config
  common_args = dict(
      batch_size=cc.batch_size, num_classes=config.model.num_classes,
      example_ids=mine.example_ids, samples_per_block=cc.samples_per_block,
      noise=config.noise.kind, mesh=run.mesh)
  if cc.procedure == "sequential":
    dec = certify_at(
        run.bundle.apply_fn, run.params, mine.images, sigma, run.key,
        float(cc.radius), cc.alpha, n0=cc.n0, max_samples=cc.max_samples,
        sequence=cc.sequence, **common_args)
    # p_lower: the plain Clopper-Pearson bound of the draws it stopped at
    # (the decision itself is the sequence's).
    out = {"pred": dec.pred, "radius": dec.radius, "sigma": dec.sigma,
           "p_lower": stats.lower_confidence_bound(
               dec.hits, np.maximum(dec.draws, 1), cc.alpha),
           "samples": dec.samples}
    return {name: distributed.gather_rows(v) for name, v in out.items()}
  local = certify(
      run.bundle.apply_fn, run.params, mine.images, sigma, run.key, n0=cc.n0,
      n=cc.n, alpha=_alphas(config)[1], bound=cc.bound, **common_args)
  out = {name: getattr(local, name)
         for name in ("pred", "radius", "p_lower", "sigma")}
  if selection is not None:
    out.update(sigma_index=selection.index, radius_sigma=selection.radius,
               radius_c=local.radius)
    if cc.soundness == "dual":
      out["pred"], out["radius"] = dual_lib.combine(selection, local.pred,
                                                    local.radius)
  return {name: distributed.gather_rows(v) for name, v in out.items()}


def _memory_rule(store, part, cert, pending):
  """The memory rule on one call's certificates, in query order (process 0).

  This is where the memory is consulted when a test set is certified.
  Certificates a killed run committed but did not write to the TSV are in the
  store already (`pending`, by example id): they are taken from there instead
  of being inserted twice. They are a prefix of the call (the killed run
  inserted this call's certificates in order, in one transaction).

  Returns:
    ({preds, radii, changed} of the call, what is still pending).
  """
  ids = [int(i) for i in part.example_ids]
  k = 0
  while k < len(ids) and ids[k] in pending:
    k += 1
  stray = [i for i in ids[k:] if i in pending]
  if stray:
    raise ConfigError(
        f"the memory store holds certificates of examples {stray[:5]} of this "
        "call but not of the ones before them: it was written by another "
        "run; use another memory.path or move the results away")
  old = [pending.pop(i) for i in ids[:k]]
  for i, rec, raw in zip(ids, old, cert["pred"][:k]):
    if int(rec["raw_pred"]) != int(raw):
      raise ConfigError(
          f"the memory store's certificate of example {i} has class "
          f"{int(rec['raw_pred'])} before the rule, but this run certified "
          f"{int(raw)}: the store was written by another configuration; use "
          "another memory.path or move the results away")
  preds = [int(r["pred"]) for r in old]
  radii = [float(r["radius"]) for r in old]
  changed = [int(r["changed"]) for r in old]
  if k < len(part):
    new = store.insert_many(part.images[k:], cert["pred"][k:],
                            cert["radius"][k:], example_ids=ids[k:])
    preds += new.preds.tolist()
    radii += new.radii.tolist()
    changed += new.changed.astype(np.int64).tolist()
  mem = {"preds": np.asarray(preds, np.int64),
         "radii": np.asarray(radii, np.float64),
         "changed": np.asarray(changed, np.int64)}
  return mem, pending


def _sigma_cost(config) -> int:
  """Forward passes per example spent on choosing sigma (the config's method)."""
  return sigma_opt_lib.selection_cost(
      config.certify.sigma_method, grid_size=len(config.sigma_grid.sigmas),
      pilot=config.sigma_grid.pilot, steps=config.sigma_opt.steps,
      num_samples=config.sigma_opt.num_samples,
      selector_draws=(config.dual.n0 or config.certify.n0) + (
          config.dual.n or config.certify.n))


def _radius_cap(config, max_sigma: float) -> float:
  """The largest radius this config can certify (`stats.radius_cap`); with
  dual soundness the smaller of the classifier's (at alpha_c) and the
  selector's (s_e, its N, alpha_sigma)."""
  cc, kind = config.certify, config.noise.kind
  if cc.procedure == "sequential":  # it decides one radius: r or nothing
    return float(cc.radius)
  alpha_sigma, alpha_c = _alphas(config)
  cap = float(stats.radius_cap(max_sigma, cc.n, alpha_c, kind))
  if cc.soundness == "dual":
    cap = min(cap, float(stats.radius_cap(
        dual_lib.selector_sigma(config), config.dual.n or cc.n, alpha_sigma,
        kind)))
  return cap


def _samples_this_run(config, rows, examples_this_run: int) -> float:
  """Classifier draws of the examples this run certified."""
  cc = config.certify
  if cc.procedure == "sequential":
    return float(np.sum(np.asarray(rows["samples"])[
        len(rows["samples"]) - examples_this_run:]))
  return float(examples_this_run * (cc.n0 + cc.n))


def _sequential_summary(config, rows) -> dict[str, Any]:
  """procedure = sequential: certified accuracy at the radius with its
  interval, and the samples per decision beside Cohen's n0 + N."""
  cc = config.certify
  if cc.procedure != "sequential":
    return {}
  samples = np.asarray(rows["samples"], np.float64)
  correct = np.asarray(rows["correct"]) == 1
  certified = (np.asarray(rows["predict"]) >= 0) & correct
  k, n = int(certified.sum()), int(certified.size)
  lo, hi = stats.clopper_pearson_interval(k, max(n, 1), 0.95)
  mean = float(samples.mean()) if n else 0.0
  return {"sequential": {
      "radius": float(cc.radius), "sequence": cc.sequence,
      "max_samples": int(cc.max_samples),
      "certified_accuracy": k / max(n, 1),
      "ci_low": float(lo), "ci_high": float(hi),
      "mean_samples": mean,
      "median_samples": float(np.median(samples)) if n else 0.0,
      "cohen_samples": cc.n0 + cc.n,
      "ratio_to_cohen": mean / (cc.n0 + cc.n)}}


def _dual_summary(config, rows) -> dict[str, Any]:
  """The selector's settings and what it did (sigma_method = selector)."""
  if config.certify.sigma_method != "selector":
    return {}
  alpha_sigma, alpha_c = _alphas(config)
  index = np.asarray(rows["sigma_index"], np.int64)
  sigmas = [float(v) for v in config.dual.sigmas]
  return {"dual": {
      "sigmas": sigmas, "selector_sigma": dual_lib.selector_sigma(config),
      "alpha_sigma": alpha_sigma, "alpha_c": alpha_c,
      "selector_n0": config.dual.n0 or config.certify.n0,
      "selector_n": config.dual.n or config.certify.n,
      "selector_abstain_rate": float(np.mean(index < 0)) if index.size else 0.0,
      "chosen": {f"{v:g}": int(np.sum(index == j))
                 for j, v in enumerate(sigmas)},
      # R is min(R_sigma, R_c): how often the selector's radius was smaller.
      "radius_sigma_binding": int(np.sum(
          (index >= 0) & (np.asarray(rows["radius_sigma"]) <
                          np.asarray(rows["radius_c"]))))}}


def _summarize(run: _Run, rows, wall, sigma_time, examples_this_run,
               store_rows_at_start) -> tuple[dict[str, Any], dict]:
  """summary.json's content and the curves of the plot."""
  config, cc = run.config, run.config.certify
  data_dependent = cc.sigma_method != "fixed"
  sigma0 = float(config.noise.sigma)
  summary = analysis.summarize(rows, cc.radii)
  sig = np.asarray(rows["sigma"])
  summary.update({
      "dataset": run.ds.name, "split": run.ds.split,
      "noise": config.noise.kind, "sigma": sigma0,
      "procedure": cc.procedure, "sigma_method": cc.sigma_method,
      "soundness": cc.soundness,
      "data_dependent_sigma": data_dependent,
      "sigma_stats": {"mean": float(sig.mean()), "min": float(sig.min()),
                      "max": float(sig.max()),
                      "mean_minus_sigma0": float(sig.mean() - sigma0)},
      "n0": cc.n0, "n": cc.n, "alpha": cc.alpha, "seed": config.seed,
      # No example can be certified beyond this radius at this N and alpha.
      "radius_cap": _radius_cap(config, sig.max()),
      # Cost of choosing sigma, in forward passes per example, beside
      # CERTIFY's n0 + n.
      "sigma_forward_passes": _sigma_cost(config),
      "certify_forward_passes": cc.n0 + cc.n,
      "noise_version": noise_lib.NOISE_VERSION,
      **_dual_summary(config, rows),
      **_sequential_summary(config, rows),
      # Timing of this run's own work (a resumed run counts only the
      # examples it certified itself).
      "examples_this_run": examples_this_run,
      "wall_time_s": wall, "sigma_opt_time_s": sigma_time,
      "samples_per_s": _samples_this_run(config, rows, examples_this_run)
                       / max(wall - sigma_time, 1e-9)})
  curves = {"data-dependent sigma" if data_dependent else "fixed sigma":
            (np.asarray(rows["radius"]), np.asarray(rows["correct"]))}
  if cc.soundness == "memory":
    mem_summary = analysis.summarize(rows, cc.radii, radius_key="radius_mem",
                                     predict_key="predict_mem")
    if run.store is not None:
      mem_summary.update(run.store.summary(cc.alpha))
      since = 0 if cc.check_full_invariant else store_rows_at_start
      mem_summary["invariant_checked_rows_since"] = since
      mem_summary["invariant_holds"] = bool(
          run.store.check_invariant(since=since))
      run.store.close()
    mem_summary["radius_cap"] = summary["radius_cap"]
    mem_summary["num_changed_this_run"] = int(np.sum(rows["changed"]))
    summary["memory"] = mem_summary
    curves["data-dependent sigma + memory"] = analysis.radius_and_correct(
        rows, radius_key="radius_mem", predict_key="predict_mem")
  summary["provenance"] = provenance.collect(config)
  return summary, curves


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
  cc = config.certify
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  main = distributed.is_main()

  # --- Model, data, store; resume where an interrupted run stopped. -------
  run = _load(config, workdir, out_dir, params, bundle)
  ds, store = run.ds, run.store
  store_rows_at_start = len(store) if store is not None else 0
  names = (COLUMNS + (MEMORY_COLUMNS if cc.soundness == "memory" else ())
           + (SELECTOR_COLUMNS if cc.sigma_method == "selector" else ())
           + (SEQUENTIAL_COLUMNS if cc.procedure == "sequential" else ()))
  rows = {name: [] for name in names}
  sigma_rows = {name: [] for name in SIGMA_COLUMNS}
  state = _shared_resume_state(config, out_dir, ds, store, names)
  done = state["done"]
  if done:
    rows = {n: state["rows"][n].tolist() for n in names}
    if state["sigma_rows"] is not None:
      sigma_rows = {n: state["sigma_rows"][n].tolist()[:done]
                    for n in sigma_rows}
    if main:
      print(f"resuming certification at example {done} of {len(ds)} "
            f"({os.path.join(out_dir, TSV)})", flush=True)
  # A finished run of this config: its summary (and timing) stand as they are.
  finished = np.array([done == len(ds) and main and os.path.exists(
      os.path.join(out_dir, SUMMARY))])
  if bool(distributed.broadcast(finished)[0]):
    if store is not None:
      store.close()
    if not main:
      return {}
    with open(os.path.join(out_dir, SUMMARY)) as f:
      return json.load(f)
  pending = state["pending_memory"]  # committed before a crash, by id
  bar = progress_lib.Progress(len(ds), "certify", unit="examples",
                              enabled=main)
  bar.resume_from(done)

  # --- Certify, examples_per_call at a time; the TSV after each call. -----
  start = time.time()
  sigma_time = 0.0
  for lo in range(done, len(ds), cc.examples_per_call):
    part = ds.take(np.arange(lo, min(lo + cc.examples_per_call, len(ds))))
    # This process's slice of the call; results are gathered in global order.
    mine = part.take(np.arange(len(part))[distributed.split(len(part))])
    t0 = time.time()
    sigma, selection = _choose_sigma(run, part, mine, sigma_rows)
    sigma_time += time.time() - t0
    cert = _certify_call(run, mine, sigma, selection)
    if cc.soundness == "memory":
      mem = {"preds": np.zeros(len(part), np.int64),
             "radii": np.zeros(len(part), np.float64),
             "changed": np.zeros(len(part), np.int64)}
      if store is not None:
        mem, pending = _memory_rule(store, part, cert, pending)
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
    for name in SELECTOR_COLUMNS + SEQUENTIAL_COLUMNS:
      if name in rows:
        rows[name] += cert[name].tolist()
    if main:  # shortest exact floats: read back, they are the issued values
      analysis.write_tsv(os.path.join(out_dir, TSV), rows, float_format=None)
    bar.update(lo + len(part))
  wall = time.time() - start

  # --- Summary, plot. ------------------------------------------------------
  summary, curves = _summarize(run, rows, wall, sigma_time, len(ds) - done,
                               store_rows_at_start)
  if main:
    analysis.write_text(os.path.join(out_dir, SUMMARY),
                        json.dumps(summary, indent=2) + "\n")
    analysis.plot_certified_accuracy(
        curves, os.path.join(out_dir, PLOT),
        title=f"{ds.name} ({len(ds)} test images), N={cc.n}, alpha={cc.alpha}")
  distributed.barrier("certify_dataset done")
  return summary
