r"""ImageNet with ResNet-50, Gaussian augmentation (Cohen et al.).

Reads `tfds:imagenet2012` (prepared in array_record format; see the README's
data section) or an ImageFolder directory or zip with `data=<path>` (train/
and val/ split folders, so `test_split` is 'val' there). Records are read
lazily through grain (`data.pipeline=grain`), one image at a time, with Cohen
et al.'s preprocessing (`data.preprocess=imagenet`): a random-resized 224 crop
for training, resize to 256 and a central 224 crop for evaluation; memory does
not grow with the dataset.

  python -m launch.run --config=dds_jax/configs/imagenet.py:data=<dir> \
      --workdir=runs/imagenet_s025

Args: `data=<dir or tfds>`, `sigma=<float>` (0.25, 0.5, 1.0 in Cohen et al.),
`epochs=<int>`, `runlocal` (tiny smoke settings).
"""

from dds_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, {"data": "tfds", "sigma": 0.25, "epochs": 90,
                                "runlocal": False})
  c = common.base_config()
  if args["data"] == "tfds":
    c.data.name = "tfds:imagenet2012"
    c.data.test_split = "validation"
  else:
    c.data.name = f"imagefolder:{args['data']}"
    c.data.test_split = "val"
  c.data.pipeline = "grain"
  c.data.preprocess = "imagenet"
  c.data.threads = 16
  c.model.name = "resnet50"
  c.model.num_classes = 1000
  c.noise.sigma = args["sigma"]

  c.train.epochs = args["epochs"]
  c.train.batch_size = 256
  c.train.lr = 0.1
  c.train.weight_decay = 1e-4
  c.train.schedule = "step"
  c.train.step_epochs = 30
  c.train.flip = True
  c.train.eval_examples = 500

  # Cohen et al.: every 100th validation image (500), N = 100,000.
  c.certify.n0 = 100
  c.certify.n = 100_000
  c.certify.alpha = 0.001
  c.certify.skip = 100
  c.certify.batch_size = 400
  c.certify.examples_per_call = 4
  c.certify.radii = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

  c.ckpt.every_steps = 2000
  if args["runlocal"]:
    c.train.epochs = 1
    c.train.eval_examples = 8
    c.certify.n0 = 10
    c.certify.n = 100
    c.certify.batch_size = 100
    c.certify.samples_per_block = 50
    c.certify.skip = 1
    c.certify.max = 2
  return c
