r"""CIFAR-10 with the CIFAR ResNet-18, Gaussian augmentation (Cohen et al.).

Reads the ImageFolder copy (JPEG q75 zip, see its README) or any ImageFolder
directory/zip given by `data=<path>`; `data=tfds` reads `tfds:cifar10` instead.
Certification follows Cohen: every 20th test image (500), N0 = 100,
N = 100,000, alpha = 0.001.

  python -m launch.run \
      --config=dds_jax/configs/cifar10.py:data=<path>/cifar10-jpeg-q75.zip \
      --workdir=runs/cifar10_s025

Args: `data=<path or tfds>`, `sigma=<float>` (0.12, 0.25, 0.5, 1.0 in the
paper), `epochs=<int>`, `small` (small CNN, 1 epoch, N = 1,000 on 20 test
images: a CPU check of the data path), `runlocal` (ResNet-18, 1 epoch,
N = 1,000, 10 images: a CPU smoke test).
"""

from dds_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, {"data": "", "sigma": 0.25, "epochs": 90,
                                "small": False, "runlocal": False})
  c = common.base_config()
  c.data.name = ("tfds:cifar10" if args["data"] == "tfds"
                 else f"imagefolder:{args['data']}")
  c.data.class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                        "frog", "horse", "ship", "truck")
  c.model.name = "resnet18"
  c.model.num_classes = 10
  c.noise.sigma = args["sigma"]

  # Cohen et al.'s Gaussian schedule: SGD lr 0.1, momentum 0.9, wd 1e-4,
  # step decay x0.1 every 30 epochs, 90 epochs.
  c.train.epochs = args["epochs"]
  c.train.batch_size = 256
  c.train.lr = 0.1
  c.train.weight_decay = 1e-4
  c.train.schedule = "step"
  c.train.step_epochs = 30
  c.train.crop_padding = 4
  c.train.flip = True
  c.train.eval_examples = 500

  c.certify.n0 = 100
  c.certify.n = 100_000
  c.certify.alpha = 0.001
  c.certify.skip = 20
  c.certify.batch_size = 1000
  c.certify.examples_per_call = 10
  c.certify.radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

  c.ckpt.every_steps = 1000
  if args["small"]:
    c.model.name = "small_cnn"
    c.train.epochs = 1
    c.train.eval_examples = 100
    c.certify.n = 1000
    c.certify.skip = 500            # 20 test images
  if args["runlocal"]:
    c.train.epochs = 1
    c.train.eval_examples = 100
    c.certify.n = 1000
    c.certify.skip = 1000           # 10 test images
  return c
