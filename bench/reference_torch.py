r"""The reference algorithms in PyTorch, for `bench/compare.py`.

A faithful re-implementation, written here, of what the published code runs,
on CPU or CUDA (wherever the model's parameters are; the noise is drawn on
the images' device) and on the same architectures as dds_jax (weights
converted from our flax parameters with `dds_jax.convert.to_torch_state_dict`,
so both frameworks compute the same function; `check_same_function` verifies
it):

* `Smooth.certify`: Cohen et al.'s CERTIFY (locuslab/smoothing `code/core.py`)
  as DDRS's `certify_ds.py` calls it, one image at a time: `_sample_noise`
  builds `batch = x.repeat((this_batch_size, 1, 1, 1))`, draws
  `noise = torch.randn_like(batch) * sigma`, takes
  `base_classifier(batch + noise).argmax(1)` and adds `_count_arr` of the
  predictions (a Python loop, as published) to the counts, in batches of
  `batch_size` (1000 in `certify_ds.py`); n0 draws pick the top class, n
  fresh draws count it; the Clopper-Pearson bound is
  `scipy.stats.beta.ppf(alpha, nA, n - nA + 1)` (equal to the published
  `proportion_confint(nA, n, alpha=2 * alpha, method='beta')[0]`, without
  the statsmodels dependency).
* `optimize_sigma`: the official batched ascent (`OptimzeSigma` in the DDRS
  repository's `optimize_sigma.py`): per batch of images, sigma a [B, 1, 1, 1]
  tensor that requires grad, the model's parameters frozen; K times: draw
  `eps = randn_like(new_batch) * sigma_repeated` for the m copies of every
  image, psi = mean over the m copies of softmax(model(new_batch + eps)),
  top two entries clipped to [0.02, 0.98], radius = sigma / 2 (icdf(p1) -
  icdf(p2)), `grad = torch.autograd.grad(radius.sum(), sig)`,
  `sig.data += lr * grad`. (The official model ends in a softmax; ours
  return logits, so the softmax is applied here.) No floor on sigma, as
  published.

Models: `SmallCNN` and `ResNet` mirror `dds_jax.models.SmallCNN` and
`dds_jax.models.ResNet` (BasicBlock or Bottleneck, CIFAR or ImageNet stem,
with or without the stem BatchNorm), wrapped like Cohen's checkpoints as
`Sequential(NormalizeLayer(mean, std), model)`; `from_flax` builds one from
a dds_jax bundle and its variables.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from dds_jax import convert
from dds_jax import models
from dds_jax.models import resnet as resnet_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

ABSTAIN = -1


class NormalizeLayer(nn.Module):
  """(x - mean) / std per channel; the statistics are not in the state_dict."""

  def __init__(self, mean, std, channels: int):
    super().__init__()
    mean = torch.tensor(np.broadcast_to(mean, (channels,)), dtype=torch.float32)
    std = torch.tensor(np.broadcast_to(std, (channels,)), dtype=torch.float32)
    self.register_buffer('means', mean.view(1, -1, 1, 1), persistent=False)
    self.register_buffer('sds', std.view(1, -1, 1, 1), persistent=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return (x - self.means) / self.sds


class SmallCNN(nn.Module):
  """`dds_jax.models.SmallCNN` (same layers, names and pooling rule)."""

  def __init__(self, num_classes: int, in_channels: int, height: int,
               conv_features=(32, 64, 64), hidden: int = 128,
               pool_min_sizes=(32, 16)):
    super().__init__()
    channels = [in_channels] + list(conv_features)
    for i in range(len(conv_features)):
      setattr(self, f'conv{i + 1}',
              nn.Conv2d(channels[i], channels[i + 1], 3, padding=1))
    self.pools = [i < len(pool_min_sizes) and height >= pool_min_sizes[i]
                  for i in range(len(conv_features))]
    self.fc1 = nn.Linear(channels[-1], hidden)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, pool in enumerate(self.pools):
      x = torch.relu(getattr(self, f'conv{i + 1}')(x))
      if pool:
        x = nn.functional.avg_pool2d(x, 2)
    x = torch.relu(self.fc1(x.mean(dim=(2, 3))))
    return self.head(x)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock."""
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += identity
    return self.relu(out)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: stride on the 3x3 convolution)."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    out += identity
    return self.relu(out)


