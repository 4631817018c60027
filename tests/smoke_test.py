"""ResNet-18 smoke test: CIFAR-size certification end to end on this CPU."""

import jax
import numpy as np

import dds_jax
from dds_jax import models


def test_resnet18_certifies_a_cifar_sized_image():
  bundle = models.build("resnet18", 10, (32, 32, 3))
  params = bundle.init(jax.random.key(0))
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  cert = dds_jax.certify(bundle.apply_fn, params, x, 0.25, jax.random.key(1),
                         n0=20, n=60, batch_size=40, samples_per_block=20)
  assert cert.counts0.sum() == 40 and cert.counts.sum() == 120
  assert np.all((cert.pred == dds_jax.ABSTAIN) | (cert.radius >= 0))
  # A random-init net predicts nearly one class everywhere: check consistency.
  top = cert.counts.argmax(1)
  certified = cert.pred != dds_jax.ABSTAIN
  np.testing.assert_array_equal(cert.pred[certified], top[certified])
