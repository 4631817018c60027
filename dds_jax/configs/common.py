"""The config schema every dds_jax config file shares, and its validation.

A config file's `get_config(arg)` starts from `base_config()` and sets the
values of its experiment; it never adds keys (launchers lock the config, so a
typo in `--config.x=y` fails). `validate` turns impossible values into a
`ConfigError` before any work starts.
"""

from __future__ import annotations

import ml_collections

from dds_jax.certify import BOUNDS
from dds_jax.stats import SEQUENCES
from dds_jax import dual as dual_lib
from dds_jax import validate as validate_lib
from dds_jax.errors import ConfigError
from dds_jax.errors import InputError
from dds_jax.models import MODEL_NAMES

SCHEDULES = ("constant", "step", "cosine")
SIGMA_OPTIMIZERS = ("ascent", "sgd", "adam")
METHODS = ("gaussian", "smoothadv", "macer")

# How a test set is certified: three independent choices (`certify.*`).
PROCEDURES = ("cohen", "sequential")      # Cohen's fixed-N CERTIFY, or
                                          # "certified at certify.radius?"
SIGMA_METHODS = ("fixed", "ascent", "grid", "file", "selector")  # how sigma
                                                  # is chosen
SOUNDNESS = ("none", "memory", "dual")     # how a data-dependent one is sound
TARGETS = ("label", "selector")            # what a model is trained to predict

# Keys that were replaced: old configs fail with a message naming the new key.
RENAMED_KEYS = {
    "sigma_opt.enabled": "certify.sigma_method ('fixed' | 'ascent' | 'grid'"
                         "; 'file' reads sigma_opt.sigma_file)",
    "memory.enabled": "certify.soundness ('none' | 'memory')",
}


