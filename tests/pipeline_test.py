"""The lazy datasets and the grain pipeline (dds_jax.data.records, .pipeline).

The synthetic ImageFolders are ImageNet-like: JPEGs of 256-500 px of random
sizes (`conftest.make_imagefolder`).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dds_jax import ConfigError, DataError
from dds_jax import checkpoint
from dds_jax import data
from dds_jax import models
from dds_jax.configs import common
from dds_jax.configs import digits as digits_config
from dds_jax.configs import imagenet
from dds_jax.data import imagefolder
from dds_jax.data import pipeline
from dds_jax.data import records
from tests import conftest


def _lazy_of(ds):
  return records.LazyDataset(records.ArrayRecords.of(ds),
                             np.arange(len(ds)))


def _equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype, k
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
  """A fixed-size (32x32) ImageFolder the in-memory pipeline can read too."""
  root = str(tmp_path_factory.mktemp("small"))
  return conftest.make_imagefolder(root, 70, splits=("train", "test"),
                                   sizes=(32, 32))


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("imagenet_like"))
  return conftest.make_imagefolder(root, 96)


# ------------------------------------------------- same batches as in memory


@pytest.mark.parametrize("rows", [None, slice(0, 8), slice(8, 16)])
def test_grain_batches_are_the_in_memory_batches(small_folder, rows):
  memory = data.load(f"imagefolder:{small_folder}", "train",
                     cache_dir=os.path.join(small_folder, ".cache"))
  lazy = records.load(f"imagefolder:{small_folder}", "train")
  assert lazy.lazy and not memory.lazy and len(lazy) == len(memory) == 70
  np.testing.assert_array_equal(lazy.labels, memory.labels)
  np.testing.assert_array_equal(lazy.example_ids, memory.example_ids)
  assert lazy.image_shape == memory.image_shape == (32, 32, 3)
  for epoch in (0, 1):
    want = list(data.iterate_batches(memory, 16, shuffle_key_seed=7,
                                     epoch=epoch, drop_remainder=True,
                                     rows=rows))
    got = list(pipeline.TrainBatches(lazy, 16, seed=7, epoch=epoch,
                                     rows=rows, threads=3))
    _equal_batches(want, got)


def test_grain_over_digits_is_the_in_memory_pipeline():
  ds = data.load("digits", "train")
  want = list(data.iterate_batches(ds, 64, shuffle_key_seed=3, epoch=2,
                                   drop_remainder=True))
  got = list(pipeline.TrainBatches(_lazy_of(ds), 64, seed=3, epoch=2))
  _equal_batches(want, got)
  # Through the config, as training reads it.
  config = digits_config.get_config("small")
  config.data.pipeline = "grain"
  lazy = data.load_split(config, "train")
  assert lazy.lazy
  np.testing.assert_array_equal(lazy.example_ids, ds.example_ids)
  _equal_batches(want, list(pipeline.TrainBatches(lazy, 64, seed=3, epoch=2)))


def test_two_processes_rows_make_the_one_process_batch(small_folder):
  lazy = records.load(f"imagefolder:{small_folder}", "train")
  one = list(pipeline.TrainBatches(lazy, 16, seed=1, epoch=0))
  halves = [list(pipeline.TrainBatches(lazy, 16, seed=1, epoch=0, rows=r))
            for r in (slice(0, 8), slice(8, 16))]
  for whole, a, b in zip(one, *halves):
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))


def test_iterator_state_resumes_without_rereading(small_folder, monkeypatch):
  lazy = records.load(f"imagefolder:{small_folder}", "train")
  full = list(pipeline.TrainBatches(lazy, 16, seed=2, epoch=1))
  first = pipeline.TrainBatches(lazy, 16, seed=2, epoch=1, threads=1,
                                prefetch=1)
  it = iter(first)
  head = [next(it), next(it)]
  state = first.get_state()
  assert json.loads(json.dumps(state)) == state   # JSON, for orbax
  assert first.next_batch == 2
  read = []
  decode = imagefolder._decode_image
  monkeypatch.setattr(imagefolder, "_decode_image",
                      lambda b, name: read.append(name) or decode(b, name))
  rest = list(pipeline.TrainBatches(lazy, 16, seed=2, epoch=1, state=state))
  _equal_batches(full, head + rest)
  # Files are named by example id. No example of the first two batches is
  # read again (the first iterator may still be reading ahead: later ones).
  ids = {int(n.rsplit("/", 1)[-1][:-4]) for n in read}
  assert ids == {int(i) for b in rest for i in b["example_ids"]}
  assert not ids & {int(i) for b in head for i in b["example_ids"]}
  with pytest.raises(Exception, match="epoch 1, not 0"):
    pipeline.TrainBatches(lazy, 16, seed=2, epoch=0, state=state)


# --------------------------------------------------------- lazy reading


def test_select_decodes_only_the_selected_examples(imagenet_like,
                                                   monkeypatch):
  read = []
  decode = imagefolder._decode_image
  monkeypatch.setattr(imagefolder, "_decode_image",
                      lambda b, name: read.append(name) or decode(b, name))
  ds = records.load(f"imagefolder:{imagenet_like}", "val",
                    preprocess=records.Preprocess("imagenet"))
  assert not read                               # listing decodes nothing
  chosen = data.select(ds, skip=10)             # Cohen's every 10th image
  assert not read
  assert chosen.image_shape == (224, 224, 3)
  assert len(read) == 1                         # image_shape: first record
  np.testing.assert_array_equal(chosen.example_ids, np.arange(0, 96, 10))
  assert chosen.labels.tolist() == [i % 4 for i in range(0, 96, 10)]
  read.clear()
  images = chosen.take([2, 3]).images
  assert images.shape == (2, 224, 224, 3) and images.dtype == np.float32
  assert [n.rsplit("/", 1)[-1] for n in read] == ["000020.jpg", "000030.jpg"]
  assert 0 <= images.min() and images.max() <= 1


def test_imagenet_evaluation_preprocessing_is_resize_and_center_crop():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = records.Preprocess("imagenet").evaluate(image)
  # torchvision: Resize(256) then CenterCrop(224).
  want = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
  top, left = (256 - 224) // 2, (341 - 224) // 2
  np.testing.assert_array_equal(out, want[top:top + 224, left:left + 224])
  gray = rng.integers(0, 256, (500, 260, 1), dtype=np.uint8)
  assert records.Preprocess("imagenet").evaluate(gray).shape == (224, 224, 1)


def test_random_resized_crop_is_keyed_and_in_range():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  pre = records.Preprocess("imagenet", size=64, resize=73)
  a = pre.train(image, seed=0, epoch=0, example_id=5)
  assert a.shape == (64, 64, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, pre.train(image, 0, 0, 5))  # a function
  assert not np.array_equal(a, pre.train(image, 0, 1, 5))      # of the epoch
  assert not np.array_equal(a, pre.train(image, 0, 0, 6))      # and the id
  areas, ratios = [], []
  for k in range(2000):
    top, left, h, w = records.random_resized_crop_box(
        375, 500, np.random.default_rng(k))
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    areas.append(h * w / (375 * 500))
    ratios.append(w / h)
  # Scale [0.08, 1] and aspect ratio [3/4, 4/3] (up to rounding).
  assert 0.075 < min(areas) and max(areas) <= 1.0
  assert 0.74 < min(ratios) and max(ratios) < 1.35
  assert 0.3 < np.mean(areas) < 0.7


def test_mixed_sizes_need_the_imagenet_preprocessing(imagenet_like):
  ds = records.load(f"imagefolder:{imagenet_like}", "val")
  with pytest.raises(DataError, match="preprocess='imagenet'"):
    _ = ds.take(np.arange(5)).images
  with pytest.raises(DataError, match="same size"):
    data.load(f"imagefolder:{imagenet_like}", "val",
              cache_dir=os.path.join(imagenet_like, ".cache"))


def test_bad_pipeline_settings_are_config_errors():
  c = digits_config.get_config("small")
  c.data.preprocess = "imagenet"
  with pytest.raises(ConfigError, match="needs data.pipeline=grain"):
    common.validate(c)
  c.data.pipeline = "stream"
  with pytest.raises(ConfigError, match="data.pipeline"):
    common.validate(c)
  with pytest.raises(ConfigError, match="data.preprocess"):
    records.Preprocess("random_crop")
  c = imagenet.get_config("data=/nowhere,runlocal")
  assert (c.data.pipeline, c.data.preprocess) == ("grain", "imagenet")
  common.validate(c)


def test_tfds_mock_data_through_grain():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = digits_config.get_config("small")
  c.data.name, c.data.pipeline = "tfds:mnist", "grain"
  with tfds.testing.mock_data(num_examples=40):
    ds = data.load_split(c, "train")
    assert ds.lazy and len(ds) == 40 and ds.num_classes == 10
    assert ds.image_shape == (28, 28, 1)
    batches = list(pipeline.TrainBatches(ds, 16, seed=0, epoch=0, threads=2))
    eager = data.load("tfds:mnist", "train")
  assert len(batches) == 2
  order = pipeline.local_order(40, 16, seed=0, epoch=0).reshape(-1)
  got = np.concatenate([b["images"] for b in batches])
  np.testing.assert_array_equal(got, eager.images[order])
  np.testing.assert_array_equal(
      np.concatenate([b["labels"] for b in batches]), eager.labels[order])


# ------------------------------------------------ training on the stream


def _imagenet_flags(folder, workdir, *extra):
  return [f"--config=dds_jax/configs/imagenet.py:data={folder},runlocal",
          f"--workdir={workdir}", "--config.model.name=small_cnn",
          "--config.model.num_classes=4", "--config.data.image_size=32",
          "--config.data.resize=36", "--config.data.threads=2",
          "--config.train.batch_size=16", "--config.train.lr=0.01",
          "--config.train.eval_examples=16", *extra]


def _params(workdir):
  c = imagenet.get_config("runlocal")
  c.model.name, c.model.num_classes = "small_cnn", 4
  bundle = models.build_from_config(c, (32, 32, 3))
  template = jax.eval_shape(bundle.init, jax.random.key(0))
  out = checkpoint.Checkpointer(workdir, create=False).restore(template)
  return out["step"], jax.tree.leaves(out["params"])


def test_sigkill_mid_epoch_and_resume_equal_an_uninterrupted_run(
    imagenet_like, tmp_path):
  env = conftest.subprocess_env(1)
  run = [sys.executable, "-m", "launch.train"]
  extra = ("--config.train.epochs=2", "--config.ckpt.every_steps=5")
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  res = subprocess.run(run + _imagenet_flags(imagenet_like, full, *extra),
                       cwd=conftest.REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  conftest.sigkill_after_checkpoint(
      run + _imagenet_flags(imagenet_like, killed, *extra), killed, 5)
  latest = checkpoint.Checkpointer(killed, create=False)
  assert latest.read_meta()["batch"] not in (0, 6)     # mid-epoch
  assert latest.read_data_state()["grain"]["next_index"] > 0
  res = subprocess.run(run + _imagenet_flags(imagenet_like, killed, *extra),
                       cwd=conftest.REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming from step" in res.stdout
  assert "data iterator state" in res.stdout
  step_a, params_a = _params(full)
  step_b, params_b = _params(killed)
  assert step_a == step_b == 12
  for a, b in zip(params_a, params_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_rss_mb(args):
  res = subprocess.run([sys.executable, "-c", _RSS, sys.executable, *args],
                       cwd=conftest.REPO, env=conftest.subprocess_env(1),
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  return int(res.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
  """Training and certifying on 500 and 2,000 ImageNet-size JPEGs per split.

  Decoded whole at their stored size as float32 (what the in-memory pipeline
  would hold), 1,500 more images would be about 2.5 GB more (0.9 GB at
  224x224); read lazily the peak RSS stays within 150 MB.
  """
  rss = {}
  for n in (500, 2000):
    folder = conftest.make_imagefolder(str(tmp_path / f"d{n}"), n, seed=n)
    work = str(tmp_path / f"w{n}")
    train = _peak_rss_mb(["-m", "launch.train", *_imagenet_flags(
        folder, work, "--config.train.epochs=1",
        "--config.train.batch_size=50")])
    certify = _peak_rss_mb(["-m", "launch.certify", *_imagenet_flags(
        folder, work, "--config.certify.skip=100", "--config.certify.max=-1")])
    rss[n] = (train, certify)
  print("peak RSS (MB), 500 vs 2,000 images:", rss)
  assert abs(rss[2000][0] - rss[500][0]) < 150, rss
  assert abs(rss[2000][1] - rss[500][1]) < 150, rss


def test_one_resnet50_step_on_imagenet_size_jpegs(tmp_path):
  """The ImageNet config itself (ResNet-50 at 224x224, random-resized crops):
  one training step and the evaluation, on two images per split. The one
  ResNet-50 compilation of the suite (about a minute on 2 CPU cores)."""
  folder = conftest.make_imagefolder(str(tmp_path / "d"), 2)
  work = str(tmp_path / "w")
  res = subprocess.run(
      [sys.executable, "-m", "launch.train",
       f"--config=dds_jax/configs/imagenet.py:data={folder},runlocal",
       f"--workdir={work}", "--config.model.num_classes=4",
       "--config.train.batch_size=2", "--config.train.eval_examples=2",
       "--config.data.threads=2"],
      cwd=conftest.REPO, env=conftest.subprocess_env(1), capture_output=True,
      text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(work, "metrics.jsonl")) as f:
    last = json.loads(f.read().splitlines()[-1])
  assert last["step"] == 1 and np.isfinite(last["train_loss"])
  with open(os.path.join(work, "export", "export.json")) as f:
    meta = json.load(f)
  assert meta["model"] == "resnet50" and meta["image_shape"] == [224, 224, 3]


@pytest.mark.parametrize("saved", [True, False])
def test_a_resume_at_any_batch_of_an_epoch_continues_there(small_folder,
                                                           saved):
  """Also at the epoch's end, and from a checkpoint without iterator state
  (the batch index of its metadata is used then)."""
  from dds_jax import train  # pylint: disable=g-import-not-at-top
  config = digits_config.get_config("small")
  config.train.batch_size = 16
  lazy = records.load(f"imagefolder:{small_folder}", "train")
  full = list(pipeline.TrainBatches(lazy, 16, seed=config.seed, epoch=1))

  class Ckpt:  # what train._train_batches asks of a Checkpointer
    def __init__(self, first):
      self.first = first

    def read_data_state(self):
      return {"epoch": 1, "grain": {"next_index": self.first}} if saved else None

  for first in range(len(full) + 1):
    got = list(train._train_batches(config, Ckpt(first), lazy, 1, first, None))
    _equal_batches(full[first:], got)
