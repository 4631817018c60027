"""Tests for dds_jax.convert: PyTorch checkpoints compute the same function.

The PyTorch architectures are rebuilt below with the module layout of the
published code (so the state_dict keys are the same), given random weights
and random BatchNorm running statistics, and run in eval mode next to the
converted flax model.
"""

import jax
import numpy as np
import pytest

from dds_jax import convert
from dds_jax import errors
from dds_jax import models

torch = pytest.importorskip('torch')
nn = torch.nn
from bench import reference_torch  # pylint: disable=g-import-not-at-top,wrong-import-position

COHEN_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
COHEN_CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizeLayer(nn.Module):
  """locuslab/smoothing's NormalizeLayer: statistics as plain attributes."""

  def __init__(self, means, sds, as_buffers=False):
    super().__init__()
    if as_buffers:  # a variant some forks use: then they are in state_dict
      self.register_buffer('means', torch.tensor(means))
      self.register_buffer('sds', torch.tensor(sds))
    else:
      self.means = torch.tensor(means)
      self.sds = torch.tensor(sds)

  def forward(self, x):
    return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


# torchvision's blocks, as the published checkpoints use them.
BasicBlock = reference_torch.BasicBlock
Bottleneck = reference_torch.Bottleneck


class TorchResNet(nn.Module):
  """The three published layouts (and ours), attribute names as published.

  stem='cifar': conv1 3x3 s1 (+ bn1) + relu (Cohen's cifar_resnet, our CIFAR
  ResNet-18); stem='imagenet': conv1 7x7 s2 (+ bn1) + relu + maxpool 3/2/1
  (torchvision; DDRS without bn1). `pool8` is Cohen's AvgPool2d(8);
  `inner_normalize` and `softmax` are the DDRS model's in-forward
  normalisation and output softmax.
  """

  def __init__(self, block, layers, num_classes, *, width=64, stem='cifar',
               stem_bn=True, pool8=False, inner_normalize=None,
               softmax=False):
    super().__init__()
    self.inplanes = width
    self.stem = stem
    if stem == 'cifar':
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    if stem_bn:
      self.bn1 = nn.BatchNorm2d(width)
    self.stem_bn = stem_bn
    self.relu = nn.ReLU(inplace=True)
    if stem == 'imagenet':
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for i, n in enumerate(layers):
      setattr(self, f'layer{i + 1}',
              self._make_layer(block, width * 2**i, n, 1 if i == 0 else 2))
    self.avgpool = nn.AvgPool2d(8) if pool8 else nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(width * 2**(len(layers) - 1) * block.expansion,
                        num_classes)
    self.num_layers = len(layers)
    self.inner_normalize = inner_normalize
    self.softmax = nn.Softmax(dim=1) if softmax else None

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                    bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    if self.inner_normalize is not None:
      mean, std = self.inner_normalize
      x = (x - mean) / std
    x = self.conv1(x)
    if self.stem_bn:
      x = self.bn1(x)
    x = self.relu(x)
    if self.stem == 'imagenet':
      x = self.maxpool(x)
    for i in range(self.num_layers):
      x = getattr(self, f'layer{i + 1}')(x)
    x = self.fc(torch.flatten(self.avgpool(x), 1))
    return x if self.softmax is None else self.softmax(x)


class DataParallelLike(nn.Module):
  """Holds the model under `.module`, as torch.nn.DataParallel does."""

  def __init__(self, module):
    super().__init__()
    self.module = module

  def forward(self, x):
    return self.module(x)


class TorchSmallCNN(nn.Module):
  """dds_jax.models.SmallCNN in PyTorch (32x32 input: both pools)."""

  def __init__(self, num_classes, mean, std):
    super().__init__()
    self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1),
                         persistent=False)
    self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1),
                         persistent=False)
    self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
    self.fc1 = nn.Linear(64, 128)
    self.head = nn.Linear(128, num_classes)

  def forward(self, x):
    x = (x - self.mean) / self.std
    x = nn.functional.avg_pool2d(torch.relu(self.conv1(x)), 2)
    x = nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
    x = torch.relu(self.conv3(x)).mean(dim=(2, 3))
    return self.head(torch.relu(self.fc1(x)))


