"""The benchmark scripts' helpers: the GPU run's data and plan, a simulation."""

import os
import zipfile

import numpy as np
import pytest

from bench import gpu_data
from dds_jax.data import imagefolder
from tests import conftest


def _zip_of(root: str, path: str) -> str:
  with zipfile.ZipFile(path, "w") as z:
    for d, _, files in os.walk(root):
      for f in sorted(files):
        full = os.path.join(d, f)
        z.write(full, os.path.relpath(full, root))
  return path


def test_the_copy_holds_the_train_split_and_every_skip_th_test_image(tmp_path):
  root = conftest.make_imagefolder(str(tmp_path / "src"), 60,
                                   splits=("train", "test"), sizes=(8, 8))
  src = _zip_of(root, str(tmp_path / "src.zip"))
  out = str(tmp_path / "copy.zip")
  r = gpu_data.repack(src, out, skip=20, max_test=3)
  assert (r["train"], r["test"]) == (60, 3)
  cache = str(tmp_path / "cache")
  full = imagefolder.load_uint8(src, "test", cache_dir=cache)
  copy = imagefolder.load_uint8(out, "test", cache_dir=cache)
  # Test image i of the copy is official test image 20 i, byte for byte.
  official = [gpu_data.official_idx(i, 20) for i in range(3)]
  np.testing.assert_array_equal(copy.images, full.images[official])
  np.testing.assert_array_equal(copy.labels, full.labels[official])
  np.testing.assert_array_equal(
      imagefolder.load_uint8(out, "train", cache_dir=cache).images,
      imagefolder.load_uint8(src, "train", cache_dir=cache).images)


def test_too_few_test_images_or_unnumbered_files_are_refused():
  names = [f"test/cat/{i:05d}.jpg" for i in range(40)]
  with pytest.raises(ValueError, match="only 2 test images"):
    gpu_data.select_entries(names, 20, 3)
  with pytest.raises(ValueError, match="not named by its index"):
    gpu_data.select_entries(["test/cat/a.jpg"], 20, 1)


def test_the_plan_reads_the_best_bf16_rate_and_the_targets_from_speed_json():
  from bench import gpu  # pylint: disable=g-import-not-at-top
  row = lambda dtype, r1, r2: dict(  # noqa: E731
      dtype=dtype, jax_batch_size=1000, certify=dict(
          jax=dict(median_per_s=r1), ratio_jax_over_torch=2.5,
          sampler_over_forward=dict(jax=0.95),
          extrapolated_500_images_n100000_s=250.0,
          best_batch=dict(batch_size=4000, jax=dict(median_per_s=r2),
                          ratio_jax_over_torch=1.5)))
  speed = dict(rows=[row("float32", 9e5, 9e6), row("bfloat16", 2e5, 3e5)])
  assert gpu._jax_rate(speed) == (3e5, 4000)  # pylint: disable=protected-access
  assert gpu._jax_rate(None) == (None, None)  # pylint: disable=protected-access
  t = gpu._targets(speed)  # pylint: disable=protected-access
  assert [x["dtype"] for x in t] == ["float32", "bfloat16"]
  assert t[1]["jax_over_torch"] == 2.5 and t[1]["jax_over_torch_at_least_2"]
  assert t[1]["sampler_at_least_0_9"] and t[1]["under_300_s"]


def test_the_simulation_gets_each_images_count_back_from_its_p_lower(tmp_path):
  from bench import sequential_sim  # pylint: disable=g-import-not-at-top
  from dds_jax import stats  # pylint: disable=g-import-not-at-top
  n, alpha = 1000, 0.001
  n_a = np.array([1000, 999, 980, 700, 3])
  p_lower = stats.lower_confidence_bound(n_a, n, alpha)
  path = tmp_path / "certify.tsv"
  path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tp_lower\n" + "".join(
      f"{i}\t0\t0\t0.1\t{int(i != 4)}\t0.0\t{p!r}\n"
      for i, p in enumerate(p_lower.tolist())))
  p = sequential_sim.p_from_tsv(str(path), n, alpha)
  np.testing.assert_allclose(p, [1.0, 0.999, 0.98, 0.7, 0.0])  # 4: wrong class