class ResNet(nn.Module):
  """torchvision's ResNet with a CIFAR (3x3, no max-pool) or ImageNet stem."""

  def __init__(self, block, layers, num_classes, *, in_channels=3, width=64,
               stem='cifar', stem_bn=True):
    super().__init__()
    self.inplanes = width
    self.stem = stem
    self.stem_bn = stem_bn
    if stem == 'cifar':
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    else:
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    if stem_bn:
      self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.stages = len(layers)
    for i, n in enumerate(layers):
      setattr(self, f'layer{i + 1}',
              self._make_layer(block, width * 2**i, n, 1 if i == 0 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(self.inplanes, num_classes)

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
    x = self.conv1(x)
    if self.stem_bn:
      x = self.bn1(x)
    x = self.relu(x)
    if self.stem == 'imagenet':
      x = self.maxpool(x)
    for i in range(self.stages):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def from_flax(bundle: models.ModelBundle, variables: Any) -> nn.Module:
  """The PyTorch twin of a dds_jax model, weights copied, in eval mode.

  Args:
    bundle: a dds_jax SmallCNN or ResNet bundle.
    variables: its flax variables.

  Returns:
    `Sequential(NormalizeLayer(mean, std), model)` taking NCHW in [0, 1].
  """
  module = bundle.module
  h, _, c = bundle.input_shape
  if isinstance(module, models.SmallCNN):
    net = SmallCNN(bundle.num_classes, c, h, module.conv_features,
                   module.hidden, module.pool_min_sizes)
  elif isinstance(module, models.ResNet):
    block = {resnet_lib.BasicBlock: BasicBlock,
             resnet_lib.Bottleneck: Bottleneck}[module.block_cls]
    net = ResNet(block, list(module.stage_sizes), bundle.num_classes,
                 in_channels=c, width=module.width, stem=module.stem,
                 stem_bn=getattr(module, 'stem_bn', True))
  else:
    raise TypeError(f'no PyTorch twin for {type(module).__name__}')
  model = nn.Sequential(NormalizeLayer(module.mean, module.std, c), net)
  state = convert.to_torch_state_dict(variables, prefix='1.', as_torch=True)
  model.load_state_dict(state, strict=True)
  return model.eval()


def check_same_function(bundle: models.ModelBundle, variables: Any,
                        torch_model: nn.Module, x: np.ndarray,
                        rel_tol: float = 1e-4) -> dict[str, Any]:
  """Logits of both frameworks on NHWC images x; asserts they are close.

  Returns:
    dict(agreement: fraction of equal argmax, max_abs_diff, logit_scale).
  """
  ours = np.asarray(bundle.apply_fn(variables, x))
  device = next(torch_model.parameters()).device
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    theirs = torch_model(xt.to(device)).cpu().numpy()
  diff = float(np.abs(ours - theirs).max())
  scale = float(np.abs(theirs).max())
  agreement = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
  if diff > rel_tol * max(1.0, scale):
    raise AssertionError(
        f'logits differ by {diff:.3g} (scale {scale:.3g}): the PyTorch twin '
        'does not compute the same function')
  return dict(agreement=agreement, max_abs_diff=diff, logit_scale=scale)


class Smooth:
  """Cohen et al.'s smoothed classifier (locuslab/smoothing `core.Smooth`)."""

  ABSTAIN = ABSTAIN

  def __init__(self, base_classifier: nn.Module, num_classes: int,
               sigma: float):
    self.base_classifier = base_classifier
    self.num_classes = num_classes
    self.sigma = sigma

  def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float,
              batch_size: int) -> tuple[int, float]:
    """CERTIFY for one image x [C, H, W]: (class or ABSTAIN, radius)."""
    self.base_classifier.eval()
    counts_selection = self._sample_noise(x, n0, batch_size)
    c_a = counts_selection.argmax().item()
    counts_estimation = self._sample_noise(x, n, batch_size)
    n_a = counts_estimation[c_a].item()
    p_a = self._lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
      return Smooth.ABSTAIN, 0.0
    return c_a, self.sigma * scipy.stats.norm.ppf(p_a)

  def _sample_noise(self, x: torch.Tensor, num: int,
                    batch_size: int) -> np.ndarray:
    with torch.no_grad():
      counts = np.zeros(self.num_classes, dtype=int)
      for _ in range(math.ceil(num / batch_size)):
        this_batch_size = min(batch_size, num)
        num -= this_batch_size
        batch = x.repeat((this_batch_size, 1, 1, 1))
        noise = torch.randn_like(batch) * self.sigma
        predictions = self.base_classifier(batch + noise).argmax(1)
        counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
      return counts

  def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
    counts = np.zeros(length, dtype=int)
    for idx in arr:
      counts[idx] += 1
    return counts

  def _lower_confidence_bound(self, n_a: int, n: int, alpha: float) -> float:
    if n_a == 0:
      return 0.0
    return float(scipy.stats.beta.ppf(alpha, n_a, n - n_a + 1))


def optimize_sigma(model: nn.Module, batch: torch.Tensor, lr: float,
                   sig_0: torch.Tensor, steps: int, n: int,
                   num_classes: int) -> torch.Tensor:
  """The official batched ascent (`OptimzeSigma`), on logits models.

  Args:
    model: logits model (a softmax is applied, as the official model had
      one built in).
    batch: [B, C, H, W] images.
    lr: step size (official: 1e-4).
    sig_0: [B] starting sigmas.
    steps: K ascent steps.
    n: m noise draws per image and step.
    num_classes: number of outputs.

  Returns:
    [B] sigmas (detached).
  """
  batch_size = batch.shape[0]
  sig = sig_0.clone().detach().requires_grad_(True).view(batch_size, 1, 1, 1)
  m = torch.distributions.normal.Normal(
      torch.zeros(batch_size, device=batch.device),
      torch.ones(batch_size, device=batch.device))
  for param in model.parameters():
    param.requires_grad_(False)
  new_shape = [batch_size * n]
  new_shape.extend(batch[0].shape)
  new_batch = batch.repeat((1, n, 1, 1)).view(new_shape)
  for _ in range(steps):
    sigma_repeated = sig.repeat((1, n, 1, 1)).view(-1, 1, 1, 1)
    eps = torch.randn_like(new_batch) * sigma_repeated
    out = torch.softmax(model(new_batch + eps), dim=1)
    out = out.reshape(batch_size, n, num_classes).mean(1)
    vals, _ = torch.topk(out, 2)
    vals.transpose_(0, 1)
    gap = (m.icdf(vals[0].clamp_(0.02, 0.98)) -
           m.icdf(vals[1].clamp_(0.02, 0.98)))
    radius = sig.reshape(-1) / 2 * gap
    grad = torch.autograd.grad(radius.sum(), sig)
    sig.data += lr * grad[0]
  for param in model.parameters():
    param.requires_grad_(True)
  return sig.reshape(-1).detach()
