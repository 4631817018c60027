"""Tests for dds_jax.models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dds_jax import errors
from dds_jax import models


def _images(shape, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(batch, *shape)), jnp.float32)


@pytest.fixture(scope='module')
def digits_cnn():
  bundle = models.build('small_cnn', 10, (8, 8, 1))
  return bundle, bundle.init(jax.random.key(0))


@pytest.fixture(scope='module')
def resnet18():
  bundle = models.build('resnet18', 10, (32, 32, 3))
  return bundle, bundle.init(jax.random.key(0))


@pytest.mark.parametrize('shape', [(8, 8, 1), (16, 16, 3), (32, 32, 3)])
def test_small_cnn_output_shape(shape):
  bundle = models.build('small_cnn', 7, shape)
  variables = bundle.init(jax.random.key(0))
  assert set(variables) == {'params'}
  logits = bundle.apply_fn(variables, _images(shape, batch=3))
  assert logits.shape == (3, 7)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert bundle.input_shape == shape
  assert bundle.num_classes == 7
  assert not bundle.has_batch_stats


def test_small_cnn_works_on_other_sizes_and_channels():
  bundle = models.build('small_cnn', 4, (12, 10, 2))
  variables = bundle.init(1)
  assert bundle.apply_fn(variables, _images((12, 10, 2))).shape == (2, 4)


def test_resnet18_forward_and_param_count(resnet18):
  bundle, variables = resnet18
  assert set(variables) == {'params', 'batch_stats'}
  assert bundle.has_batch_stats
  assert models.count_params(variables) == 11_173_962
  assert models.count_params(variables['params']) == 11_173_962
  x = _images((32, 32, 3))
  logits = jax.jit(bundle.apply_fn)(variables, x)
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Inference uses running averages: an image's logits do not depend on the
  # rest of the batch.
  np.testing.assert_allclose(
      jax.jit(bundle.apply_fn)(variables, x[1:]), logits[1:],
      rtol=1e-4, atol=1e-4)


def test_resnet18_train_mode_updates_batch_stats(resnet18):
  bundle, variables = resnet18
  x = _images((32, 32, 3), seed=1)
  logits, new_state = jax.jit(bundle.apply_train)(variables, x)
  assert logits.shape == (2, 10)
  assert set(new_state) == {'batch_stats'}
  new_stats = new_state['batch_stats']
  assert jax.tree.structure(new_stats) == jax.tree.structure(
      variables['batch_stats'])
  old_mean = variables['batch_stats']['bn1']['mean']
  new_mean = new_stats['bn1']['mean']
  assert np.all(np.isfinite(new_mean))
  assert not np.allclose(old_mean, new_mean)
  # Train mode normalises with batch statistics, so a second step on the same
  # batch sees the same batch mean b: from zeros, 0.1 b then 0.19 b
  # (momentum 0.9).
  _, newer_state = jax.jit(bundle.apply_train)({**variables, **new_state}, x)
  np.testing.assert_allclose(
      newer_state['batch_stats']['bn1']['mean'], 1.9 * new_mean,
      rtol=1e-4, atol=1e-6)
  # The input variables are untouched.
  np.testing.assert_array_equal(
      variables['batch_stats']['bn1']['mean'], old_mean)


def test_resnet18_imagenet_stem_param_count():
  bundle = models.build('resnet18', 1000, (224, 224, 3), stem='imagenet')
  shapes = jax.eval_shape(bundle.init, jax.random.key(0))
  assert models.count_params(shapes) == 11_689_512  # torchvision resnet18.


def test_resnet50_shapes_and_param_count():
  bundle = models.build('resnet50', 1000, (224, 224, 3))
  assert bundle.module.mean == models.IMAGENET_MEAN
  assert bundle.module.std == models.IMAGENET_STD
  shapes = jax.eval_shape(bundle.init, jax.random.key(0))
  assert set(shapes) == {'params', 'batch_stats'}
  assert models.count_params(shapes) == 25_557_032  # torchvision resnet50.
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(bundle.apply_fn, shapes, x)
  assert out.shape == (2, 1000)
  assert out.dtype == jnp.float32
  conv = shapes['params']['layer2_0']['conv2']['kernel']
  assert conv.shape == (3, 3, 128, 128)


def test_normalisation_happens_inside_the_model():
  shape = (16, 16, 3)
  mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.5)
  normed = models.build('small_cnn', 10, shape, mean=mean, std=std)
  plain = models.build('small_cnn', 10, shape, mean=0.0, std=1.0)
  variables = normed.init(jax.random.key(3))
  x = _images(shape, batch=4)
  expected = plain.apply_fn(
      variables, (x - jnp.asarray(mean)) / jnp.asarray(std))
  np.testing.assert_allclose(
      normed.apply_fn(variables, x), expected, rtol=1e-5, atol=1e-5)
  # A different normalisation gives different logits for the same params.
  assert not np.allclose(plain.apply_fn(variables, x), expected, atol=1e-3)


def test_single_value_normalisation_for_grayscale(digits_cnn):
  shape = (8, 8, 1)
  _, variables = digits_cnn
  normed = models.build('small_cnn', 10, shape, mean=0.25, std=0.5)
  plain = models.build('small_cnn', 10, shape, mean=(0.0,), std=(1.0,))
  x = _images(shape)
  np.testing.assert_allclose(
      normed.apply_fn(variables, x),
      plain.apply_fn(variables, (x - 0.25) / 0.5),
      rtol=1e-5, atol=1e-5)


def test_default_statistics():
  assert models.build('resnet18', 10, (32, 32, 3)).module.std == (
      models.CIFAR10_STD)
  assert models.build('small_cnn', 10, (32, 32, 3)).module.mean == (
      models.CIFAR10_MEAN)
  assert models.build('small_cnn', 10, (8, 8, 1)).module.mean == (0.5,)
  assert models.build('resnet18', 10, (64, 64, 3)).module.mean == (
      models.IMAGENET_MEAN)
  assert models.build('resnet50', 10, (32, 32, 3)).module.mean == (
      models.IMAGENET_MEAN)


def test_apply_fn_is_pure_deterministic_jittable_and_vmappable(digits_cnn):
  shape = (8, 8, 1)
  bundle, variables = digits_cnn
  x = _images(shape, batch=6)
  eager = bundle.apply_fn(variables, x)
  jitted = jax.jit(bundle.apply_fn)
  np.testing.assert_array_equal(jitted(variables, x), jitted(variables, x))
  np.testing.assert_allclose(jitted(variables, x), eager, rtol=1e-5, atol=1e-5)
  batched = jax.vmap(bundle.apply_fn, in_axes=(None, 0))(
      variables, x.reshape(3, 2, *shape))
  np.testing.assert_allclose(
      batched.reshape(6, 10), eager, rtol=1e-5, atol=1e-5)
  standalone = models.make_apply_fn(bundle.module)
  np.testing.assert_allclose(
      jax.jit(standalone)(variables, x), eager, rtol=1e-5, atol=1e-5)


def test_init_is_deterministic_in_the_key(digits_cnn):
  bundle, a = digits_cnn
  b, c = bundle.init(0), bundle.init(jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a['params']['head']['kernel'],
                         c['params']['head']['kernel'])


def test_apply_train_without_batch_stats_returns_empty_state(digits_cnn):
  bundle, variables = digits_cnn
  x = _images((8, 8, 1))
  logits, new_state = bundle.apply_train(variables, x)
  assert new_state == {}
  np.testing.assert_allclose(logits, bundle.apply_fn(variables, x))


def test_bfloat16_compute_keeps_float32_params_and_logits(digits_cnn):
  shape = (8, 8, 1)
  f32, variables = digits_cnn
  bf16 = models.build('small_cnn', 10, shape, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  x = _images(shape)
  logits = bf16.apply_fn(variables, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(
      logits, f32.apply_fn(variables, x), rtol=0.1, atol=0.1)


def test_build_from_config_computes_in_certify_dtype_outside_training():
  from dds_jax.configs import common  # pylint: disable=g-import-not-at-top
  from dds_jax.configs import digits  # pylint: disable=g-import-not-at-top
  c = digits.get_config('small')
  c.certify.dtype = 'bfloat16'
  common.validate(c)
  assert models.build_from_config(c, (8, 8, 1)).module.dtype == jnp.bfloat16
  assert models.build_from_config(c, (8, 8, 1), training=True).module.dtype in (
      None, jnp.float32)
  c.certify.dtype = 'float16'
  with pytest.raises(errors.ConfigError, match='certify.dtype'):
    common.validate(c)


def test_unknown_name_raises_config_error_listing_valid_names():
  with pytest.raises(errors.ConfigError, match='resnet18') as info:
    models.build('vgg16', 10, (32, 32, 3))
  assert 'small_cnn' in str(info.value)
  assert 'resnet50' in str(info.value)


@pytest.mark.parametrize('kwargs', [
    dict(num_classes=0),
    dict(num_classes=2.5),
    dict(input_shape=(32, 32)),
    dict(input_shape=(32, 0, 3)),
    dict(mean=(0.1, 0.2)),
    dict(std=(0.2, 0.2, 0.0)),
    dict(std='abc'),
    dict(no_such_attribute=1),
    dict(stem='tiny'),
])
def test_bad_arguments_raise_config_error(kwargs):
  args = dict(name='resnet18', num_classes=10, input_shape=(32, 32, 3))
  args.update(kwargs)
  with pytest.raises(errors.ConfigError):
    models.build(**args)


def test_non_batched_input_raises_input_error(digits_cnn):
  bundle, variables = digits_cnn
  with pytest.raises(errors.InputError):
    bundle.apply_fn(variables, jnp.zeros((8, 8, 1)))


def test_small_cnn_learns_sklearn_digits(digits_cnn):
  datasets = pytest.importorskip('sklearn.datasets')
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(x))
  x, y = x[perm], y[perm]
  x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

  bundle, variables = digits_cnn
  params = variables['params']
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, xb, yb):
    def loss_fn(params):
      logits, _ = bundle.apply_train({'params': params}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(250):
    idx = rng.integers(0, len(x_train), size=64)
    params, opt_state = train_step(params, opt_state, x_train[idx],
                                   y_train[idx])
  logits = jax.jit(bundle.apply_fn)({'params': params}, x_test)
  accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
  assert accuracy > 0.9, accuracy
