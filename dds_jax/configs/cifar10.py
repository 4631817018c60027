r"""CIFAR-10 with the CIFAR ResNet-18: the paper's settings.

Reads the ImageFolder copy (the JPEG q75 zip, see its README) or any
ImageFolder directory/zip given by `data=<path>`; `data=tfds` reads
`tfds:cifar10`. Certification follows Cohen et al.: every 20th test image
(500), N0 = 100, N = 100,000, alpha = 0.001.

Variants: `method=gaussian|smoothadv|macer` x `sigma=0.12|0.25|0.5|1.0`, with
or without `ds` (per-sample sigma in training and data-dependent sigma with
the memory at certification; `launch.run` with `ds` runs the paper's
comparison, `dds_jax.experiment.paper_comparison`, training both a fixed and
a per-sample model). `cpu`: the CIFAR-10 study on a CPU (small CNN, 20
epochs, N = 10,000; docs/cifar10_cpu.md, launch/cifar10_cpu.sh). `gpu`: a
first run on one GPU in minutes (ResNet-18, bf16, N = 10,000; bench/gpu.py).
Settings:

  * gaussian, no `ds`: Cohen et al.'s schedule: SGD lr 0.1, momentum 0.9,
    wd 1e-4, batch 256, 90 epochs, lr x0.1 every 30.
  * with `ds` or `method=smoothadv|macer`: the DDRS scripts' schedule: SGD
    lr 0.01, momentum 0.9, wd 5e-4, batch 128, lr x0.1 every 30 epochs,
    90 epochs here (set `epochs=`). SmoothAdv: 2 PGD steps, eps 0.25, 1
    warm-up epoch, m_train 1. MACER: k = 16 noise copies (DDRS uses 64),
    lambda 12, gamma 8, beta 16, MACER's own hinge (`macer.variant=ddrs` for
    the DDRS script's). DS training: K_tr = 10 ascent steps with m = 64 draws
    on each mini-batch at lr 1e-4 (the DDRS MACER script), from epoch 0
    (`--config.train.ds.start_epoch`).
  * certification with `ds`: K = 100 ascent steps, lr 1e-4, m = 1 (paper).

Commands (one per setting; `<zip>` = path to cifar10-jpeg-q75.zip):

  python -m launch.run --config=dds_jax/configs/cifar10.py:data=<zip>,sigma=0.25 --workdir=runs/c10_gauss_s025
  python -m launch.run --config=dds_jax/configs/cifar10.py:data=<zip>,sigma=0.25,ds --workdir=runs/c10_gauss_ds_s025
  python -m launch.run --config=dds_jax/configs/cifar10.py:data=<zip>,method=smoothadv,sigma=0.25,ds --workdir=runs/c10_sadv_ds_s025
  python -m launch.run --config=dds_jax/configs/cifar10.py:data=<zip>,method=macer,sigma=0.25,ds --workdir=runs/c10_macer_ds_s025

Other args: `epochs=<int>`, `small` (small CNN, 1 epoch, N = 1,000 on 20
test images: a CPU check of the data path), `runlocal` (ResNet-18, 1 epoch,
N = 1,000, 10 images: a CPU smoke test).
"""