def _randomize(model, seed=0):
  """Random BatchNorm affine parameters and running statistics; eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(1234)
  return model.eval()


def _images(shape, batch=4, seed=0):
  return np.random.default_rng(seed).uniform(
      size=(batch, *shape)).astype(np.float32)


def _torch_out(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _assert_logits_close(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape
  scale = max(1.0, float(np.abs(theirs).max()))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
  np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))


def _cohen_resnet(depth, num_classes=10):
  return TorchResNet(BasicBlock, [(depth - 2) // 6] * 3, num_classes,
                     width=16, stem='cifar', pool8=True)


def test_cifar_resnet110_matches_cohen():
  torch.manual_seed(0)
  net = _randomize(nn.Sequential(
      NormalizeLayer(COHEN_CIFAR_MEAN, COHEN_CIFAR_STD), _cohen_resnet(110)))
  sd = net.state_dict()
  assert not [k for k in sd if k.startswith('0.')]
  assert '1.layer2.0.downsample.0.weight' in sd
  assert '1.layer1.17.conv2.weight' in sd
  assert '1.layer1.0.downsample.0.weight' not in sd
  bundle, variables = convert.load_torch_state_dict(sd, 'cifar_resnet110')
  assert bundle.num_classes == 10 and bundle.input_shape == (32, 32, 3)
  assert bundle.module.std == COHEN_CIFAR_STD
  assert models.count_params(variables) == sum(
      p.numel() for p in net.parameters())
  x = _images((32, 32, 3))
  _assert_logits_close(bundle.apply_fn(variables, x),
                       _torch_out(net, x))


def test_resnet50_matches_torchvision_layout():
  torch.manual_seed(1)
  inner = TorchResNet(Bottleneck, [3, 4, 6, 3], 1000, stem='imagenet')
  net = _randomize(nn.Sequential(NormalizeLayer(IMAGENET_MEAN, IMAGENET_STD),
                                 DataParallelLike(inner)))
  sd = net.state_dict()
  assert '1.module.layer1.0.downsample.0.weight' in sd
  x = _images((64, 64, 3), batch=2)
  bundle, variables = convert.load_torch_state_dict(
      sd, 'resnet50', input_shape=(64, 64, 3))
  assert bundle.num_classes == 1000
  # Compiled: cheaper than op-by-op for ResNet-50's many distinct shapes.
  _assert_logits_close(jax.jit(bundle.apply_fn)(variables, x),
                       _torch_out(net, x))
  # Without the DataParallel level the keys are 1.conv1.weight, ...
  plain = {k.replace('1.module.', '1.'): v for k, v in sd.items()}
  _, variables2 = convert.load_torch_state_dict(
      plain, 'resnet50', input_shape=(64, 64, 3))
  jax.tree.map(np.testing.assert_array_equal, variables, variables2)


def test_ddrs_resnet18_matches_official_layout():
  torch.manual_seed(2)
  stats = (torch.tensor(COHEN_CIFAR_MEAN).view(1, 3, 1, 1),
           torch.tensor(COHEN_CIFAR_STD).view(1, 3, 1, 1))
  net = _randomize(TorchResNet(BasicBlock, [2, 2, 2, 2], 10, stem='imagenet',
                               stem_bn=False, inner_normalize=stats,
                               softmax=True))
  sd = net.state_dict()
  assert 'bn1.weight' not in sd and 'conv1.weight' in sd
  checkpoint = {'epoch': 200, 'state_dict': sd}  # as train_*.py save it
  bundle, variables = convert.load_torch_state_dict(checkpoint,
                                                    'ddrs_resnet18')
  x = _images((32, 32, 3))
  logits = bundle.apply_fn(variables, x)
  np.testing.assert_allclose(jax.nn.softmax(logits), _torch_out(net, x),
                             rtol=0, atol=1e-5)
  net.softmax = None
  _assert_logits_close(logits, _torch_out(net, x))


@pytest.mark.parametrize('name,kwargs', [
    ('resnet18', {}),
    ('resnet18', {'stem': 'imagenet'}),
    ('small_cnn', {}),
])
def test_round_trip(name, kwargs):
  torch.manual_seed(3)
  if name == 'small_cnn':
    net = TorchSmallCNN(10, models.CIFAR10_MEAN, models.CIFAR10_STD)
  else:
    net = TorchResNet(BasicBlock, [2, 2, 2, 2], 10, **kwargs)
    net.inner_normalize = (torch.tensor(models.CIFAR10_MEAN).view(1, 3, 1, 1),
                           torch.tensor(models.CIFAR10_STD).view(1, 3, 1, 1))
  net = _randomize(net)
  sd = net.state_dict()
  bundle, variables = convert.load_torch_state_dict(sd, name, **kwargs)
  assert bundle.module == models.build(name, 10, (32, 32, 3),
                                       **kwargs).module
  x = _images((32, 32, 3), batch=2)
  _assert_logits_close(bundle.apply_fn(variables, x), _torch_out(net, x))

  exported = convert.to_torch_state_dict(variables)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    assert isinstance(exported[k], np.ndarray)
    if k.endswith('num_batches_tracked'):
      assert exported[k].dtype == np.int64 and exported[k] == 0
    else:
      np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                      strict=True)
  _, variables2 = convert.load_torch_state_dict(exported, name, **kwargs)
  jax.tree.map(np.testing.assert_array_equal, variables, variables2)
  tensors = convert.to_torch_state_dict(variables, prefix='1.', as_torch=True,
                                        num_batches_tracked=False)
  assert all(isinstance(v, torch.Tensor) for v in tensors.values())
  assert set(tensors) == {'1.' + k for k in sd
                          if not k.endswith('num_batches_tracked')}


def test_normalize_buffers_are_used():
  torch.manual_seed(4)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  net = _randomize(nn.Sequential(NormalizeLayer(mean, std, as_buffers=True),
                                 _cohen_resnet(20)))
  sd = net.state_dict()
  assert '0.means' in sd
  bundle, variables = convert.load_torch_state_dict(sd, 'cifar_resnet20')
  np.testing.assert_allclose(bundle.module.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(bundle.module.std, std, rtol=1e-6)
  x = _images((32, 32, 3))
  _assert_logits_close(bundle.apply_fn(variables, x),
                       _torch_out(net, x))
  with pytest.raises(errors.CheckpointError, match='normalises with mean'):
    convert.load_torch_state_dict(sd, 'cifar_resnet20', mean=0.5)


def test_errors_name_the_keys():
  torch.manual_seed(5)
  sd = nn.Sequential(NormalizeLayer(COHEN_CIFAR_MEAN, COHEN_CIFAR_STD),
                     _cohen_resnet(20)).state_dict()
  missing = {k: v for k, v in sd.items() if k != '1.layer3.2.bn2.weight'}
  with pytest.raises(errors.CheckpointError,
                     match=r'1 missing key\(s\): layer3\.2\.bn2\.weight'):
    convert.load_torch_state_dict(missing, 'cifar_resnet20')
  extra = dict(sd, **{'1.layer4.0.conv1.weight': sd['1.conv1.weight']})
  with pytest.raises(errors.CheckpointError,
                     match=r'unexpected key\(s\): layer4\.0\.conv1\.weight'):
    convert.load_torch_state_dict(extra, 'cifar_resnet20')
  with pytest.raises(errors.CheckpointError, match=r'fc\.weight: checkpoint'):
    convert.load_torch_state_dict(sd, 'cifar_resnet20', num_classes=100)
  with pytest.raises(errors.CheckpointError, match='missing key'):
    convert.load_torch_state_dict(sd, 'cifar_resnet110')
  with pytest.raises(errors.CheckpointError, match='normalize layer'):
    convert.load_torch_state_dict(dict(sd, **{'0.foo': np.zeros(3)}),
                                  'cifar_resnet20')
  with pytest.raises(errors.ConfigError, match='unknown arch'):
    convert.load_torch_state_dict(sd, 'vgg16')
  with pytest.raises(errors.ConfigError, match='32x32'):
    convert.load_torch_state_dict(sd, 'cifar_resnet20',
                                  input_shape=(64, 64, 3))
  with pytest.raises(errors.CheckpointError, match='mapping'):
    convert.load_torch_state_dict([1, 2], 'cifar_resnet20')
