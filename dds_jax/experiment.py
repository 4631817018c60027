"""Comparisons of certification runs on the same images: what `launch.run` runs.

`paper_comparison(config, workdir)` is the paper's experiment in one call:

  1. trains two models with the same seed and schedule, one at fixed sigma
     (`<workdir>/train_fixed`) and one with a per-sample sigma table
     (`train.ds`, `<workdir>/train_ds`);
  2. certifies the same test images three times (`certify_dataset`): the
     fixed-trained model at fixed sigma (the baseline, `fixed_fixed/`), the
     fixed-trained model with the config's data-dependent sigma method
     (`fixed_<method>/`) and the per-sample-trained model with it
     (`ds_<method>/`); the data-dependent runs go through the memory;
  3. writes `comparison.md` (and `comparison.json`): certified accuracy with
     95% Clopper-Pearson intervals, each data-dependent row made sound by
     the memory (the paper's classifier) with its changed count, and each
     row's paired comparison
     with the baseline (McNemar's exact test and Newcombe's interval of the
     difference, `dds_jax.analysis.paired_comparison`), radii beyond what N
     and alpha can certify marked; the histogram of the trained sigma table;
     and `certified_accuracy.png`.

`compare_fixed_and_ds(config, workdir)` does step 2-3 for one trained model:
fixed sigma against the config's data-dependent method (`fixed/`, `ds/`).

Both resume: training from its checkpoints, each certification from its TSV.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dds_jax import analysis
from dds_jax import checkpoint as ckpt_lib
from dds_jax import data as data_lib
from dds_jax import distributed
from dds_jax import dual as dual_lib
from dds_jax import evaluate
from dds_jax import progress as progress_lib
from dds_jax import sigma_opt
from dds_jax import train
from dds_jax.errors import ConfigError

COMPARISON = "comparison.md"
COMPARISON_JSON = "comparison.json"
PLOT = "certified_accuracy.png"
MEMORY_KEYS = ("radius_mem", "predict_mem")


@dataclasses.dataclass(frozen=True)
class Condition:
  """One certification run of a comparison.

  Attributes:
    name: the row's name in the table.
    model_dir: the training workdir (its export or checkpoints).
    out_dir: where the run's files go.
    sigma_method: `certify.sigma_method` of the run ('fixed', 'ascent', ...);
      a data-dependent one runs with `certify.soundness = 'memory'`.
    overrides: config values of this run only, by dotted key (e.g.
      {"sigma_grid.pilot": 500}).
    soundness: `certify.soundness` ('' = 'memory' for a data-dependent
      sigma, 'none' for a fixed one; 'dual' with the selector).
  """

  name: str
  model_dir: str
  out_dir: str
  sigma_method: str
  overrides: tuple[tuple[str, Any], ...] = ()
  soundness: str = ""

  @property
  def sound_by(self) -> str:
    """certify.soundness of the run: as given, else 'memory' for a
    data-dependent sigma and 'none' for a fixed one."""
    return self.soundness or ("none" if self.sigma_method == "fixed"
                              else "memory")


def _condition_config(config, cond: Condition) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.certify.sigma_method = cond.sigma_method
    cfg.certify.soundness = cond.sound_by
    for key, value in cond.overrides:
      group, name = key.rsplit(".", 1)
      node = cfg
      for part in group.split("."):
        node = node[part]
      node[name] = value
  return cfg


def compare(config: ml_collections.ConfigDict, conditions: list[Condition],
            workdir: str, *, memory_rows: str = "all",
            notes: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
  """Certifies each condition and compares them with the first (baseline).

  Args:
    config: the shared config (test set, N, alpha, sigma settings).
    conditions: the runs; the first is the baseline of the paired tests.
    workdir: receives comparison.md, comparison.json and the plot.
    memory_rows: 'all' (default): a "+ memory" row (the sound classifier)
      for each data-dependent row; 'best': only for the data-dependent row
      of highest ACR without the memory; 'none': no memory rows.
    notes: extra lines for comparison.md.

  Returns:
    ({"summaries": by row, "paired": by row, ...}, the Markdown text); on
    processes other than 0, ({"summaries": by certified row}, "").
  """
  test_ds = data_lib.load_split(config, config.data.test_split)
  summaries, columns, keys, caps = {}, {}, {}, {}
  loaded = {}
  for cond in conditions:
    if cond.model_dir not in loaded:
      loaded[cond.model_dir] = ckpt_lib.restore_params(
          config, cond.model_dir, test_ds.image_shape)
    bundle, params = loaded[cond.model_dir]
    summaries[cond.name] = evaluate.certify_dataset(
        _condition_config(config, cond), cond.model_dir, out_dir=cond.out_dir,
        params=params, bundle=bundle)
  if not distributed.is_main():  # process 0 reads the TSVs and writes
    return {"summaries": summaries}, ""
  for cond in conditions:
    columns[cond.name] = analysis.read_tsv(
        os.path.join(cond.out_dir, evaluate.TSV))
    keys[cond.name] = ("radius", "predict")
    caps[cond.name] = summaries[cond.name]["radius_cap"]
  with_memory = [c.name for c in conditions if c.sound_by == "memory"
                 and memory_rows != "none"]
  if memory_rows == "best" and with_memory:
    with_memory = [max(with_memory, key=lambda n: summaries[n]["acr"])]
  memory_names = {}
  for name in with_memory:
    row = f"{name} + memory"
    memory_names[row] = name
    summaries[row] = summaries[name]["memory"]
    columns[row] = columns[name]
    keys[row] = MEMORY_KEYS
    caps[row] = caps[name]

  runs = {name: {"columns": columns[name], "summary": summaries[name],
                 "keys": keys[name]} for name in summaries}
  result, report = analysis.paired_report(
      runs, list(config.certify.radii), sigma0=float(config.noise.sigma))
  base = result["baseline"]
  lines = [report]
  lines += analysis.certify_notes({c.name: summaries[c.name]
                                   for c in conditions})
  caps_text = ", ".join(f"{n}: {c:.3f}" for n, c in caps.items()
                        if n not in memory_names)
  lines.append(f"Largest certifiable radius at N = {config.certify.n}, "
               f"alpha = {config.certify.alpha} (sigma * Phi^-1(alpha^(1/N)) "
               f"at the largest sigma): {caps_text}.")
  lines += list(notes)
  text = "\n".join(lines) + "\n"
  result.update(summaries=summaries, radius_caps=caps)
  analysis.write_text(os.path.join(workdir, COMPARISON), text)
  analysis.write_text(os.path.join(workdir, COMPARISON_JSON),
                      json.dumps(result, indent=2, default=str) + "\n")
  curves = {name: analysis.radius_and_correct(
      columns[name], radius_key=keys[name][0], predict_key=keys[name][1])
            for name in summaries}
  analysis.plot_certified_accuracy(
      curves, os.path.join(workdir, PLOT),
      title=f"{summaries[base]['dataset']} (N={config.certify.n})")
  return result, text


def compare_fixed_and_ds(config: ml_collections.ConfigDict,
                         workdir: str) -> tuple[dict[str, Any], str]:
  """One trained model (in workdir): fixed sigma vs the config's method.

  Certifies into workdir/fixed and workdir/ds ('ascent' when the config's
  method is 'fixed'); rows "fixed sigma", "data-dependent sigma" and
  "data-dependent sigma + memory".
  """
  method = config.certify.sigma_method
  method = "ascent" if method == "fixed" else method
  return compare(config, [
      Condition("fixed sigma", workdir, os.path.join(workdir, "fixed"),
                "fixed"),
      Condition("data-dependent sigma", workdir, os.path.join(workdir, "ds"),
                method)], workdir)


def sigma_table_histogram(table: np.ndarray, sigma0: float,
                          bins: int = 8) -> str:
  """A text histogram of a trained per-sample sigma table."""
  return "\n".join(
      [f"Per-sample sigma table after training ({table.size} training "
       f"images, sigma0 = {sigma0:g}): mean {table.mean():.4f}, std "
       f"{table.std():.4f}, min {table.min():.4f}, max {table.max():.4f}", ""]
      + analysis.histogram_lines(table, bins, edge_format=".3f"))


def read_sigma_table(model_dir: str) -> np.ndarray:
  """The sigma column of `<model_dir>/export/sigma_table.tsv`."""
  path = os.path.join(model_dir, train.EXPORT_DIR, train.SIGMA_TABLE)
  return np.asarray(analysis.read_tsv(path, required=("idx", "sigma"))["sigma"],
                    np.float64)


def train_both(config: ml_collections.ConfigDict, workdir: str
               ) -> dict[str, str]:
  """Trains (or finds trained) the fixed- and the per-sample-sigma model.

  Same seed and schedule; `train.ds.enabled` cleared for the first and set
  for the second. Returns {"fixed": <workdir>/train_fixed, "ds":
  <workdir>/train_ds}.
  """
  models = {}
  for kind, enabled in (("fixed", False), ("ds", True)):
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.train.ds.enabled = enabled
      cfg.train.target = "label"
    models[kind] = os.path.join(workdir, f"train_{kind}")
    train.train_and_evaluate(cfg, models[kind])
  return models


def paper_comparison(config: ml_collections.ConfigDict,
                     workdir: str) -> tuple[dict[str, Any], str]:
  """Trains a fixed- and a per-sample-sigma model, certifies, compares.

  See the module docstring. `config.certify.sigma_method` is the
  data-dependent method of the two data-dependent rows ('ascent' when it is
  'fixed'); `config.train.ds.*` are the per-sample settings (`train.ds.enabled`
  is set for the second model and cleared for the first).
  """
  method = config.certify.sigma_method
  method = "ascent" if method == "fixed" else method
  models = train_both(config, workdir)
  conditions = [
      Condition("fixed train, fixed sigma", models["fixed"],
                os.path.join(workdir, "fixed_fixed"), "fixed"),
      Condition(f"fixed train, {method} sigma", models["fixed"],
                os.path.join(workdir, f"fixed_{method}"), method),
      Condition(f"per-sample train, {method} sigma", models["ds"],
                os.path.join(workdir, f"ds_{method}"), method),
  ]
  main = distributed.is_main()  # process 0 wrote the export: it reads it
  table = read_sigma_table(models["ds"]) if main else None
  notes = ("", sigma_table_histogram(table, config.noise.sigma)) if main else ()
  result, text = compare(config, conditions, workdir, notes=notes)
  if main:
    result["sigma_table"] = {"mean": float(table.mean()),
                             "std": float(table.std()),
                             "min": float(table.min()),
                             "max": float(table.max())}
  return result, text


def grid_sigma_targets(config: ml_collections.ConfigDict, model_dir: str,
                       path: str, chunk: int = 200) -> str:
  """The grid method's sigma for every training image: a selector's targets.

  Runs `sigma_opt.select_sigma_grid` (`sigma_grid.*`, the certification's N
  and alpha) with the model of `model_dir` over `data.train_split` and
  writes `path` (TSV idx, sigma), `chunk` images at a time; an interrupted
  run continues after the last row written. No label is used.

  Returns:
    path.
  """
  ds = data_lib.load_split(config, config.data.train_split)
  cc, sg = config.certify, config.sigma_grid
  done = {"idx": [], "sigma": []}
  if os.path.exists(path):
    old = analysis.read_tsv(path, required=("idx", "sigma"))
    k = len(old["idx"])
    if not np.array_equal(old["idx"], ds.example_ids[:k]):
      raise ConfigError(f"{path} does not hold the first {k} training "
                        "images of this config; move it away to start over")
    done = {"idx": old["idx"].tolist(), "sigma": old["sigma"].tolist()}
  start = len(done["idx"])
  if start == len(ds):
    return path
  mesh = distributed.make_mesh(config.mesh.num_devices or None)
  bundle, params = ckpt_lib.restore_params(config, model_dir, ds.image_shape,
                                           mesh)
  params = distributed.replicate(params, mesh)
  key = jax.random.key(config.seed)
  bar = progress_lib.Progress(len(ds), "grid sigma of training images",
                              unit="images", enabled=distributed.is_main())
  bar.resume_from(start)
  for lo in range(start, len(ds), chunk):
    part = ds.take(np.arange(lo, min(lo + chunk, len(ds))))
    mine = part.take(np.arange(len(part))[distributed.split(len(part))])
    choice = sigma_opt.select_sigma_grid(
        bundle.apply_fn, params, mine.images, key, grid=tuple(sg.sigmas),
        pilot=sg.pilot, n=cc.n, alpha=cc.alpha, sigma0=config.noise.sigma,
        noise=config.noise.kind, example_ids=mine.example_ids,
        batch_size=cc.batch_size, samples_per_block=cc.samples_per_block,
        mesh=mesh)
    done["idx"] += part.example_ids.tolist()
    done["sigma"] += distributed.gather_rows(choice.sigma).tolist()
    if distributed.is_main():
      analysis.write_tsv(path, done, float_format=None)
    bar.update(lo + len(part))
  distributed.barrier("grid_sigma_targets done")
  return path


DUAL_PROMISES = (
    "",
    "What each certificate promises. Fixed sigma: each certificate holds with "
    "probability >= 1 - alpha. Data-dependent sigma + memory: the answers "
    "depend on the order of the queries, and all k certificates issued so "
    "far hold together with probability >= 1 - k * alpha (every server must "
    "share the store). Dual: each certificate holds with probability >= 1 - "
    "(alpha_sigma + alpha_c) = 1 - alpha, whatever was asked before; no "
    "state. Rows without '+ memory' or 'dual' use a data-dependent sigma "
    "without either and are not sound certificates; they are shown for "
    "reference.",
)


def dual_comparison(config: ml_collections.ConfigDict, workdir: str,
                    model: str = "ds") -> tuple[dict[str, Any], str]:
  """Fixed sigma, data-dependent sigma + memory, and dual RS, on one model.

  The models are the main job's (`train_both`, in workdir). Into
  `<workdir>/dual_<model>/`:

    1. the selectors' targets: the per-sample sigma table of the
       per-sample-trained model (`table`), and the grid method's sigma of
       every training image with this model (`grid`,
       `grid_sigma_targets`);
    2. one selector per target (`train.target = 'selector'`, `dual.*`);
    3. certifications of the same test images at the same alpha: fixed
       sigma (the baseline) and the grid with the memory (the main job's
       directories, reused when they are complete), the table selector with
       the memory, and each selector with dual soundness;
    4. comparison.md / .json with the paired tests.

  Args:
    model: 'ds' (the per-sample-trained model) or 'fixed'.
  """
  if model not in ("ds", "fixed"):
    raise ConfigError(f"model must be 'ds' or 'fixed', not {model!r}")
  models = train_both(config, workdir)
  out = os.path.join(workdir, f"dual_{model}")
  os.makedirs(out, exist_ok=True)
  targets = {
      "table": os.path.join(models["ds"], train.EXPORT_DIR, train.SIGMA_TABLE),
      "grid": grid_sigma_targets(config, models[model],
                                 os.path.join(out, "grid_targets.tsv"))}
  selectors = {}
  for name, path in targets.items():
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.train.target = "selector"
      cfg.train.ds.enabled = False
      cfg.dual.targets = path
    selectors[name] = os.path.join(out, f"selector_{name}")
    train.train_and_evaluate(cfg, selectors[name])
  prefix = "per-sample train" if model == "ds" else "fixed train"
  sel = lambda name: (("dual.selector", selectors[name]),)
  conditions = [
      Condition(f"{prefix}, fixed sigma", models[model],
                os.path.join(workdir, f"{model}_fixed"), "fixed"),
      Condition(f"{prefix}, grid sigma", models[model],
                os.path.join(workdir, f"{model}_grid"), "grid"),
      Condition(f"{prefix}, selector (table targets)", models[model],
                os.path.join(out, "selector_table_memory"), "selector",
                sel("table"), "memory"),
      Condition(f"{prefix}, dual (table targets)", models[model],
                os.path.join(out, "dual_table"), "selector", sel("table"),
                "dual"),
      Condition(f"{prefix}, dual (grid targets)", models[model],
                os.path.join(out, "dual_grid"), "selector", sel("grid"),
                "dual"),
  ]
  main = distributed.is_main()
  notes = DUAL_PROMISES
  if main:
    notes += ("", "Selector targets (element of dual.sigmas nearest each "
              "training image's sigma, in log sigma):")
    for name, path in targets.items():
      sig = np.asarray(list(analysis.read_sigma_by_id(path).values()))
      idx = dual_lib.targets_from_sigmas(sig, config.dual.sigmas)
      counts = ", ".join(f"{v:g}: {int(np.sum(idx == j))}"
                         for j, v in enumerate(config.dual.sigmas))
      notes += (f"  {name}: {counts} ({sig.size} images)",)
  return compare(config, conditions, out, notes=notes)


# Settings of the grid method compared by `tune_sigma_grid`: (name, grid,
# pilot draws per candidate). The cost of a setting is len(grid) * pilot
# forward passes per image.
GRID_SETTINGS = (
    ("7 sigmas x 1000", (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5), 1000),
    ("7 sigmas x 500", (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5), 500),
    ("5 sigmas x 1000", (0.12, 0.15, 0.2, 0.25, 0.3), 1000),
    ("5 sigmas x 500", (0.12, 0.15, 0.2, 0.25, 0.3), 500),
    ("4 sigmas x 1000", (0.15, 0.2, 0.25, 0.3), 1000),
    ("7 sigmas x 700", (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5), 700),
    ("6 sigmas x 800", (0.15, 0.2, 0.25, 0.3, 0.4, 0.5), 800),
    ("4 sigmas x 1250", (0.15, 0.2, 0.25, 0.3), 1250),
)


def grid_settings(names=()) -> tuple:
  """The GRID_SETTINGS of these names, in order (all when empty)."""
  known = {name: row for row in GRID_SETTINGS for name in [row[0]]}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ConfigError(f"unknown grid setting(s) {unknown}; known: "
                      f"{list(known)}")
  return tuple(known[n] for n in names) if names else GRID_SETTINGS


def tune_sigma_grid(config: ml_collections.ConfigDict, model_dir: str,
                    workdir: str, settings=GRID_SETTINGS
                    ) -> tuple[dict[str, Any], str]:
  """Compares grid settings with fixed sigma on held-out training images.

  Certifies `config.data.test_split` (set it to 'holdout', with
  `data.holdout > 0` both here and when the model was trained, so that the
  images were never trained on and the test set is never looked at) at fixed
  sigma and with each setting of the grid method; the table and the paired
  tests against fixed sigma go to `<workdir>/comparison.md`.
  """
  if config.data.test_split != data_lib.HOLDOUT_SPLIT:
    raise ConfigError(
        f"tune_sigma_grid certifies held-out training images: set "
        f"data.test_split={data_lib.HOLDOUT_SPLIT!r} (and data.holdout > 0), "
        f"not {config.data.test_split!r}.")
  conditions = [Condition("fixed sigma", model_dir,
                          os.path.join(workdir, "fixed"), "fixed")]
  for name, grid, pilot in settings:
    slug = name.replace(" ", "")
    conditions.append(Condition(
        f"grid {name}", model_dir, os.path.join(workdir, f"grid_{slug}"),
        "grid", (("sigma_grid.sigmas", tuple(grid)),
                 ("sigma_grid.pilot", int(pilot)))))
  return compare(config, conditions, workdir, memory_rows="none")