from dds_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, {"data": "", "sigma": 0.25, "epochs": 90,
                                "method": "gaussian", "ds": False,
                                "small": False, "runlocal": False,
                                "cpu": False, "gpu": False})
  c = common.base_config()
  c.data.name = ("tfds:cifar10" if args["data"] == "tfds"
                 else f"imagefolder:{args['data']}")
  c.data.class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                        "frog", "horse", "ship", "truck")
  c.model.name = "resnet18"
  c.model.num_classes = 10
  c.noise.sigma = args["sigma"]

  c.train.method = args["method"]
  c.train.epochs = args["epochs"]
  c.train.schedule = "step"
  c.train.step_epochs = 30
  c.train.crop_padding = 4
  c.train.flip = True
  c.train.eval_examples = 500
  if args["method"] == "gaussian" and not args["ds"]:
    c.train.batch_size, c.train.lr, c.train.weight_decay = 256, 0.1, 1e-4
  else:
    c.train.batch_size, c.train.lr, c.train.weight_decay = 128, 0.01, 5e-4
  c.train.num_noise = 16 if args["method"] == "macer" else 1
  c.train.smoothadv.eps = 0.25
  c.train.smoothadv.steps = 2
  c.train.smoothadv.warmup_epochs = 1
  c.train.macer.lbd = 12.0
  c.train.macer.gamma = 8.0
  c.train.macer.beta = 16.0
  c.train.ds.enabled = args["ds"]
  c.train.ds.steps = 10
  c.train.ds.num_samples = 64
  c.train.ds.lr = 1e-4

  c.certify.n0 = 100
  c.certify.n = 100_000
  c.certify.alpha = 0.001
  c.certify.skip = 20
  c.certify.batch_size = 1000
  c.certify.examples_per_call = 10
  c.certify.radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
  c.certify.sigma_method = "ascent" if args["ds"] else "fixed"
  c.certify.soundness = "memory" if args["ds"] else "none"
  c.sigma_opt.steps = 100
  c.sigma_opt.lr = 1e-4
  c.sigma_opt.num_samples = 1

  c.ckpt.every_steps = 1000
  if args["cpu"]:
    _cpu_study(c, args)
  if args["gpu"]:
    _gpu_run(c, args)
  if args["small"]:
    c.model.name = "small_cnn"
    c.train.epochs = 1
    c.train.eval_examples = 100
    c.train.ds.steps = 1
    c.train.ds.num_samples = 1
    c.certify.n = 1000
    c.certify.skip = 500            # 20 test images
  if args["runlocal"]:
    c.train.epochs = 1
    c.train.eval_examples = 100
    c.train.ds.steps = 1
    c.train.ds.num_samples = 1
    c.certify.n = 1000
    c.certify.skip = 1000           # 10 test images
    c.certify.batch_size = 200      # XLA:CPU is faster per image at 200
  return c


def _cpu_study(c, args):
  """The CIFAR-10 study on a 2-core CPU (docs/cifar10_cpu.md).

  The small CNN (~700 training images/s here), one schedule for the fixed and
  the per-sample-sigma model (same seed, epochs, batch, lr), and per-sample
  settings cheap enough to run yet large enough to move the sigma table: one
  ascent step with 2 draws per mini-batch at lr 0.01 (the official K_tr = 10,
  m = 64 runs at a few images/s here). Certification at N = 10,000 (cap 0.80
  at sigma 0.25, so r = 0.75 can be certified), 500 images.
  """
  c.model.name = "small_cnn"
  c.data.holdout = 1000           # for tuning the sigma grid, never the test set
  c.train.epochs = args["epochs"] if args["epochs"] != 90 else 20
  c.train.batch_size, c.train.lr, c.train.weight_decay = 256, 0.1, 5e-4
  c.train.schedule = "cosine"
  c.train.ds.steps = 1
  c.train.ds.num_samples = 2
  c.train.ds.lr = 0.01
  c.certify.n = 10_000
  c.certify.radii = (0.0, 0.25, 0.5, 0.75)
  c.certify.examples_per_call = 20
  c.ckpt.every_steps = 200


def _gpu_run(c, args):
  """A first CIFAR-10 run on one GPU within minutes (bench/gpu.py).

  ResNet-18 at Gaussian sigma, trained and certified in bf16 (parameters
  float32), the CPU study's schedule (batch 256, lr 0.1, cosine, wd 5e-4) for
  `epochs=` epochs (bench/gpu.py fits them to its time), 1000 training images
  held out as for the CPU study, the training split decoded on every core,
  and certification at N = 10,000 in device batches of 4,000.
  """
  c.data.holdout = 1000
  c.data.decode_processes = 0
  c.train.epochs = args["epochs"] if args["epochs"] != 90 else 15
  c.train.batch_size, c.train.lr, c.train.weight_decay = 256, 0.1, 5e-4
  c.train.schedule = "cosine"
  c.train.dtype = "bfloat16"
  c.certify.dtype = "bfloat16"
  c.certify.n = 10_000
  c.certify.radii = (0.0, 0.25, 0.5, 0.75)
  c.certify.batch_size = 4000
  c.certify.examples_per_call = 100
