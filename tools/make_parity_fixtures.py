r"""Writes tests/data/parity/: small PyTorch checkpoints in each layout that skd_jax.convert reads,
and the PyTorch models' eval-mode outputs on fixed inputs, for tests/test_convert.py.

Run once by hand, with PyTorch installed in a separate environment (never in the project's):

    python3 -m venv /work/torchenv && /work/torchenv/bin/pip install torch==2.13.0 numpy
    /work/torchenv/bin/python tools/make_parity_fixtures.py [--out=tests/data/parity]

The PyTorch modules below are written from the reference descriptions
(/work/shared/reference/skd-reference.md section 5, cirkd-protocol.md) with each layout's exact
module names, so that their state_dict keys are those of the real checkpoints:
  - the SKD reference PSPNet (deep stem, every BN an In-Place ABN with effective scale
    |weight| + 1e-5, leaky ReLU 0.01 fused into the head's ABNs), in the model code's naming
    (``pspmodule.*``, ``head.*``, ``dsn.*``) and the teacher checkpoint's (``head.0.*``,
    ``head.1.*``, plus an unused ``fc.*``);
  - CIRKD's DeepLabV3 (``pretrained.*``, ``head.aspp.*``, ``head.block.*``, ``auxlayer.block.*``);
  - the CSAIL deep-stem ImageNet ResNet and torchvision's 7x7-stem ResNet (backbone + ``fc``).
Networks are at reduced width (1/16 or 1/32) and small inputs so that the files stay small; the
weights AND the BN running statistics are random (the statistics calibrated on random images, then
perturbed, so that activations stay of order 1 through 100 layers and every term matters).
Formats and wrappers vary over the fixtures: zip and legacy (pre-1.6) torch.save, plain,
``{'state_dict': {'module.' ...}}`` and ``{'model': ...}``, float32, float16 and bfloat16 storages.

Also writes ``tensors.pth`` / ``tensors_legacy.pth`` (dtypes, views with storage offsets and
strides, nested containers) with their expected values, and ``manifest.json`` describing it all.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def scaled(channels: int, multiplier: float) -> int:
  """As skd_jax.models.layers.scaled."""
  return max(1, int(round(channels * multiplier)))


# ------------------------------------------------------------------------------------------------
# Normalisation layers.


class InPlaceABN(nn.Module):
  """In-Place ABN as the reference uses it: BN with scale |weight| + eps, then an activation.

  Same parameters and buffers as the reference's (no num_batches_tracked).
  """

  def __init__(self, channels: int, activation: str = 'leaky_relu', eps: float = 1e-5):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))
    self.register_buffer('running_mean', torch.zeros(channels))
    self.register_buffer('running_var', torch.ones(channels))
    self.eps, self.momentum, self.activation = eps, 0.1, activation

  def forward(self, x):
    x = F.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps,
                     self.bias, self.training, self.momentum, self.eps)
    if self.activation == 'leaky_relu':
      return F.leaky_relu(x, 0.01)
    assert self.activation == 'none'
    return x


def abn_none(channels):
  return InPlaceABN(channels, activation='none')


def plain_bn(channels):
  return nn.BatchNorm2d(channels)


# ------------------------------------------------------------------------------------------------
# Backbones.


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, dilation, stage_dilation, downsample, norm):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn1 = norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=stage_dilation, dilation=stage_dilation,
                           bias=False)
    self.bn2 = norm(planes)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(out + residual)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, dilation, stage_dilation, downsample, norm):
    super().__init__()
    del stage_dilation  # only the 3x3 conv is dilated
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = norm(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = norm(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(out + residual)


class ResNet(nn.Module):
  """Dilated ResNet, output stride 8, torchvision/CSAIL/reference module names.

  stem: 'deep' (conv1..conv3 3x3, the reference and CSAIL) or 'standard' (torchvision's 7x7).
  schedule: 'skd' (every block at the stage dilation) or 'cirkd' (first block of layer3 / layer4 at
  dilation 1 / 2). fc: an (unused) ImageNet classifier, as the ImageNet checkpoints carry.
  """

  def __init__(self, depth, width, norm, stem='deep', schedule='skd', ceil_mode=True, fc=False):
    super().__init__()
    c = lambda n: scaled(n, width)
    self.stem = stem
    if stem == 'deep':
      self.conv1 = nn.Conv2d(3, c(64), 3, 2, 1, bias=False)
      self.bn1 = norm(c(64))
      self.conv2 = nn.Conv2d(c(64), c(64), 3, 1, 1, bias=False)
      self.bn2 = norm(c(64))
      self.conv3 = nn.Conv2d(c(64), c(128), 3, 1, 1, bias=False)
      self.bn3 = norm(c(128))
      inplanes = c(128)
    else:
      self.conv1 = nn.Conv2d(3, c(64), 7, 2, 3, bias=False)
      self.bn1 = norm(c(64))
      inplanes = c(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
    block = BasicBlock if depth < 50 else Bottleneck
    strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
    for stage, (n, stride, dil) in enumerate(zip(STAGE_SIZES[depth], strides, dilations), 1):
      planes = c(64 * 2 ** (stage - 1))
      first = dil if schedule == 'skd' else (1 if dil in (1, 2) else dil // 2)
      blocks = []
      for b in range(n):
        s = stride if b == 0 else 1
        downsample = None
        if b == 0 and (s != 1 or inplanes != planes * block.expansion):
          downsample = nn.Sequential(
              nn.Conv2d(inplanes, planes * block.expansion, 1, s, bias=False),
              norm(planes * block.expansion))
        blocks.append(block(inplanes, planes, s, first if b == 0 else dil, dil, downsample, norm))
        inplanes = planes * block.expansion
      setattr(self, f'layer{stage}', nn.Sequential(*blocks))
    self.channels = inplanes
    if fc:
      self.fc = nn.Linear(inplanes, 10)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.stem == 'deep':
      x = F.relu(self.bn2(self.conv2(x)))
      x = F.relu(self.bn3(self.conv3(x)))
    x = self.maxpool(x)
    x = self.layer2(self.layer1(x))
    x3 = self.layer3(x)
    return x3, self.layer4(x3)


# ------------------------------------------------------------------------------------------------
# The SKD reference PSPNet.


def upsample(x, size):
  return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


class PSPModule(nn.Module):

  def __init__(self, features, out_features, sizes=(1, 2, 3, 6)):
    super().__init__()
    self.stages = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(features, out_features, 1, bias=False),
                      InPlaceABN(out_features)) for s in sizes])
    self.bottleneck = nn.Sequential(
        nn.Conv2d(features + len(sizes) * out_features, out_features, 3, padding=1, bias=False),
        InPlaceABN(out_features), nn.Dropout2d(0.1))

  def forward(self, x):
    size = x.shape[2:]
    return self.bottleneck(torch.cat([upsample(s(x), size) for s in self.stages] + [x], 1))


class ReferencePSPNet(nn.Module):
  """PSPNet of the reference. naming: 'code' (pspmodule / head) or 'toolbox' (head.0 / head.1)."""

  def __init__(self, depth, width, num_classes, head_channels, aux_channels, naming='code',
               fc=False):
    super().__init__()
    self.naming = naming
    # The reference builds layers 1-4 on the ResNet module itself (no backbone prefix).
    backbone = ResNet(depth, width, abn_none, 'deep', 'skd', True, fc)
    for name, module in backbone.named_children():
      setattr(self, name, module)
    self.stem = 'deep'
    c4, c3 = backbone.channels, backbone.channels // 2
    psp = PSPModule(c4, head_channels)
    classifier = nn.Conv2d(head_channels, num_classes, 1)
    if naming == 'code':
      self.pspmodule, self.head = psp, classifier
    else:
      self.head = nn.Sequential(psp, classifier)
    self.dsn = nn.Sequential(nn.Conv2d(c3, aux_channels, 3, padding=1), InPlaceABN(aux_channels),
                             nn.Dropout2d(0.1), nn.Conv2d(aux_channels, num_classes, 1))

  def forward(self, x):
    x3, x4 = ResNet.forward(self, x)
    if self.naming == 'code':
      logits = self.head(self.pspmodule(x4))
    else:
      logits = self.head(x4)
    return logits, self.dsn(x3)


# ------------------------------------------------------------------------------------------------
# CIRKD's DeepLabV3.


def conv_bn_relu(cin, cout, k, dilation=1):
  return [nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
          nn.BatchNorm2d(cout), nn.ReLU(True)]


class ASPPConv(nn.Module):

  def __init__(self, cin, cout, rate):
    super().__init__()
    self.block = nn.Sequential(*conv_bn_relu(cin, cout, 3, rate))

  def forward(self, x):
    return self.block(x)


class ASPPPooling(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, cout, 1))

  def forward(self, x):
    return upsample(self.gap(x), x.shape[2:])


class ASPP(nn.Module):

  def __init__(self, cin, cout, rates=(12, 24, 36)):
    super().__init__()
    self.b0 = nn.Sequential(*conv_bn_relu(cin, cout, 1))
    self.b1, self.b2, self.b3 = (ASPPConv(cin, cout, r) for r in rates)
    self.b4 = ASPPPooling(cin, cout)
    self.project = nn.Sequential(*conv_bn_relu(5 * cout, cout, 1), nn.Dropout(0.5))

  def forward(self, x):
    return self.project(torch.cat([b(x) for b in (self.b0, self.b1, self.b2, self.b3, self.b4)],
                                  1))


class DeepLabHead(nn.Module):

  def __init__(self, cin, channels, num_classes):
    super().__init__()
    self.aspp = ASPP(cin, channels)
    self.block = nn.Sequential(*conv_bn_relu(channels, channels, 3), nn.Dropout(0.1),
                               nn.Conv2d(channels, num_classes, 1))

  def forward(self, x):
    return self.block(self.aspp(x))


class FCNHead(nn.Module):

  def __init__(self, cin, channels, num_classes):
    super().__init__()
    self.block = nn.Sequential(*conv_bn_relu(cin, channels, 3), nn.Dropout(0.1),
                               nn.Conv2d(channels, num_classes, 1))

  def forward(self, x):
    return self.block(x)


class CirkdDeepLabV3(nn.Module):

  def __init__(self, depth, width, num_classes, head_channels, aux_channels):
    super().__init__()
    self.pretrained = ResNet(depth, width, plain_bn, 'deep', 'cirkd', False)
    c4 = self.pretrained.channels
    self.head = DeepLabHead(c4, head_channels, num_classes)
    self.auxlayer = FCNHead(c4 // 2, aux_channels, num_classes)

  def forward(self, x):
    x3, x4 = self.pretrained(x)
    return self.head(x4), self.auxlayer(x3)


class Backbone(nn.Module):
  """An ImageNet ResNet (CSAIL or torchvision naming); forward gives (layer3, layer4)."""

  def __init__(self, depth, width, stem, schedule, ceil_mode):
    super().__init__()
    resnet = ResNet(depth, width, plain_bn, stem, schedule, ceil_mode, fc=True)
    for name, module in resnet.named_children():
      setattr(self, name, module)
    self.stem = stem

  def forward(self, x):
    return ResNet.forward(self, x)


# ------------------------------------------------------------------------------------------------
# Random weights and statistics.


BN_TYPES = (InPlaceABN, nn.BatchNorm2d)


@torch.no_grad()
def randomise(model: nn.Module, calib_shape, gen: torch.Generator):
  """Random weights; BN statistics calibrated on random images (momentum 1), then perturbed."""
  randn = lambda *s: torch.randn(*s, generator=gen)
  rand = lambda *s: torch.rand(*s, generator=gen)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      fan_in = m.weight[0].numel()
      # He init, but smaller for the classifiers (the only convs with a bias and a 1x1 kernel):
      # logits of order 10 keep float32 rounding well inside the tests' tolerance.
      classifier = m.bias is not None and m.kernel_size == (1, 1)
      m.weight.copy_(randn(*m.weight.shape) * math.sqrt((0.3 if classifier else 2.0) / fan_in))
      if m.bias is not None:
        m.bias.copy_(randn(*m.bias.shape) * 0.1)
    elif isinstance(m, nn.Linear):
      m.weight.copy_(randn(*m.weight.shape) * 0.1)
      m.bias.copy_(randn(*m.bias.shape) * 0.1)
    elif isinstance(m, BN_TYPES):
      sign = torch.where(rand(m.weight.shape[0]) < 0.3, -1.0, 1.0)  # |w| matters for In-Place ABN
      m.weight.copy_(sign * (0.5 + rand(m.weight.shape[0])))
      m.bias.copy_(randn(m.weight.shape[0]) * 0.2)
      m.momentum = 1.0
  # Shrink each residual branch's last BN: otherwise the residual stream grows with depth (to
  # hundreds after 33 blocks), and float32 rounding alone would exceed the tests' 1e-4 tolerance.
  for m in model.modules():
    if isinstance(m, (BasicBlock, Bottleneck)):
      last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
      last.weight.mul_(0.25)
  model.train()
  model(randn(*calib_shape))
  model.eval()
  for m in model.modules():
    if isinstance(m, BN_TYPES):
      m.momentum = 0.1
      n = m.running_mean.shape[0]
      m.running_mean.add_(0.2 * m.running_var.sqrt() * randn(n))
      m.running_var.mul_(0.6 + rand(n))
      if isinstance(m, nn.BatchNorm2d):
        m.num_batches_tracked.fill_(1000)


@torch.no_grad()
def round_to(model: nn.Module, dtype: torch.dtype):
  """Rounds every float tensor to `dtype` and back: float32 outputs of a low-precision save."""
  for t in list(model.parameters()) + list(model.buffers()):
    if t.is_floating_point():
      t.copy_(t.to(dtype).float())


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The fixtures.


FIXTURES = [
    # name, layout, arch, depth, width, kind-specific options
    dict(name='skd_student_r18', layout='skd_reference', arch='pspnet_resnet18', depth=18,
         width=1 / 16, head_channels=128, aux_channels=128, naming='code', format='zip',
         wrap='none', input_hw=(65, 73), batch=2),
    dict(name='skd_teacher_r101', layout='skd_reference', arch='pspnet_resnet101', depth=101,
         width=1 / 32, head_channels=512, aux_channels=512, naming='toolbox', fc=True,
         format='legacy', wrap='none', input_hw=(65, 65), batch=1),
    # The ASPP rates (12, 24, 36) only reach beyond the centre tap on maps wider than 37 pixels.
    dict(name='cirkd_student_r18', layout='cirkd', arch='deeplabv3_resnet18', depth=18,
         width=1 / 16, head_channels=128, aux_channels=64, format='zip', wrap='none',
         input_hw=(296, 304), batch=1),
    # A later CIRKD version's 512-wide ASPP (the preset says 256): read from the checkpoint.
    dict(name='cirkd_teacher_r101', layout='cirkd', arch='deeplabv3_resnet101', depth=101,
         width=1 / 32, head_channels=512, aux_channels=256, format='zip',
         wrap='state_dict+module', input_hw=(296, 296), batch=1),
    dict(name='csail_r18', layout='csail_imagenet', arch='pspnet_resnet18', depth=18,
         width=1 / 16, format='legacy', wrap='none', input_hw=(65, 65), batch=1),
    dict(name='csail_r101', layout='csail_imagenet', arch='pspnet_resnet101', depth=101,
         width=1 / 32, format='zip', wrap='none', dtype='float16', input_hw=(49, 57), batch=1),
    dict(name='torchvision_r18', layout='torchvision', arch='deeplabv3_resnet18', depth=18,
         width=1 / 16, format='zip', wrap='model', input_hw=(64, 80), batch=1),
    dict(name='torchvision_r50', layout='torchvision', arch='pspnet_resnet50', depth=50,
         width=1 / 32, format='zip', wrap='none', input_hw=(65, 65), batch=1),
    dict(name='torchvision_r101', layout='torchvision', arch='deeplabv3_resnet101', depth=101,
         width=1 / 32, format='zip', wrap='none', dtype='bfloat16', input_hw=(64, 64), batch=1),
]
NUM_CLASSES = 5


def build(spec):
  w = spec['width']
  if spec['layout'] == 'skd_reference':
    return ReferencePSPNet(spec['depth'], w, NUM_CLASSES, scaled(spec['head_channels'], w),
                           scaled(spec['aux_channels'], w), spec['naming'], spec.get('fc', False))
  if spec['layout'] == 'cirkd':
    return CirkdDeepLabV3(spec['depth'], w, NUM_CLASSES, scaled(spec['head_channels'], w),
                          scaled(spec['aux_channels'], w))
  psp = spec['arch'].startswith('pspnet')
  return Backbone(spec['depth'], w, 'deep' if spec['layout'] == 'csail_imagenet' else 'standard',
                  'skd' if psp else 'cirkd', psp)


def save(obj, path: pathlib.Path, fmt: str):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == 'zip'))


def make_model_fixture(spec, out: pathlib.Path, seed: int) -> dict:
  gen = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)  # the train-mode calibration pass draws dropout masks from it
  model = build(spec)
  h, w = spec['input_hw']
  randomise(model, (2, 3, h, w), gen)
  dtype = getattr(torch, spec.get('dtype', 'float32'))
  if dtype != torch.float32:
    round_to(model, dtype)
  # The input: random float16 values (exact in float32) at half resolution, repeated 2x2, so that
  # the stored file stays small (the test rebuilds it with np.repeat).
  small = torch.randn(spec['batch'], 3, (h + 1) // 2, (w + 1) // 2, generator=gen).half()
  x = small.float().repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :h, :w].contiguous()
  with torch.no_grad():
    outputs = model(x)
  arrays = {'input_half_res': small.permute(0, 2, 3, 1).numpy(), 'input_hw': np.array([h, w])}
  if isinstance(model, Backbone):
    arrays['layer4'] = nhwc(outputs[1])
  else:
    arrays['logits'], arrays['aux_logits'] = nhwc(outputs[0]), nhwc(outputs[1])
  state = collections.OrderedDict(
      (k, v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items())
  if spec['wrap'] == 'state_dict+module':
    obj = {'state_dict': collections.OrderedDict(('module.' + k, v) for k, v in state.items()),
           'epoch': 120, 'best_pred': 0.78}
  elif spec['wrap'] == 'model':
    obj = {'model': state, 'args': {'lr': 0.1, 'epochs': [90]}}
  else:
    obj = state
  save(obj, out / f'{spec["name"]}.pth', spec['format'])
  np.savez_compressed(out / f'{spec["name"]}.npz', **arrays)
  stats = {k: round(float(np.abs(v).max()), 2) for k, v in arrays.items()
           if k.endswith(('logits', 'layer4'))}
  print(f'{spec["name"]}: {len(state)} tensors, max |output| {stats}')
  return {k: v for k, v in spec.items() if k != 'input_hw'}


def make_tensor_fixture(out: pathlib.Path) -> dict:
  """Dtypes, views (offsets, strides), containers: the reader's corner cases."""
  g = torch.Generator().manual_seed(7)
  base = torch.randn(4, 6, generator=g)
  tensors = collections.OrderedDict([
      ('base', base), ('transposed', base.t()), ('window', base[1:3, 2:5]),
      ('strided', base[::2, ::3]), ('row', base[3]),
      ('float64', torch.randn(3, generator=g).double()),
      ('float16', torch.randn(2, 3, generator=g).half()),
      ('bfloat16', torch.randn(5, generator=g).bfloat16()),
      ('int64', torch.arange(-3, 4)), ('int32', torch.arange(6, dtype=torch.int32).reshape(2, 3)),
      ('uint8', torch.arange(250, 256, dtype=torch.uint8)), ('bool', torch.tensor([True, False])),
      ('scalar', torch.tensor(2.5)), ('empty', torch.zeros(0, 3)),
      ('parameter', nn.Parameter(torch.ones(2, 2) * 3)),
  ])
  expected = {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
              for k, v in tensors.items()}
  zip_only = {'uint16': torch.arange(65530, 65536, dtype=torch.int32).to(torch.uint16)}
  expected['uint16'] = np.arange(65530, 65536, dtype=np.uint16)
  obj = {'tensors': tensors, 'nested': [base[0], (base[1, :2], {'x': base[2, 1]})],
         'meta': {'epoch': 3, 'name': 'fixture', 'ratio': 0.5, 'flags': {1, 2}}}
  torch.save(dict(obj, tensors=collections.OrderedDict(tensors, **zip_only)), out / 'tensors.pth')
  torch.save(obj, out / 'tensors_legacy.pth', _use_new_zipfile_serialization=False)
  np.savez_compressed(out / 'tensors.npz', **expected)
  return {'tensors': sorted(expected), 'zip_only': sorted(zip_only)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent.parent / 'tests' /
                                          'data' / 'parity'))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  torch.set_num_threads(2)
  manifest = {'num_classes': NUM_CLASSES, 'torch_version': torch.__version__, 'fixtures': []}
  for seed, spec in enumerate(FIXTURES):
    manifest['fixtures'].append(make_model_fixture(spec, out, seed))
  manifest['tensor_fixture'] = make_tensor_fixture(out)
  (out / 'manifest.json').write_text(json.dumps(manifest, indent=2) + '\n')
  total = sum(p.stat().st_size for p in out.iterdir())
  print(f'{out}: {total / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