def base_config() -> ml_collections.ConfigDict:
  """All keys, with neutral defaults. Grouped by concern."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"          # digits | imagefolder:<dir or zip> | tfds:<name>
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.holdout = 0              # training examples held out as split 'holdout'
  c.data.class_names = ()         # () = sorted class folder names / dataset's own
  c.data.cache_dir = ""           # "" = $DDS_JAX_CACHE or ~/.cache/dds_jax
  c.data.decode_processes = 1     # imagefolder: processes decoding an uncached
                                  # split: 1 serial, 0 one per CPU, n > 1 n
                                  # (small splits are always decoded serially)
  c.data.data_dir = ""            # TFDS data_dir ("" = TFDS default)
  c.data.pipeline = "memory"      # memory (decoded once into RAM) | grain (lazy)
  c.data.preprocess = "none"      # none | imagenet (resize+crop; needs grain)
  c.data.image_size = 224         # imagenet: side of the crop
  c.data.resize = 256             # imagenet: shorter side before the eval crop
  c.data.in_ram = False           # grain, imagefolder: records from a uint8 RAM copy
  c.data.threads = 4              # grain: reader threads
  c.data.prefetch = 4             # grain: batches read ahead

  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.num_classes = 10
  c.model.conv_features = ()      # small_cnn widths; () = the model's default

  c.noise = ml_collections.ConfigDict()
  c.noise.kind = "gaussian"       # gaussian (L2) | uniform (L1)
  c.noise.sigma = 0.25            # training sigma and fixed certification sigma

  c.train = ml_collections.ConfigDict()
  c.train.method = "gaussian"     # Gaussian augmentation (Cohen et al.)
  c.train.epochs = 10
  c.train.batch_size = 128        # global batch
  c.train.lr = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 5e-4
  c.train.schedule = "cosine"     # constant | step | cosine
  c.train.step_epochs = 30        # step schedule: decay every this many epochs
  c.train.step_factor = 0.1
  c.train.warmup_epochs = 0
  c.train.crop_padding = 0        # random crop with this padding (0 = off)
  c.train.flip = False            # random horizontal flip
  c.train.eval_examples = 500     # test examples for the per-epoch noisy accuracy
  c.train.log_every_steps = 50
  c.train.num_noise = 1           # noisy copies per example (MACER's k, m_train)
  c.train.dtype = "float32"       # float32 | bfloat16 (compute; params float32)
  c.train.target = "label"        # label | selector: dual RS's sigma selector
                                  # (dual.*: targets, sigmas, its noise)
  c.train.smoothadv = ml_collections.ConfigDict()
  c.train.smoothadv.eps = 0.25    # DDRS: 2 steps, eps 0.25, 1 warm-up epoch
  c.train.smoothadv.steps = 2
  c.train.smoothadv.warmup_epochs = 1
  c.train.macer = ml_collections.ConfigDict()
  c.train.macer.variant = "macer"  # macer (hinge on the gap, beta) | ddrs
  c.train.macer.lbd = 12.0
  c.train.macer.gamma = 8.0
  c.train.macer.beta = 16.0
  c.train.ds = ml_collections.ConfigDict()
  c.train.ds.enabled = False      # per-sample sigma table
  c.train.ds.start_epoch = 0
  c.train.ds.steps = 1            # K_tr ascent steps per mini-batch
  c.train.ds.lr = 1e-4
  c.train.ds.num_samples = 1      # m draws per ascent step
  c.train.ds.clip = (0.02, 0.98)
  c.train.ds.sigma_min = 0.01
  c.train.ds.bn_mode = "eval"     # eval | train (official scripts: train)

  c.certify = ml_collections.ConfigDict()
  c.certify.n0 = 100
  c.certify.n = 100_000
  c.certify.alpha = 0.001
  c.certify.skip = 1              # Cohen: every skip-th test example ...
  c.certify.max = -1              # ... with index < max (-1: all)
  c.certify.batch_size = 1000     # noisy images per device per forward pass
  c.certify.samples_per_block = 100
  c.certify.dtype = "float32"     # float32 | bfloat16: the base classifier's
                                  # compute dtype (bf16 is a different, still
                                  # fixed, base classifier; params float32)
  c.certify.examples_per_call = 32  # examples per sampler call (rows per flush)
  c.certify.radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
  c.certify.checkpoint = ""       # a parameters-only export dir ("" = workdir)
  c.certify.resume = True         # continue an interrupted run of this config
  c.certify.procedure = "cohen"   # cohen: Cohen's CERTIFY, n0 + n draws |
                                  # sequential: certify_at(certify.radius)
  c.certify.bound = "clopper_pearson"  # cohen: clopper_pearson | randomized
                                       # (exact coverage, one U(0,1) each)
  c.certify.radius = 0.5          # sequential: the radius to certify at ...
  c.certify.sequence = "betting"  # ... with this confidence sequence
                                  # (betting | union | adaptive: the
                                  # Horvath-style reference) ...
  c.certify.max_samples = 100_000  # ... and at most this many draws
  c.certify.sigma_method = "fixed"  # fixed (noise.sigma) | ascent (sigma_opt.*)
                                    # | grid (sigma_grid.*) | file
                                    # (sigma_opt.sigma_file) | selector (the
                                    # smoothed selector of dual.*)
  c.certify.soundness = "none"    # none | memory (memory.*) | dual (with
                                  # sigma_method selector): makes a
                                  # data-dependent sigma's certificates sound
  c.certify.check_full_invariant = False  # memory: re-check every stored
                                          # pair at the end (O(k^2))

  c.sigma_opt = ml_collections.ConfigDict()  # certify.sigma_method = ascent
  c.sigma_opt.steps = 100         # paper: K = 100
  c.sigma_opt.lr = 1e-4           # paper: 1e-4
  c.sigma_opt.num_samples = 1     # m noise draws per step
  c.sigma_opt.clip = (0.02, 0.98)
  c.sigma_opt.sigma_min = 0.01    # floor of sigma (> 0)
  c.sigma_opt.optimizer = "ascent"  # ascent (paper) | sgd | adam (optax)
  c.sigma_opt.examples_per_device = 8
  c.sigma_opt.sigma_file = ""     # sigma_method = file: a sigma.tsv (idx, sigma)

  c.sigma_grid = ml_collections.ConfigDict()  # certify.sigma_method = grid
  # Candidates and pilot draws per candidate (a stream of its own): tuned on
  # held-out digits training images for sigma0 = 0.25 (docs/sigma_grid.md);
  # cost 4 x 1000 = 0.40x CERTIFY's n0 + N at N = 10,000.
  c.sigma_grid.sigmas = (0.15, 0.2, 0.25, 0.3)
  c.sigma_grid.pilot = 1000

  c.memory = ml_collections.ConfigDict()  # certify.soundness = memory
  c.memory.path = ""              # "" = <results dir>/memory.sqlite, or a
                                  # local disk when that is a network FS
  c.memory.network = "refuse"     # a store on NFS & co: refuse | exclusive
                                  # (rollback journal, one process at a time)

  # Dual randomized smoothing (dds_jax.dual): certify.sigma_method = selector,
  # certify.soundness = dual; train.target = selector trains the selector.
  c.dual = ml_collections.ConfigDict()
  c.dual.sigmas = (0.15, 0.2, 0.25, 0.3)  # S: the selector's classes
  c.dual.selector_sigma = 0.0     # s_e, its smoothing noise; 0 = max(S)
  c.dual.selector = ""            # the selector's training workdir or export
  c.dual.selector_model = ""      # "" = model.name (its widths too)
  c.dual.targets = ""             # training: TSV (idx, sigma) of each image
  c.dual.alpha_sigma_fraction = 0.5  # alpha_sigma = this * certify.alpha;
                                     # the classifier gets the rest
  c.dual.n0 = 0                   # the selector's draws; 0 = certify.n0 ...
  c.dual.n = 0                    # ... and certify.n

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0          # certification and sigma: 0 = all devices
  c.mesh.train_devices = 0        # training: 0 = auto (1 on a CPU-only host,
                                  # where 2 were slower; else all devices)
  c.mesh.host_devices = 0         # XLA CPU devices the launchers create before
                                  # JAX starts: 0 = one per core; -1 = leave
                                  # XLA's default (one device)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 500
  c.ckpt.max_to_keep = 2
  c.ckpt.export_dtype = "float32"  # parameters-only export: float32 | bfloat16
  return c


def _renamed(old: str) -> ConfigError:
  return ConfigError(f"config key {old} was replaced by {RENAMED_KEYS[old]}")


def check_renamed_overrides(argv) -> None:
  """A ConfigError naming the new key for a `--config.<old key>` override.

  Launchers call it before absl parses the flags, which would otherwise fail
  on the missing key with a traceback.
  """
  for a in argv:
    name = a.split("=", 1)[0].lstrip("-")
    if name.startswith("config.") and name[len("config."):] in RENAMED_KEYS:
      raise _renamed(name[len("config."):])


def parse_arg(arg: str | None, known: dict[str, object]) -> dict[str, object]:
  """Parses 'small', 'sigma=0.5,small' style config args against defaults.

  Args:
    arg: the text after ':' in `--config=file.py:arg`, or None.
    known: name -> default; a bare word sets a bool default to True.

  Returns:
    `known` updated with the values in arg, converted to the defaults' types.
  """
  out = dict(known)
  for item in filter(None, (arg or "").split(",")):
    k, eq, v = item.partition("=")
    k = k.strip()
    if k not in known:
      raise ConfigError(f"unknown config arg {k!r}; known: {sorted(known)}")
    default = known[k]
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(f"config arg {k!r} needs a value ({k}=...)")
      out[k] = True
    elif isinstance(default, bool):
      out[k] = v.lower() in ("1", "true", "yes")
    else:
      try:
        out[k] = type(default)(v)
      except ValueError:
        raise ConfigError(f"config arg {k}={v!r}: expected "
                          f"{type(default).__name__}") from None
  return out


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys against the schema and values for sense; returns config."""
  def check_keys(have, want, prefix=""):
    for k in have.keys():
      if f"{prefix}{k}" in RENAMED_KEYS:
        raise _renamed(f"{prefix}{k}")
      if k not in want:
        raise ConfigError(f"unknown config key {prefix}{k!r}; known keys: "
                          f"{sorted(want.keys())}")
      if isinstance(want[k], ml_collections.ConfigDict):
        if not isinstance(have[k], ml_collections.ConfigDict):
          raise ConfigError(f"config key {prefix}{k} must be a group")
        check_keys(have[k], want[k], f"{prefix}{k}.")
    for k in want.keys():
      if k not in have:
        raise ConfigError(f"config is missing key {prefix}{k}")
  check_keys(config, base_config())

  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)
  need(config.model.name in MODEL_NAMES,
       f"model.name={config.model.name!r}; expected one of {MODEL_NAMES}")
  need(config.model.num_classes >= 2, "model.num_classes must be >= 2")
  need(not config.model.conv_features or config.model.name == "small_cnn",
       "model.conv_features applies to small_cnn only")
  need(config.noise.kind in validate_lib.NOISE_KINDS,
       f"noise.kind={config.noise.kind!r}; expected one of "
       f"{validate_lib.NOISE_KINDS}")
  need(config.noise.sigma > 0, f"noise.sigma must be > 0; got "
       f"{config.noise.sigma}")  # NaN fails too
  need(config.train.method in METHODS,
       f"train.method={config.train.method!r}; expected one of {METHODS}")
  need(config.train.macer.variant in ("macer", "ddrs"),
       f"train.macer.variant={config.train.macer.variant!r}; expected macer "
       "or ddrs")
  need(config.train.dtype in ("float32", "bfloat16"),
       f"train.dtype={config.train.dtype!r}; expected float32 or bfloat16")
  need(config.certify.dtype in ("float32", "bfloat16"),
       f"certify.dtype={config.certify.dtype!r}; expected float32 or bfloat16")
  need(config.train.ds.bn_mode in ("eval", "train"),
       f"train.ds.bn_mode={config.train.ds.bn_mode!r}; expected eval or train")
  need(config.train.num_noise >= 1, "train.num_noise must be >= 1")
  need(config.train.ds.steps >= 0 and config.train.ds.num_samples >= 1 and
       0 < config.train.ds.sigma_min <= config.noise.sigma,
       "train.ds needs steps >= 0, num_samples >= 1 and 0 < sigma_min <= "
       "noise.sigma")
  need(config.ckpt.export_dtype in ("float32", "bfloat16"),
       "ckpt.export_dtype must be float32 or bfloat16")
  need(config.train.schedule in SCHEDULES,
       f"train.schedule={config.train.schedule!r}; expected one of {SCHEDULES}")
  need(config.train.epochs >= 1 and config.train.batch_size >= 1,
       "train.epochs and train.batch_size must be >= 1")
  need(config.train.lr > 0, "train.lr must be > 0")
  d = config.data
  need(d.pipeline in ("memory", "grain"),
       f"data.pipeline={d.pipeline!r}; expected memory or grain")
  need(d.preprocess in ("none", "imagenet"),
       f"data.preprocess={d.preprocess!r}; expected none or imagenet")
  need(d.preprocess == "none" or d.pipeline == "grain",
       f"data.preprocess={d.preprocess!r} needs data.pipeline=grain (images "
       "are resized and cropped one at a time as they are read)")
  need(0 < d.image_size <= d.resize, f"data.image_size ({d.image_size}) must "
       f"be in (0, data.resize={d.resize}]")
  need(not d.in_ram or d.pipeline == "grain",
       "data.in_ram applies to data.pipeline=grain")
  need(d.threads >= 1 and d.prefetch >= 1,
       "data.threads and data.prefetch must be >= 1")
  need(d.decode_processes >= 0, f"data.decode_processes must be >= 0 (0: one "
       f"per CPU, 1: serial); got {d.decode_processes}")
  c = config.certify
  need(c.n0 >= 1 and c.n >= 1, f"certify.n0 and certify.n must be >= 1; got "
       f"n0={c.n0}, n={c.n}")
  need(0 < c.alpha < 1, f"certify.alpha must be in (0, 1); got {c.alpha}")
  need(c.skip >= 1, f"certify.skip must be >= 1; got {c.skip}")
  need(c.samples_per_block >= 1 and c.batch_size >= c.samples_per_block,
       f"certify.batch_size ({c.batch_size}) must be >= "
       f"certify.samples_per_block ({c.samples_per_block}) >= 1")
  need(c.procedure in PROCEDURES, f"certify.procedure={c.procedure!r}; "
       f"expected one of {PROCEDURES}")
  need(c.bound in BOUNDS, f"certify.bound={c.bound!r}; "
       f"expected one of {BOUNDS}")
  need(c.procedure == "cohen" or c.bound == "clopper_pearson",
       "certify.bound='randomized' is a bound of Cohen's CERTIFY "
       "(certify.procedure='cohen')")
  need(c.radius >= 0, f"certify.radius must be >= 0; got {c.radius}")
  need(c.max_samples >= 1, f"certify.max_samples must be >= 1; got "
       f"{c.max_samples}")
  need(c.sequence in SEQUENCES, f"certify.sequence={c.sequence!r}; "
       f"expected one of {SEQUENCES}")
  need(c.procedure != "sequential" or c.soundness != "dual",
       "certify.procedure='sequential' with certify.soundness='dual' is not "
       "supported: certify the dual certificate with procedure='cohen'")
  need(c.sigma_method in SIGMA_METHODS, f"certify.sigma_method="
       f"{c.sigma_method!r}; expected one of {SIGMA_METHODS}")
  need(c.soundness in SOUNDNESS, f"certify.soundness={c.soundness!r}; "
       f"expected one of {SOUNDNESS}")
  need(c.soundness == "none" or c.sigma_method != "fixed",
       f"certify.soundness={c.soundness!r} needs a data-dependent "
       "certify.sigma_method: with a fixed sigma Cohen's certificates are "
       "sound as they are")
  need(c.sigma_method != "file" or bool(config.sigma_opt.sigma_file),
       "certify.sigma_method='file' needs sigma_opt.sigma_file")
  need(c.soundness != "dual" or c.sigma_method == "selector",
       "certify.soundness='dual' needs certify.sigma_method='selector': the "
       "dual certificate is the selector's radius with the classifier's")
  need(c.sigma_method != "selector" or bool(config.dual.selector),
       "certify.sigma_method='selector' needs dual.selector: the selector's "
       "training workdir or export (train it with train.target=selector)")
  need(config.memory.network in ("refuse", "exclusive"),
       f"memory.network={config.memory.network!r}; expected refuse or "
       "exclusive")
  need(config.train.target in TARGETS, f"train.target="
       f"{config.train.target!r}; expected one of {TARGETS}")
  d = config.dual
  try:
    dual_lib.check_sigmas(d.sigmas)
  except InputError as e:
    raise ConfigError(str(e)) from None
  need(0 < d.alpha_sigma_fraction < 1, f"dual.alpha_sigma_fraction="
       f"{d.alpha_sigma_fraction} must be in (0, 1)")
  need(d.selector_sigma >= 0 and d.n0 >= 0 and d.n >= 0,
       "dual.selector_sigma, dual.n0 and dual.n must be >= 0 (0: default)")
  need(not d.selector_model or d.selector_model in MODEL_NAMES,
       f"dual.selector_model={d.selector_model!r}; expected one of "
       f"{MODEL_NAMES}")
  need(c.examples_per_call >= 1, "certify.examples_per_call must be >= 1")
  need(config.mesh.num_devices >= 0 and config.mesh.train_devices >= 0,
       "mesh.num_devices and mesh.train_devices must be >= 0")
  need(config.mesh.host_devices >= -1, "mesh.host_devices must be >= -1")
  so = config.sigma_opt
  need(so.optimizer in SIGMA_OPTIMIZERS, f"sigma_opt.optimizer="
       f"{so.optimizer!r}; expected one of {SIGMA_OPTIMIZERS}")
  need(so.steps >= 0 and so.num_samples >= 1 and so.lr > 0,
       "sigma_opt needs steps >= 0, num_samples >= 1 and lr > 0")
  need(0 < so.clip[0] < so.clip[1] < 1, f"sigma_opt.clip={so.clip} must "
       "satisfy 0 < lo < hi < 1")
  sg = config.sigma_grid
  need(len(sg.sigmas) >= 1 and all(v > 0 for v in sg.sigmas),
       f"sigma_grid.sigmas={sg.sigmas} must be sigmas > 0")
  need(sg.pilot >= 1, f"sigma_grid.pilot must be >= 1; got {sg.pilot}")
  need(0 < so.sigma_min <= config.noise.sigma, f"sigma_opt.sigma_min="
       f"{so.sigma_min} must be in (0, noise.sigma]")
  return config
